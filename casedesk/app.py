"""Wiring: config → deployments, pools and routes; the one place the rooms meet.

One Gateway serves one version of the config (a reload builds a new one: casedesk/lifecycle.py).
It builds each deployment's state (casedesk/serving.py), routes a request, gives its handler
exactly what it needs (a deployment's state, or the metrics, or the readiness check), renders
Anthropic errors, and accounts for every request in one place (`account`): batch items too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from functools import partial

from casedesk.admission import Admission
from casedesk.anthropic.errors import ApiError, not_found
from casedesk.batches.runner import BatchRunner
from casedesk.config import Config, Deployment, UpstreamAddress
from casedesk.endpoints.batches import (
    handle_batch_results,
    handle_cancel_batch,
    handle_create_batch,
    handle_delete_batch,
    handle_get_batch,
    handle_list_batches,
)
from casedesk.endpoints.count_tokens import handle_count_tokens
from casedesk.endpoints.messages import handle_messages
from casedesk.answering.work import new_large_body_gate
from casedesk.endpoints.models import handle_get_model, handle_head_probe, handle_healthz, handle_list_models
from casedesk.endpoints.ops import handle_metrics, handle_readyz
from casedesk.http.server import ErrorResponse, Request, ResponseWriter
from casedesk.ops.accesslog import AccessLog, RequestRecord
from casedesk.ops.metrics import Metrics
from casedesk.ops.supervisor import Supervisor
from casedesk.router import Router, RouteHandler
from casedesk.serving import DeploymentState, ManagedModel, ModelState
from casedesk.tenancy.directory import Directory
from casedesk.tenancy.state import Tenancy
from casedesk.upstream.affinity import Thresholds
from casedesk.upstream.balancer import Balancer
from casedesk.upstream.pool import UpstreamPool

log = logging.getLogger("casedesk")

BASE = "/proxy/{deployment}/anthropic"
BATCHES = "/v1/messages/batches"

# (DeploymentState, Request, ResponseWriter, RequestRecord, **path parameters)
DeploymentHandler = Callable[..., Awaitable[None]]


class Gateway:
    """The running gateway's state: routes, deployments and their upstream pools."""

    def __init__(
        self,
        config: Config,
        upstreams: dict[tuple[str, str], list[UpstreamAddress]],
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
        supervisor: Supervisor | None = None,
        tenancy: Tenancy | None = None,
        batches: BatchRunner | None = None,
    ) -> None:
        self.config = config
        # Both outlive a reload (they belong to the process), hence passed in.
        self.metrics = metrics or Metrics()
        self.access_log = access_log or AccessLog("")
        self.settings = settings = config.server
        started_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.deployments: dict[str, DeploymentState] = {}
        self._health_tasks: list[asyncio.Task[None]] = []
        self.active = 0  # requests being handled: a retired Gateway closes when this is 0
        large_bodies = new_large_body_gate()  # one bound for all deployments
        # Admission and the tenants' buckets outlive a reload (issue 22 item 10): the process's.
        self.tenancy = tenancy or Tenancy()
        self.tenancy.configure(config)
        directory = Directory(config.tenants, settings)
        for dep in config.deployments.values():
            admission = self.tenancy.admission(dep)
            state = self.deployments[dep.id] = DeploymentState(
                dep,
                admission,
                settings,
                started_at,
                large_bodies=large_bodies,
                directory=directory,
                limiter=self.tenancy.limiter,
            )
            for model in dep.models.values():
                connect_timeout = settings.upstream_connect_timeout
                sizes = (model.max_connections, connect_timeout, model.spare_connections)
                pools = [UpstreamPool(u.host, u.port, *sizes) for u in model.upstreams]
                managed = [  # its llama-server, when CaseDesk runs it
                    UpstreamPool(u.host, u.port, *sizes) for u in upstreams.get((dep.id, model.tag), [])
                ]
                thresholds = Thresholds(model.balance_abs_threshold, model.balance_rel_threshold)
                balancer = Balancer([*pools, *managed], model.balance, thresholds)
                served = state.models[model.tag] = ModelState(model.tag, balancer)
                process = supervisor.processes.get((dep.id, model.tag)) if supervisor is not None else None
                if process is not None and supervisor is not None and managed:
                    (upstream,) = [s for s in balancer.states if s.pool is managed[0]]
                    served.managed = ManagedModel(supervisor, process, upstream, dep.queue_timeout)
                    served.managed.upstream.standby = served.managed.on_demand
        self.router = Router()
        for method, path, handler in (
            ("POST", "/v1/messages", handle_messages),
            ("POST", "/v1/messages/count_tokens", handle_count_tokens),
            ("GET", "/v1/models", handle_list_models),
            ("GET", "/v1/models/{model}", handle_get_model),
            ("HEAD", "/*", handle_head_probe),
        ):
            self.router.add(method, BASE + path, self._with_deployment(handler))
        if batches is not None:  # the Message Batches API (issue 18); the runner is the process's
            for method, path, batch_handler in (
                ("POST", BATCHES, handle_create_batch),
                ("GET", BATCHES, handle_list_batches),
                ("GET", BATCHES + "/{batch_id}", handle_get_batch),
                ("DELETE", BATCHES + "/{batch_id}", handle_delete_batch),
                ("POST", BATCHES + "/{batch_id}/cancel", handle_cancel_batch),
                ("GET", BATCHES + "/{batch_id}/results", handle_batch_results),
            ):
                self.router.add(method, BASE + path, self._with_deployment(partial(batch_handler, batches)))
        self.router.add(("GET", "HEAD"), "/healthz", handle_healthz)
        # /metrics and /readyz: everything on [server] ops_listen when it is set (and nothing
        # on the main listener); else on the main listener, where a deployment that requires
        # a key is shown only to a request carrying one of its keys.
        self.ops_router = Router()
        self.ops_router.add(("GET", "HEAD"), "/healthz", handle_healthz)
        self.ops_router.add(("GET", "HEAD"), "/readyz", partial(handle_readyz, lambda _: self.not_ready()))
        self.ops_router.add(("GET", "HEAD"), "/metrics", partial(handle_metrics, self.metrics, lambda _: frozenset()))
        if settings.ops_listen is None:
            public_readiness = lambda headers: self.not_ready(hide=self.hidden_from(headers))  # noqa: E731
            self.router.add(("GET", "HEAD"), "/readyz", partial(handle_readyz, public_readiness))
            self.router.add(("GET", "HEAD"), "/metrics", partial(handle_metrics, self.metrics, self.hidden_from))
        # An unknown deployment id is answered as a keyed deployment without the right key
        # would be (401), so that 401 versus 404 does not tell which ids exist.
        self._unknown: DeploymentState | None = None
        if any(_keyed(d.config) for d in self.deployments.values()):
            nobody = Deployment(id="", models={}, api_keys_sha256=frozenset({"0" * 64}))
            self._unknown = DeploymentState(nobody, Admission(1, 0, 1.0), settings, started_at)

    def _with_deployment(self, handler: DeploymentHandler) -> RouteHandler:
        """`handler` given the state of the deployment its path names (404 if none), which the
        request's record notes for the access log and metrics."""

        async def run(
            request: Request, writer: ResponseWriter, record: RequestRecord, deployment: str, **params: str
        ) -> None:
            state = self._find(deployment, request.headers)
            record.deployment = deployment
            await handler(state, request, writer, record, **params)

        return run

    def _find(self, deployment: str, headers: dict[str, str]) -> DeploymentState:
        state = self.deployments.get(deployment)
        if state is None:
            if self._unknown is not None:
                self._unknown.authorize(headers)  # raises the 401 a keyed deployment would
            raise not_found(f"deployment {deployment!r} not found")
        return state

    async def handle(self, request: Request, writer: ResponseWriter, router: Router | None = None) -> None:
        """Route (on the main listener's routes, or `router`'s), run the handler, render its
        errors, and account for the request."""
        record = RequestRecord(request.request_id, request.method, request.path, request.client, time.monotonic())
        self.active += 1
        try:
            match = (router or self.router).resolve(request.method, request.path)
            await match.handler(request, writer, record, **match.params)
        except ApiError as error:
            record.status = error.status
            respond_with_error(writer, error)
        except asyncio.CancelledError:
            # The client went away (nginx's code for it), also in the middle of a 200 stream.
            record.status = writer.status if writer.finished else 499
            raise
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.path)
            record.status = 500
            respond_with_error(writer, ApiError(500, "internal error in the gateway; see its log"))
        finally:
            self.active -= 1
            self.account(record, writer.status)

    def check_head(self, request: Request) -> ErrorResponse | None:
        """Refuse, before its body is sent, a request that would be refused anyway: an unknown
        path or deployment, a missing or wrong key (asked for `Expect: 100-continue`)."""
        deployment: str | None = None
        try:
            match = self.router.resolve(request.method, request.path)
            deployment = match.params.get("deployment")
            if deployment is not None:
                self._find(deployment, request.headers).authorize(request.headers, request.client)
        except ApiError as error:
            record = RequestRecord(request.request_id, request.method, request.path, request.client, time.monotonic())
            if deployment is not None and deployment in self.deployments:
                record.deployment = deployment
            self.account(record, error.status)
            return error_response(error)
        return None

    def body_limit(self, request: Request) -> int:
        """A request's body limit, from its head: a batch create may be as large as
        `[server] max_batch_bytes`, any other request `max_body_bytes`."""
        parts = request.path.strip("/").split("/")
        if (
            request.method == "POST"
            and len(parts) == 6
            and parts[0] == "proxy"
            and "/".join(parts[2:]) == ("anthropic" + BATCHES)
        ):
            return self.settings.max_batch_bytes
        return self.settings.limits.max_body_bytes

    def account(self, record: RequestRecord, status: int) -> None:
        """A finished request (or batch item): its metrics and its access-log line."""
        record.status = record.status or status
        if record.deployment:
            # Labelled by the resolved tag (never the requested name): a client's typo or an
            # alias must not add series.
            known = bool(record.tag)
            self.metrics.record(
                record.deployment,
                record.tag,
                record.status,
                duration=time.monotonic() - record.started,
                input_tokens=record.input_tokens,
                output_tokens=record.output_tokens,
                ttft=record.ttft,
                upstream=record.upstream if known else "",
                cached_tokens=record.cached_tokens,
                repaired_tool_calls=record.repaired_tool_calls,
            )
            if record.tenant:
                self.metrics.record_tenant(record)
        self.access_log.write(record)

    def hidden_from(self, headers: dict[str, str]) -> frozenset[str]:
        """The deployments a request with these headers may not learn about: those that
        require a key it does not carry."""
        hidden = set()
        for dep in self.deployments.values():
            if _keyed(dep.config):
                try:
                    dep.authorize(headers)
                except ApiError:
                    hidden.add(dep.config.id)
        return frozenset(hidden)

    def not_ready(self, hide: frozenset[str] = frozenset()) -> str | None:
        """Why the gateway is not ready: a managed model that cannot start, or a deployment
        with no healthy upstream (a stopped on-demand model counts: it can start); else None.
        The deployments in `hide` count, but the reason does not name them."""
        for dep in self.deployments.values():
            problem = _not_ready(dep)
            if problem is not None:
                hidden = "a deployment is not ready (set [server] ops_listen to see which, and why)"
                return hidden if dep.config.id in hide else problem
        return None

    def balancers(self) -> list[Balancer]:
        return [model.balancer for dep in self.deployments.values() for model in dep.models.values()]

    def start_health_checks(self) -> None:
        interval = self.settings.health_interval
        self._health_tasks = [asyncio.create_task(b.watch(interval), name="health") for b in self.balancers()]

    def close(self) -> None:
        for task in self._health_tasks:
            task.cancel()
        for balancer in self.balancers():
            balancer.close()


def _keyed(deployment: Deployment) -> bool:
    """Only a client with one of its keys may learn that this deployment exists (its own
    keys, or its tenants')."""
    return bool(deployment.api_keys_sha256 or deployment.tenants)


def _not_ready(dep: DeploymentState) -> str | None:
    for model in dep.models.values():
        managed = model.managed
        failure = managed.supervisor.failure(managed.process) if managed is not None else None
        if failure is not None:
            return f"model {model.tag!r} of deployment {dep.config.id!r} cannot start: {failure.reason}"
    if not any(
        state.healthy or state.standby is not None and state.standby()
        for model in dep.models.values()
        for state in model.balancer.states
    ):
        return f"deployment {dep.config.id!r} has no healthy upstream"
    return None


# An error message carries values the client chose (a model name, a path): an 8 MB `model`
# must not make an 8 MB answer. Longer messages are cut (README, "Limits").
MAX_ERROR_MESSAGE = 4096


def _bounded(error: ApiError) -> ApiError:
    if len(error.message) <= MAX_ERROR_MESSAGE:
        return error
    cut = f"{error.message[:MAX_ERROR_MESSAGE]}… (cut: {len(error.message)} characters)"
    return ApiError(error.status, cut, error.error_type, error.headers)


def error_response(error: ApiError) -> ErrorResponse:
    error = _bounded(error)
    return ErrorResponse(error.status, error.body(), headers=error.headers)


def render_error(status: int, message: str) -> ErrorResponse:
    """The Anthropic shape for the errors the HTTP layer finds itself (413, 431, 408…)."""
    return error_response(ApiError(status, message))


def respond_with_error(writer: ResponseWriter, error: ApiError, close: bool = False) -> None:
    """Answer with `error`: a whole response, or, once a stream has started, its last event."""
    if writer.finished or writer.disconnected:
        return
    if not writer.started:
        writer.send_error(error_response(error), close=close)
    else:
        writer.write(_bounded(error).sse_event())
        writer.end()

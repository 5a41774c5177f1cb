"""Wiring: config → deployments, pools and routes; the one place the rooms meet.

`Gateway` holds what handlers need (passed to them as an argument, never a global). One
Gateway serves one version of the config: a reload builds a new one (casedesk/service.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

from casedesk.admission import Admission
from casedesk.anthropic.errors import ApiError, authentication_failed, invalid_request, not_found, overloaded
from casedesk.config import Config, Deployment, ServerSettings, Upstream
from casedesk.endpoints.count_tokens import handle_count_tokens
from casedesk.endpoints.messages import handle_messages
from casedesk.endpoints.models import handle_get_model, handle_head_probe, handle_healthz, handle_list_models
from casedesk.endpoints.ops import handle_metrics, handle_readyz
from casedesk.http.server import ErrorResponse, Request, ResponseWriter, ServerLimits
from casedesk.ops.accesslog import AccessLog, RequestRecord
from casedesk.ops.metrics import Metrics
from casedesk.ops.supervisor import LeaseTimeout, LoadFailed, ManagedProcess, State, Supervisor
from casedesk.router import Router
from casedesk.upstream.affinity import Thresholds
from casedesk.upstream.balancer import Balancer, UpstreamState
from casedesk.upstream.pool import UpstreamPool

log = logging.getLogger("casedesk")

BASE = "/proxy/{deployment}/anthropic"


@dataclass(slots=True)
class ManagedModel:
    """A model whose llama-server CaseDesk runs (casedesk/ops/supervisor.py)."""

    supervisor: Supervisor
    process: ManagedProcess
    upstream: UpstreamState  # that llama-server in the model's balancer
    queue_timeout: float  # the deployment's: the longest a request waits for a load
    generation: int = 0  # the process's load this route last saw

    def on_demand(self) -> bool:
        """Its upstream is down on purpose now (not loaded): health checks leave it alone."""
        return self.process.state is not State.READY


@dataclass(slots=True)
class ModelRoute:
    tag: str
    balancer: Balancer
    managed: ManagedModel | None = None

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[None]:
        """Around a request's upstream part: a managed model is loaded if needed and kept
        running until the request ends (Supervisor.lease); nothing to do for other models."""
        managed = self.managed
        if managed is None:
            yield
            return
        process = managed.process
        try:
            ticket = await managed.supervisor.acquire(process, managed.queue_timeout)
        except LoadFailed as exc:
            raise ApiError(503, f"model {self.tag!r} could not be started: {exc.reason}") from None
        except LeaseTimeout:
            loads = process.load_seconds
            retry_after = math.ceil(loads.total / loads.count) if loads.count else 5
            raise overloaded(
                f"model {self.tag!r} is not loaded: waited {managed.queue_timeout:g} s (queue_timeout) "
                "for it to start; retry shortly",
                retry_after=max(1, retry_after),
            ) from None
        try:
            if process.generation != managed.generation:
                managed.generation = process.generation  # a fresh llama-server: healthy again
                self.balancer.succeeded(managed.upstream)
            yield
        finally:
            managed.supervisor.release(process, ticket)


@dataclass(slots=True)
class DeploymentRoute:
    config: Deployment
    admission: Admission
    models: dict[str, ModelRoute] = field(default_factory=dict)

    def authorize(self, headers: dict[str, str]) -> None:
        """With `api_keys_sha256` set, a key is required and must hash to one of them."""
        if not self.config.api_keys_sha256:
            return
        key = headers.get("x-api-key", "")
        if not key:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else ""
        if not key:
            raise authentication_failed("an API key is required: send it as x-api-key or Authorization: Bearer")
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        # Compare against every hash, always, in constant time per comparison.
        matched = False
        for known in self.config.api_keys_sha256:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise authentication_failed("invalid x-api-key")

    def model(self, name: str) -> ModelRoute:
        """The model a requested name means: its tag, or the tag of its first matching alias."""
        tag = self.config.resolve(name)
        if tag is None:
            aliases = ", ".join(f'"{pattern}" -> {target}' for pattern, target in self.config.aliases)
            raise not_found(
                f"model {name!r} not found in deployment {self.config.id!r}; it serves: {', '.join(self.models)}"
                + (f"; aliases (first match wins): {aliases}" if aliases else "")
            )
        return self.models[tag]


class Gateway:
    """The running gateway's state: routes, deployments and their upstream pools."""

    def __init__(
        self,
        config: Config,
        upstreams: dict[tuple[str, str], list[Upstream]],
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.config = config
        # Both outlive a reload (they belong to the process), hence passed in.
        self.metrics = metrics or Metrics()
        self.access_log = access_log or AccessLog("")
        self.settings: ServerSettings = config.server
        self.started_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.deployments: dict[str, DeploymentRoute] = {}
        self._health_tasks: list[asyncio.Task[None]] = []
        self.active = 0  # requests being handled: a retired Gateway closes when this is 0
        for dep in config.deployments.values():
            route = DeploymentRoute(dep, Admission(dep.max_concurrency, dep.max_queue, dep.queue_timeout))
            for model in dep.models.values():
                pools = [
                    UpstreamPool(u.host, u.port, model.max_connections, self.settings.upstream_connect_timeout)
                    for u in [*model.upstreams, *upstreams.get((dep.id, model.tag), [])]
                ]
                thresholds = Thresholds(model.balance_abs_threshold, model.balance_rel_threshold)
                route.models[model.tag] = ModelRoute(model.tag, Balancer(pools, model.balance, thresholds))
                process = supervisor.processes.get((dep.id, model.tag)) if supervisor is not None else None
                if process is not None and supervisor is not None:
                    balancer = route.models[model.tag].balancer
                    managed = ManagedModel(supervisor, process, balancer.states[-1], dep.queue_timeout)
                    managed.upstream.standby = managed.on_demand
                    route.models[model.tag].managed = managed
            self.deployments[dep.id] = route
        self.router = Router()
        self.router.add("POST", BASE + "/v1/messages", handle_messages)
        self.router.add("POST", BASE + "/v1/messages/count_tokens", handle_count_tokens)
        self.router.add("GET", BASE + "/v1/models", handle_list_models)
        self.router.add("GET", BASE + "/v1/models/{model}", handle_get_model)
        self.router.add("HEAD", BASE + "/*", handle_head_probe)
        self.router.add(("GET", "HEAD"), "/healthz", handle_healthz)
        self.router.add(("GET", "HEAD"), "/readyz", handle_readyz)
        self.router.add(("GET", "HEAD"), "/metrics", handle_metrics)

    async def handle(self, request: Request, writer: ResponseWriter) -> None:
        """Route, run the handler, render its errors, and account for the request."""
        record = request.record = RequestRecord(
            request.request_id, request.method, request.path, request.client, time.monotonic()
        )
        self.active += 1
        try:
            match = self.router.resolve(request.method, request.path)
            await match.handler(self, request, writer, **match.params)
        except ApiError as error:
            record.status = error.status
            respond_with_error(writer, error)
        except asyncio.CancelledError:
            record.status = writer.status or 499  # the client went away (nginx's code for it)
            raise
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.path)
            record.status = 500
            respond_with_error(writer, ApiError(500, "internal error in the gateway; see its log"))
        finally:
            self.active -= 1
            self._account(record, writer.status)

    def check_head(self, request: Request) -> ErrorResponse | None:
        """Refuse, before its body is sent, a request that would be refused anyway: an unknown
        path or deployment, a missing or wrong key (asked for `Expect: 100-continue`)."""
        deployment: str | None = None
        try:
            match = self.router.resolve(request.method, request.path)
            deployment = match.params.get("deployment")
            if deployment is not None:
                self.deployment(deployment).authorize(request.headers)
        except ApiError as error:
            record = RequestRecord(request.request_id, request.method, request.path, request.client, time.monotonic())
            if deployment is not None and deployment in self.deployments:
                record.deployment = deployment
            self._account(record, error.status)
            return error_response(error)
        return None

    def _account(self, record: RequestRecord, status: int) -> None:
        """A finished request: its metrics and its access-log line."""
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
            )
        self.access_log.write(record)

    def not_ready(self) -> str | None:
        """Why the gateway is not ready: a managed model that cannot start, or a deployment
        with no healthy upstream (a stopped on-demand model counts: it can start); else None."""
        for dep in self.deployments.values():
            for model in dep.models.values():
                managed = model.managed
                failure = managed.process.failure if managed is not None else None
                if failure is not None:
                    return f"model {model.tag!r} of deployment {dep.config.id!r} cannot start: {failure.reason}"
            if not any(
                state.healthy or state.standby is not None and state.standby()
                for model in dep.models.values()
                for state in model.balancer.states
            ):
                return f"deployment {dep.config.id!r} has no healthy upstream"
        return None

    def deployment(self, deployment_id: str, request: Request | None = None) -> DeploymentRoute:
        route = self.deployments.get(deployment_id)
        if route is None:
            raise not_found(f"deployment {deployment_id!r} not found")
        if request is not None and request.record is not None:
            request.record.deployment = deployment_id
        return route

    def anthropic_body(self, request: Request) -> Any:
        """The JSON body of an Anthropic API call, after its required header is checked."""
        if not request.headers.get("anthropic-version"):
            raise invalid_request("anthropic-version: header is required (e.g. anthropic-version: 2023-06-01)")
        if not request.body:
            raise invalid_request("request body is empty; expected a JSON object")
        try:
            return orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise invalid_request(f"request body is not valid JSON: {exc}") from None

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


def error_response(error: ApiError) -> ErrorResponse:
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
        writer.write(error.sse_event())
        writer.end()


def limits_of(settings: ServerSettings) -> ServerLimits:
    return ServerLimits(
        max_body_bytes=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
        max_header_count=settings.max_header_count,
        max_connections=settings.max_connections,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        write_timeout=settings.write_timeout,
    )

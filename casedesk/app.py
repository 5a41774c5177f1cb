"""Wiring: config → deployments, pools and routes; the one place the rooms meet.

`Gateway` holds what handlers need (passed to them as an argument, never a global). One
Gateway serves one version of the config: a reload builds a new one (casedesk/service.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

from casedesk.admission import Admission
from casedesk.anthropic.errors import ApiError, authentication_failed, invalid_request, not_found
from casedesk.config import Config, Deployment, ServerSettings, Upstream
from casedesk.endpoints.count_tokens import handle_count_tokens
from casedesk.endpoints.messages import handle_messages
from casedesk.endpoints.models import handle_get_model, handle_head_probe, handle_healthz, handle_list_models
from casedesk.endpoints.ops import handle_metrics, handle_readyz
from casedesk.http.server import Request, ResponseWriter, ServerLimits
from casedesk.ops.accesslog import AccessLog, RequestRecord
from casedesk.ops.metrics import Metrics
from casedesk.router import Router
from casedesk.upstream.balancer import Balancer
from casedesk.upstream.pool import UpstreamPool

log = logging.getLogger("casedesk")

BASE = "/proxy/{deployment}/anthropic"


@dataclass(slots=True)
class ModelRoute:
    tag: str
    balancer: Balancer


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
                route.models[model.tag] = ModelRoute(model.tag, Balancer(pools))
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
        """Route, run the handler, and account for the request (access log, metrics)."""
        record = request.record = RequestRecord(
            request.request_id, request.method, request.path, request.client, time.monotonic()
        )
        self.active += 1
        try:
            match = self.router.resolve(request.method, request.path)
            await match.handler(self, request, writer, **match.params)
        except ApiError as error:
            record.status = error.status
            raise
        except asyncio.CancelledError:
            record.status = writer.status or 499  # the client went away (nginx's code for it)
            raise
        except Exception:
            record.status = 500
            raise
        finally:
            self.active -= 1
            record.status = record.status or writer.status
            if record.deployment:
                # Labelled by the resolved tag (never the requested name): a client's typo or
                # an alias must not add series.
                self.metrics.record(
                    record.deployment,
                    record.tag,
                    record.status,
                    duration=time.monotonic() - record.started,
                    input_tokens=record.input_tokens,
                    output_tokens=record.output_tokens,
                    ttft=record.ttft,
                )
            self.access_log.write(record)

    def ready(self) -> bool:
        """Every deployment has at least one healthy upstream."""
        return all(
            any(state.healthy for model in dep.models.values() for state in model.balancer.states)
            for dep in self.deployments.values()
        )

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


def limits_of(settings: ServerSettings) -> ServerLimits:
    return ServerLimits(
        max_body_bytes=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
        max_header_count=settings.max_header_count,
        max_connections=settings.max_connections,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        keepalive_timeout=settings.keepalive_timeout,
    )

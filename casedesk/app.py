"""Wiring: config → deployments, pools and routes; the one place the rooms meet.

`Gateway` holds what handlers need (passed to them as an argument, never a global);
`run()` starts managed llama-servers, listens, and shuts down gracefully on a signal.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import signal
import socket
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
from casedesk.http.server import ConnectionTracker, Request, ResponseWriter, ServerLimits, start_server
from casedesk.ops.supervisor import Supervisor
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

    def model(self, tag: str) -> ModelRoute:
        route = self.models.get(tag)
        if route is None:
            raise not_found(
                f"model {tag!r} not found in deployment {self.config.id!r}; it serves: {', '.join(self.models)}"
            )
        return route


class Gateway:
    """The running gateway's state: routes, deployments and their upstream pools."""

    def __init__(self, config: Config, upstreams: dict[tuple[str, str], list[Upstream]]) -> None:
        self.config = config
        self.settings: ServerSettings = config.server
        self.started_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.deployments: dict[str, DeploymentRoute] = {}
        self._health_tasks: list[asyncio.Task[None]] = []
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

    async def handle(self, request: Request, writer: ResponseWriter) -> None:
        match = self.router.resolve(request.method, request.path)
        await match.handler(self, request, writer, **match.params)

    def deployment(self, deployment_id: str) -> DeploymentRoute:
        route = self.deployments.get(deployment_id)
        if route is None:
            raise not_found(f"deployment {deployment_id!r} not found")
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


async def run(
    config: Config,
    *,
    sock: socket.socket | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    force: asyncio.Event | None = None,
    shutdown_grace: float = 30.0,
    worker_upstreams: dict[tuple[str, str], list[Upstream]] | None = None,
    handle_signals: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then finish in-flight requests.

    worker_upstreams: set in a `--workers` child: the managed servers' URLs, started by the
    parent; the child then shares the port (SO_REUSEPORT) and manages no process itself.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    force = force or asyncio.Event()  # a second SIGTERM/SIGINT: end in-flight streams now
    if handle_signals:
        loop.add_signal_handler(signal.SIGTERM, lambda: force.set() if stop.is_set() else stop.set())
        loop.add_signal_handler(signal.SIGINT, lambda: force.set() if stop.is_set() else stop.set())
    supervisor = Supervisor(config if worker_upstreams is None else None)
    try:
        upstreams = worker_upstreams if worker_upstreams is not None else await supervisor.start()
        gateway = Gateway(config, upstreams)
        gateway.start_health_checks()
        tracker = ConnectionTracker()
        settings = config.server
        server = await start_server(
            gateway.handle, limits_of(settings), tracker,
            host=settings.listen_host, port=settings.listen_port, sock=sock,
            reuse_port=worker_upstreams is not None,
        )
        addresses = ", ".join(str(s.getsockname()) for s in server.sockets)
        log.info("casedesk listening on %s; deployments: %s", addresses, ", ".join(gateway.deployments))
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down: no new connections; waiting up to %g s for in-flight requests", shutdown_grace)
        server.close()
        await _drain(tracker, shutdown_grace, force)
        gateway.close()
    finally:
        await supervisor.stop()


async def _drain(tracker: ConnectionTracker, grace: float, force: asyncio.Event) -> None:
    """Close idle connections; let busy ones finish within `grace` (or until `force` is
    set); then end the rest, streams with an `event: error` so clients know why."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while True:
        for protocol in list(tracker.open):
            protocol.shutdown_if_idle()
        if not tracker.open or loop.time() >= deadline or force.is_set():
            break
        tracker.idle_changed.clear()
        changed = asyncio.ensure_future(tracker.idle_changed.wait())
        forced = asyncio.ensure_future(force.wait())
        await asyncio.wait([changed, forced], timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED)
        changed.cancel()
        forced.cancel()
    error = ApiError(529, "the gateway is shutting down; retry shortly")
    for protocol in list(tracker.open):
        writer = protocol.writer
        if writer is not None and not writer.finished:
            if writer.started:
                writer.write(error.sse_event())
                writer.end()
            else:
                writer.send_error(error, close=True)
        protocol.close()

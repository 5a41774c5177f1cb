"""The running service: start, reload on SIGHUP, graceful shutdown on SIGTERM.

A reload builds a new Gateway from the new config and swaps it in for new requests;
requests already running finish on the old one, whose pools close when it is idle.
Managed llama-servers whose settings did not change keep running. An invalid new config is
refused with its problems logged, and the old one stays.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from casedesk.anthropic.errors import ApiError
from casedesk.app import Gateway, render_error, respond_with_error
from casedesk.config import Config, ConfigError, Upstream, load
from casedesk.http.server import ConnectionTracker, ErrorResponse, Request, ResponseWriter, start_server
from casedesk.ops.accesslog import AccessLog
from casedesk.ops.metrics import Histogram, Labels, Metrics
from casedesk.ops.process import ManagedProcess, State, SupervisorError
from casedesk.ops.supervisor import Supervisor
from casedesk.ops.systemd import Notifier

log = logging.getLogger("casedesk")


class Service:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.supervisor = Supervisor(config)
        self.tracker = ConnectionTracker()
        self.gateway: Gateway | None = None
        self.server: asyncio.AbstractServer | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.notifier = Notifier()
        self.access_log = AccessLog(config.server.access_log)
        self.metrics = Metrics()
        self.metrics.gauge("casedesk_in_flight_requests", "Requests in flight, by deployment.", self._in_flight)
        self.metrics.gauge("casedesk_queued_requests", "Requests waiting for a slot, by deployment.", self._queued)
        self.metrics.gauge("casedesk_upstream_up", "1 while an upstream is healthy.", self._upstream_up)
        self.metrics.gauge(
            "casedesk_upstream_in_flight", "Requests in flight per upstream (its load).", self._upstream_in_flight
        )
        self.metrics.gauge(
            "casedesk_upstream_errors", "Failures seen per upstream (since start or reload).", self._upstream_errors
        )
        self.metrics.counter(
            "casedesk_write_timeouts_total",
            "Requests ended because the client took nothing for [server] write_timeout seconds.",
            lambda: self.tracker.write_timeouts,
        )
        self.metrics.gauge(
            "casedesk_model_state", "1 for the state each managed llama-server is in.", self._model_states
        )
        self.metrics.gauge(
            "casedesk_model_waiting_requests", "Requests waiting for their model to load.", self._model_waiting
        )
        self.metrics.labelled_counter(
            "casedesk_model_loads_total", "Managed llama-server loads, by result.", self._model_loads
        )
        self.metrics.labelled_histogram(
            "casedesk_model_load_seconds", "Start of a managed llama-server to healthy.", self._model_load_seconds
        )
        self.metrics.labelled_counter(
            "casedesk_model_evictions_total",
            "Managed llama-servers stopped to make room (lru) or idle past their ttl.",
            self._model_evictions,
        )
        self.metrics.labelled_counter(
            "casedesk_model_restarts_total", "Managed llama-servers that exited by themselves.", self._model_restarts
        )
        # Issue 20: slot files (ops/slotcache.py).
        slots = self.supervisor.slot_store
        self.metrics.counter(
            "casedesk_slot_files_saved_total",
            "Slots saved to a file before their model stopped.",
            lambda: slots.counts["saved"],
        )
        self.metrics.counter(
            "casedesk_slot_files_restored_total",
            "Slot files restored into a slot for a request.",
            lambda: slots.counts["restored"],
        )
        self.metrics.counter(
            "casedesk_slot_restored_tokens_total",
            "Prompt tokens restored from slot files instead of computed.",
            lambda: slots.counts["tokens_restored"],
        )
        self.metrics.labelled_counter(
            "casedesk_slot_files_dropped_total",
            "Slot files dropped or lost: bound, superseded, changed, missing, restore_failed, save_timeout.",
            lambda: [((("reason", reason),), count) for reason, count in slots.dropped.items()],
        )
        self.metrics.gauge(
            "casedesk_slot_cache_bytes",
            "Bytes of slot files on disk.",
            lambda: [((), slots.index.total_bytes())],
        )

    def _build(self, config: Config, upstreams: dict[tuple[str, str], list[Upstream]]) -> Gateway:
        gateway = Gateway(config, upstreams, self.metrics, self.access_log, self.supervisor)
        gateway.start_health_checks()
        return gateway

    def _in_flight(self) -> list[tuple[Labels, float]]:
        deployments = self.gateway.deployments if self.gateway else {}
        return [((("deployment", d),), r.admission.in_flight) for d, r in deployments.items()]

    def _queued(self) -> list[tuple[Labels, float]]:
        deployments = self.gateway.deployments if self.gateway else {}
        return [((("deployment", d),), r.admission.queued) for d, r in deployments.items()]

    def _upstreams(self) -> list[tuple[Labels, object]]:
        if self.gateway is None:
            return []
        return [
            ((("deployment", d), ("model", tag), ("upstream", state.pool.authority)), state)
            for d, route in self.gateway.deployments.items()
            for tag, model in route.models.items()
            for state in model.balancer.states
        ]

    def _upstream_up(self) -> list[tuple[Labels, float]]:
        return [(labels, 1.0 if state.healthy else 0.0) for labels, state in self._upstreams()]  # type: ignore[attr-defined]

    def _upstream_in_flight(self) -> list[tuple[Labels, float]]:
        return [(labels, state.pool.in_flight) for labels, state in self._upstreams()]  # type: ignore[attr-defined]

    def _upstream_errors(self) -> list[tuple[Labels, float]]:
        return [(labels, state.errors) for labels, state in self._upstreams()]  # type: ignore[attr-defined]

    def _models(self) -> list[tuple[Labels, ManagedProcess]]:
        processes = self.supervisor.processes.items()
        return [((("deployment", dep), ("model", tag)), process) for (dep, tag), process in processes]

    def _model_states(self) -> list[tuple[Labels, float]]:
        return [
            ((*labels, ("state", state.value)), 1.0 if process.state is state else 0.0)
            for labels, process in self._models()
            for state in State
            if state is not State.SHUTDOWN
        ]

    def _model_waiting(self) -> list[tuple[Labels, float]]:
        return [(labels, self.supervisor.waiting(process)) for labels, process in self._models()]

    def _model_loads(self) -> list[tuple[Labels, float]]:
        return [
            ((*labels, ("result", result)), count)
            for labels, process in self._models()
            for result, count in self.supervisor.stats[process].loads.items()
        ]

    def _model_load_seconds(self) -> list[tuple[Labels, Histogram]]:
        return [(labels, self.supervisor.stats[process].load_seconds) for labels, process in self._models()]

    def _model_evictions(self) -> list[tuple[Labels, float]]:
        return [
            ((*labels, ("reason", reason)), count)
            for labels, process in self._models()
            for reason, count in self.supervisor.stats[process].evictions.items()
        ]

    def _model_restarts(self) -> list[tuple[Labels, float]]:
        return [(labels, self.supervisor.stats[process].restarts) for labels, process in self._models()]

    async def handle(self, request: Request, writer: ResponseWriter) -> None:
        assert self.gateway is not None
        await self.gateway.handle(request, writer)

    def check_head(self, request: Request) -> ErrorResponse | None:
        assert self.gateway is not None
        return self.gateway.check_head(request)

    async def start(self, sock: socket.socket | None) -> None:
        # Loading big models can outlast systemd's start timeout: extend it while loading
        # (README, "Running under systemd"); READY=1 still means "serving every preload".
        extending = self.notifier.keep_extending_start("loading the models with preload = true")
        try:
            upstreams = await self.supervisor.start()
        finally:
            extending.cancel()
        self.gateway = self._build(self.config, upstreams)
        settings = self.config.server
        self.server = await start_server(
            self.handle,
            settings.limits,
            self.tracker,
            render_error,
            self.check_head,
            host=settings.listen_host,
            port=settings.listen_port,
            sock=sock,
        )
        addresses = ", ".join(str(s.getsockname()) for s in self.server.sockets)
        log.info("casedesk listening on %s; deployments: %s", addresses, ", ".join(self.gateway.deployments))
        self.notifier.ready(f"listening on {addresses}")
        self.notifier.start_watchdog()

    async def reload(self) -> bool:
        """Apply the config file again; False (old config kept) when it is not usable."""
        if self.config.path is None:
            log.error("reload: this config was not read from a file")
            return False
        self.notifier.reloading()
        try:
            new = load(self.config.path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused, the old config stays: %s", problem)
            self.notifier.ready("reload refused: the config has problems (see the log); running the old one")
            return False
        if (new.server.listen_host, new.server.listen_port) != (
            self.config.server.listen_host,
            self.config.server.listen_port,
        ):
            log.warning("reload: a new listen address takes effect only after a restart")
        try:
            retired = await self.supervisor.reconcile(new)
        except SupervisorError as exc:
            log.error("reload refused, the old config stays: %s", exc)
            self.notifier.ready("reload refused: a managed llama-server did not start; running the old config")
            return False
        upstreams = self.supervisor.upstreams()
        old = self.gateway
        self.gateway = self._build(new, upstreams)
        self.config = new
        if old is not None:
            task = asyncio.create_task(self._retire(old, retired))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        log.info("reloaded %s: deployments %s", new.path, ", ".join(self.gateway.deployments))
        self.notifier.ready(f"reloaded {new.path}")
        return True

    async def _retire(self, old: Gateway, processes: list[ManagedProcess]) -> None:
        """Close the old gateway's pools and stop unwanted servers once its requests are done."""
        while old.active:
            await asyncio.sleep(0.2)
        old.close()
        await asyncio.gather(*(self.supervisor.shutdown_process(p) for p in processes), return_exceptions=True)

    async def shutdown(self, grace: float, force: asyncio.Event) -> None:
        log.info("shutting down: no new connections; waiting up to %g s for in-flight requests", grace)
        self.notifier.stopping()
        if self.server is not None:
            self.server.close()
        await _drain(self.tracker, grace, force)
        for task in list(self._retiring):
            task.cancel()
        if self.gateway is not None:
            self.gateway.close()
        self.notifier.stop_watchdog()
        await self.supervisor.stop()
        self.access_log.close()


async def run(
    config: Config,
    *,
    sock: socket.socket | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    force: asyncio.Event | None = None,
    reload: asyncio.Event | None = None,
    shutdown_grace: float = 30.0,
    handle_signals: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), reloading on SIGHUP (or `reload`).

    A second SIGTERM/SIGINT (or `force`) ends in-flight streams at once.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    force = force or asyncio.Event()
    reload = reload or asyncio.Event()
    if handle_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: force.set() if stop.is_set() else stop.set())
        loop.add_signal_handler(signal.SIGHUP, reload.set)
    service = Service(config)
    try:
        await service.start(sock)
        if ready is not None:
            ready.set()
        while not stop.is_set():
            stopping = asyncio.ensure_future(stop.wait())
            reloading = asyncio.ensure_future(reload.wait())
            await asyncio.wait([stopping, reloading], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            reloading.cancel()
            if reload.is_set() and not stop.is_set():
                reload.clear()
                await service.reload()
        await service.shutdown(shutdown_grace, force)
    finally:
        await service.supervisor.stop()


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
        await asyncio.wait(
            [changed, forced], timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
        )
        changed.cancel()
        forced.cancel()
    error = ApiError(529, "the gateway is shutting down; retry shortly")
    for protocol in list(tracker.open):
        if protocol.writer is not None:
            respond_with_error(protocol.writer, error, close=True)
        protocol.close()

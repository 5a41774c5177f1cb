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
import time

from casedesk.anthropic.errors import ApiError
from casedesk.app import Gateway, render_error, respond_with_error
from casedesk.batches.runner import DATABASE, BatchRunner
from casedesk.batches.store import BatchStore
from casedesk.config import Config, ConfigError, UpstreamAddress, load
from casedesk.http.server import ConnectionTracker, ErrorResponse, Request, ResponseWriter, start_server
from casedesk.ops.accesslog import AccessLog, RequestRecord
from casedesk.ops.collector import ServiceCollector
from casedesk.ops.logsink import operator_lines_dropped
from casedesk.ops.metrics import Labels, Metrics
from casedesk.ops.process import ManagedProcess, SupervisorError
from casedesk.ops.supervisor import Supervisor
from casedesk.ops.systemd import Notifier
from casedesk.tenancy.state import Tenancy

log = logging.getLogger("casedesk")


class Service:
    """The process's listeners, supervisor, logs and metrics, across reloads (each config
    version is a Gateway); what /metrics reads from them is ops/collector.py's."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.supervisor = Supervisor(config)
        self.tracker = ConnectionTracker()
        self.ops_tracker = ConnectionTracker()  # the [server] ops_listen listener's connections
        self.gateway: Gateway | None = None
        self.server: asyncio.AbstractServer | None = None
        self.ops_server: asyncio.AbstractServer | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.notifier = Notifier()
        self.access_log = AccessLog(config.server.access_log)
        self.metrics = Metrics()
        self.tenancy = Tenancy()  # admission and the tenants' buckets outlive reloads
        self.metrics.gauge(
            "casedesk_tenant_bucket_tokens",
            "Tokens left in each tenant's rate-limit buckets (negative: overdrawn).",
            self._buckets,
        )
        self.metrics.counter(
            "casedesk_shared_limits_errors_total",
            "Calls to the shared rate limits' Redis that failed (requests then fail open or closed).",
            lambda: self.tenancy.shared_errors,
        )
        # Message Batches (issue 18): the runner outlives reloads, as the batches do; the
        # database is in the state directory, as the slot files are.
        self.batches = BatchRunner(
            BatchStore(config.server.state_path() / DATABASE),
            lambda: self.gateway.deployments if self.gateway is not None else {},
            self._account,
            config.server.batch_retention_days,
        )
        self._batch_metrics()
        ServiceCollector(
            self.metrics,
            lambda: self.gateway.deployments if self.gateway is not None else {},
            self.supervisor,
            write_timeouts=lambda: self.tracker.write_timeouts,
            log_lines_dropped=lambda: self.access_log.dropped + operator_lines_dropped(),
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

    def _account(self, record: RequestRecord, status: int) -> None:
        if self.gateway is not None:
            self.gateway.account(record, status)

    def _batch_metrics(self) -> None:
        batches = self.batches
        self.metrics.gauge(
            "casedesk_batches",
            "Message batches kept, by processing_status.",
            lambda: [((("processing_status", k),), v) for k, v in batches.totals[0].items()],
        )
        self.metrics.gauge(
            "casedesk_batch_items",
            "Items of the batches kept, by result type (processing: no result yet).",
            lambda: [((("result", k),), v) for k, v in batches.totals[1].items()],
        )
        self.metrics.gauge(
            "casedesk_batch_items_waiting",
            "Batch items waiting to start, by deployment.",
            lambda: [((("deployment", d),), batches.scheduler.waiting(d)) for d in self._batch_deployments()],
        )
        self.metrics.gauge(
            "casedesk_batch_items_running",
            "Batch items running, by deployment.",
            lambda: [((("deployment", d),), batches.scheduler.running(d)) for d in self._batch_deployments()],
        )

    def _batch_deployments(self) -> list[str]:
        known = set(self.gateway.deployments) if self.gateway is not None else set()
        return sorted(known | self.batches.scheduler.deployments())

    def _build(self, config: Config, upstreams: dict[tuple[str, str], list[UpstreamAddress]]) -> Gateway:
        gateway = Gateway(config, upstreams, self.metrics, self.access_log, self.supervisor, self.tenancy, self.batches)
        gateway.start_health_checks()
        return gateway

    def _buckets(self) -> list[tuple[Labels, float]]:
        now = time.monotonic()
        return [((("tenant", t), ("limit", name)), level) for t, name, level in self.tenancy.limiter.levels(now)]

    async def handle(self, request: Request, writer: ResponseWriter) -> None:
        assert self.gateway is not None
        await self.gateway.handle(request, writer)

    async def handle_ops(self, request: Request, writer: ResponseWriter) -> None:
        """A request on [server] ops_listen: /metrics, /readyz and /healthz, nothing else."""
        assert self.gateway is not None
        await self.gateway.handle(request, writer, self.gateway.ops_router)

    def check_head(self, request: Request) -> ErrorResponse | None:
        assert self.gateway is not None
        return self.gateway.check_head(request)

    def body_limit(self, request: Request) -> int:
        assert self.gateway is not None
        return self.gateway.body_limit(request)

    async def start(self, sock: socket.socket | None) -> None:
        # Loading big models can outlast systemd's start timeout: extend it while loading
        # (README, "Running under systemd"); READY=1 still means "serving every preload".
        extending = self.notifier.keep_extending_start("loading the models with preload = true")
        try:
            upstreams = await self.supervisor.start()
        finally:
            extending.cancel()
        self.gateway = self._build(self.config, upstreams)
        await self.batches.start()
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
            body_limit=self.body_limit,
        )
        addresses = ", ".join(str(s.getsockname()) for s in self.server.sockets)
        log.info("casedesk listening on %s; deployments: %s", addresses, ", ".join(self.gateway.deployments))
        if settings.ops_listen is not None:
            host, port = settings.ops_listen
            self.ops_server = await start_server(
                self.handle_ops, settings.limits, self.ops_tracker, render_error, host=host, port=port
            )
            ops = ", ".join(str(s.getsockname()) for s in self.ops_server.sockets)
            log.info("/metrics and /readyz on %s ([server] ops_listen)", ops)
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
        if new.server.ops_listen != self.config.server.ops_listen:
            log.warning("reload: a new ops_listen takes effect only after a restart")
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
        self.batches.pause()
        if self.server is not None:
            self.server.close()
        started = asyncio.get_running_loop().time()
        if self.ops_server is not None:
            self.ops_server.close()
            for protocol in list(self.ops_tracker.open):
                protocol.close()  # a scrape is not worth waiting for
        await _drain(self.tracker, grace, force)
        # Batch items get what is left of the grace; any still running then run at the next start.
        left = 0.0 if force.is_set() else grace - (asyncio.get_running_loop().time() - started)
        await self.batches.stop(max(0.0, left))
        for task in list(self._retiring):
            task.cancel()
        if self.gateway is not None:
            self.gateway.close()
        self.notifier.stop_watchdog()
        await self.supervisor.stop()
        self.tenancy.close()
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

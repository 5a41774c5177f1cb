"""The managed llama-servers of a config and the policy that runs them: loaded at boot or on
demand, stopped when idle or to make room, restarted when a preloaded one dies, stopped with
CaseDesk. Each process is a state machine of its own (ops/process.py).

Requests hold a *lease* on their model (`acquire` … `release`, serving.py's ModelState.lease):
it loads the model if needed and counts the request as in flight, so that the model is never
stopped under it. One function, `Supervisor._schedule`, decides every load, grant and
eviction, and every event calls it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from contextlib import suppress
from typing import Any

from casedesk.config import Config, ManagedServer, Upstream
from casedesk.ops.process import (
    LOADED,
    LeaseTimeout,
    LoadFailed,
    ManagedProcess,
    State,
    _Waiter,
    same_launch,
)

log = logging.getLogger("casedesk.supervisor")

_RESTART_BACKOFF_MAX = 30.0  # seconds: the longest pause before a failed model is tried again


class Supervisor:
    """All managed llama-servers of a config, and the policy that runs them.

    `max_loaded` (the `[server] max_loaded_models` key) bounds how many run at once (0: no
    bound). A request for a stopped model loads it when there is room. Otherwise the least
    recently used ready model makes room, but not at once: it keeps serving until the oldest
    waiter has waited as long as its own model's last load took (1 s before the first; a
    swap is then never more than half of the time), or until it has been idle that long.
    Then it is stopped if idle, else *drained*: requests for it that arrive while its older
    requests still run are served too (that costs no extra wait), later ones wait and ride
    its next load, and it stops when its last request ends. Requests waiting for the same
    model are all served when it is up. A model with requests in flight is never stopped.

    So a request waits at most: a load already under way (L), the hold (L), the drain (at
    most twice the longest request, 2 D), the stop, and its own load (L): 3 L + 2 D + stop,
    and never beyond its deployment's queue_timeout (then 529).
    """

    def __init__(self, config: Config) -> None:
        self.processes: dict[tuple[str, str], ManagedProcess] = {}
        self.max_loaded = config.server.max_loaded_models
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._ttl_timers: dict[ManagedProcess, asyncio.TimerHandle] = {}
        self._retry_timers: dict[ManagedProcess, asyncio.TimerHandle] = {}
        self._wake: asyncio.TimerHandle | None = None
        for key in config.managed:
            self.processes[key] = ManagedProcess(f"{key[0]}/{key[1]}", _spec(config, key))

    async def start(self) -> dict[tuple[str, str], list[Upstream]]:
        """Load every model with preload = true; the upstream URLs of all managed models."""
        for process in self.processes.values():
            if process.spec.preload:
                await self._load_now(process)
        return self.upstreams()

    async def _load_now(self, process: ManagedProcess) -> None:
        try:
            await process.load()
        except LoadFailed as exc:
            _log_failure(exc)
            raise
        self._watch(process)

    def upstreams(self) -> dict[tuple[str, str], list[Upstream]]:
        return {key: [process.upstream] for key, process in self.processes.items()}

    async def reconcile(self, config: Config) -> list[ManagedProcess]:
        """Make the managed servers match a reloaded config.

        Servers whose launch settings did not change keep running (their lifecycle keys
        take effect); new or changed ones with preload are started (if one fails, those
        just started are stopped and SupervisorError is raised, leaving everything as it
        was). Returns the servers no longer wanted: the caller stops them once the requests
        still using them are done.
        """
        wanted = {key: _spec(config, key) for key in config.managed}
        kept = {key: p for key, p in self.processes.items() if key in wanted and same_launch(p.spec, wanted[key])}
        fresh = {key: ManagedProcess(f"{key[0]}/{key[1]}", spec) for key, spec in wanted.items() if key not in kept}
        started: list[ManagedProcess] = []
        try:
            for process in fresh.values():
                if process.spec.preload:
                    await self._load_now(process)
                    started.append(process)
        except BaseException:
            await asyncio.gather(*(self._stop(p, None) for p in started), return_exceptions=True)
            raise
        for key, process in kept.items():
            process.spec = wanted[key]
        retired = [p for key, p in self.processes.items() if key not in kept]
        for process in retired:
            self._forget(process)
        self.processes = {**kept, **fresh}
        self.max_loaded = config.server.max_loaded_models
        self._schedule()
        return retired

    async def stop(self) -> None:
        """Stop every server (after a load under way gave up) and refuse new leases."""
        self._closed = True
        if self._wake is not None:
            self._wake.cancel()
        self._schedule()  # fails whoever still waits
        await asyncio.gather(*(self.shutdown_process(p) for p in self.processes.values()), return_exceptions=True)

    async def shutdown_process(self, process: ManagedProcess) -> None:
        """Stop one server for good (a retired one, or at shutdown): a load under way gives
        up (through stopping), a stop under way finishes."""
        self._forget(process)
        if process.task is not None and not process.task.done():
            if process.state is State.STARTING:
                process.task.cancel()
            with suppress(BaseException):
                await process.task
        if process.state is State.READY:
            await process.unload()
        if process.state is State.STOPPED:
            process._to(State.SHUTDOWN)

    def _forget(self, process: ManagedProcess) -> None:
        for timers in (self._ttl_timers, self._retry_timers):
            handle = timers.pop(process, None)
            if handle is not None:
                handle.cancel()
        process.keep_running = False

    # Leases: the request path's one hook.

    def _can_serve(self, process: ManagedProcess) -> bool:
        return process.state is State.READY and (process.drain_from is None or process.old_in_flight > 0)

    async def acquire(self, process: ManagedProcess, timeout: float) -> int:
        """Wait until `process` can take one more request and count it in flight; the
        lease's ticket, for `release`."""
        if self._can_serve(process) and not process.waiters:
            return self._grant(process)
        if self._closed or process.state is State.SHUTDOWN:
            raise LoadFailed(process.name, "CaseDesk is shutting down", [])
        if process.failure is not None and process.state is State.STOPPED and time.monotonic() < process.retry_at:
            raise process.failure  # failed a moment ago: fail at once rather than reload in a loop
        waiter = _Waiter(asyncio.get_running_loop().create_future(), time.monotonic())
        process.waiters.append(waiter)
        self._schedule()
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except (asyncio.CancelledError, TimeoutError) as exc:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(process, future.result())  # granted as we left: give it back
            else:
                with suppress(ValueError):
                    process.waiters.remove(waiter)
                self._schedule()  # a drain nobody waits for any more is called off
            if isinstance(exc, TimeoutError):
                raise LeaseTimeout from None
            raise

    def _grant(self, process: ManagedProcess) -> int:
        process.in_flight += 1
        process.tickets += 1
        process.last_used = time.monotonic()
        timer = self._ttl_timers.pop(process, None)
        if timer is not None:
            timer.cancel()
        return process.tickets

    def release(self, process: ManagedProcess, ticket: int) -> None:
        """The request holding lease `ticket` on `process` is done with it."""
        process.in_flight -= 1
        process.last_used = time.monotonic()
        if process.drain_from is not None and ticket <= process.drain_from:
            process.old_in_flight -= 1
        ttl = process.spec.ttl
        if process.in_flight == 0 and ttl > 0 and not self._closed and process.state is State.READY:
            loop = asyncio.get_running_loop()
            self._ttl_timers[process] = loop.call_later(ttl, self._ttl_expired, process)
        self._schedule()

    def _ttl_expired(self, process: ManagedProcess) -> None:
        self._ttl_timers.pop(process, None)
        if process.state is State.READY and process.in_flight == 0 and not process.waiters:
            log.info("llama-server for %s idle for %g s (ttl): stopping it", process.name, process.spec.ttl)
            self._begin_stop(process, "ttl")

    # The one place that decides.

    def _schedule(self) -> None:
        """Grant, load and evict after any event: a lease asked for or given back, a load or
        stop finished, a process died, a retry came due."""
        processes = list(self.processes.values())
        if self._closed:
            for process in processes:
                _fail_waiters(process, LoadFailed(process.name, "CaseDesk is shutting down", []))
            return
        now = time.monotonic()
        self._grant_waiters(processes)  # before any eviction: a model just loaded serves its waiters
        # Stopped models that are wanted, oldest waiter first.
        wanted = sorted(
            (p for p in processes if p.state is State.STOPPED and p.task is None and (p.waiters or p.keep_running)),
            key=lambda p: p.waiters[0].since if p.waiters else now,
        )
        free = len(processes) if not self.max_loaded else self.max_loaded
        free -= sum(p.state in LOADED for p in processes)
        blocked: list[ManagedProcess] = []
        for process in wanted:
            if process.retry_at > now:  # backing off: a failed load fails its waiters at once,
                if process.failure is not None:  # a crashed one's wait for its restart
                    _fail_waiters(process, process.failure)
                self._retry_later(process)
            elif free > 0:
                free -= 1
                self._begin_load(process)
            elif process.waiters:
                blocked.append(process)
        # Make room: one eviction per blocked model, counting stops already under way.
        needed = len(blocked) - sum(p.state is State.STOPPING for p in processes)
        victims = sorted(
            (p for p in processes if p.state is State.READY),
            key=lambda p: (p.drain_from is None, bool(p.waiters), p.in_flight > 0, p.last_used),
        )
        chosen = victims[: max(0, needed)]
        # No thrash: a swap is worth it once the oldest waiter has waited as long as its
        # model's load takes (ski rental: time lost to swaps <= time spent serving).
        hold = _swap_hold(blocked[0]) if blocked else 0.0
        waited = now - blocked[0].waiters[0].since if blocked else 0.0
        for process in victims:
            if process not in chosen:
                process.drain_from = None
            elif process.drain_from is not None:
                if process.in_flight == 0:
                    self._begin_stop(process, "lru")
            elif process.in_flight == 0 and (waited >= hold or now - process.last_used >= hold):
                self._begin_stop(process, "lru")
            elif waited < hold:
                self._wake_at(blocked[0].waiters[0].since + hold)
            else:
                process.drain_from = process.tickets
                process.old_in_flight = process.in_flight
                log.info("llama-server for %s is draining (%d in flight) to make room", process.name, process.in_flight)
        self._grant_waiters(processes)  # a drain called off

    def _grant_waiters(self, processes: list[ManagedProcess]) -> None:
        for process in processes:
            if process.waiters and self._can_serve(process):
                while process.waiters:
                    waiter = process.waiters.popleft()
                    if not waiter.future.done():
                        waiter.future.set_result(self._grant(process))

    def _begin_load(self, process: ManagedProcess) -> None:
        process._to(State.STARTING)
        self._track(process, self._load(process))

    def _begin_stop(self, process: ManagedProcess, reason: str | None) -> None:
        if reason is not None:
            process.evictions[reason] += 1
            process.keep_running = False
        process.drain_from = None
        process._to(State.STOPPING)
        self._track(process, self._stop(process, reason))

    def _track(self, process: ManagedProcess, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        process.task = task
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if process.task is task:
                process.task = None
            if not self._closed:
                self._schedule()

        task.add_done_callback(done)

    async def _load(self, process: ManagedProcess) -> None:
        try:
            await process.load()
        except LoadFailed as exc:
            _log_failure(exc)
            process.failure = exc
            process.failures += 1
            process.retry_at = time.monotonic() + min(_RESTART_BACKOFF_MAX, 2.0 ** (process.failures - 1))
            _fail_waiters(process, exc)
            return
        process.failure, process.failures, process.retry_at = None, 0, 0.0
        process.drain_from = None
        self._watch(process)

    async def _stop(self, process: ManagedProcess, reason: str | None) -> None:
        if reason is not None:
            log.info("stopping llama-server for %s (%s)", process.name, reason)
        await process.unload()

    def _watch(self, process: ManagedProcess) -> None:
        """When a ready process dies by itself: through stopping to stopped, and restarted
        (with backoff) if it is preloaded; an on-demand one loads again on its next request."""
        exit_task = process.watch()
        generation = process.generation

        def exited(task: asyncio.Task[int]) -> None:
            if task.cancelled() or process.generation != generation or process.state is not State.READY:
                return  # stopped on purpose
            if self._closed:
                return  # shutdown_process stops it
            tail = "\n  ".join(process.stderr_tail)
            log.error(
                "llama-server for %s exited with code %s; its stderr ended with:\n  %s",
                process.name,
                task.result(),
                tail,
            )
            process.restarts += 1
            if process.keep_running:
                process.failures += 1
                process.retry_at = time.monotonic() + min(_RESTART_BACKOFF_MAX, 2.0 ** (process.failures - 1))
            process._to(State.STOPPING)
            self._track(process, process.unload())

        exit_task.add_done_callback(exited)

    def _wake_at(self, when: float) -> None:
        """Run _schedule again at monotonic time `when` (the earliest asked for wins)."""
        loop = asyncio.get_running_loop()
        at = loop.time() + max(0.0, when - time.monotonic())
        if self._wake is not None:
            if self._wake.when() <= at:
                return
            self._wake.cancel()
        self._wake = loop.call_at(at, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._schedule()

    def _retry_later(self, process: ManagedProcess) -> None:
        if process in self._retry_timers or not process.keep_running:
            return
        delay = max(0.0, process.retry_at - time.monotonic())

        def due() -> None:
            self._retry_timers.pop(process, None)
            self._schedule()

        self._retry_timers[process] = asyncio.get_running_loop().call_later(delay, due)


def _spec(config: Config, key: tuple[str, str]) -> ManagedServer:
    spec = config.deployments[key[0]].models[key[1]].llama_server
    assert spec is not None
    return spec


def _swap_hold(process: ManagedProcess) -> float:
    loads = process.load_seconds
    return loads.last if loads.count else 1.0


def _fail_waiters(process: ManagedProcess, error: Exception) -> None:
    while process.waiters:
        waiter = process.waiters.popleft()
        if not waiter.future.done():
            waiter.future.set_exception(error)


def _log_failure(exc: LoadFailed) -> None:
    tail = "\n  ".join(exc.stderr) if exc.stderr else "(nothing)"
    log.error("%s; its stderr ended with:\n  %s", exc, tail)

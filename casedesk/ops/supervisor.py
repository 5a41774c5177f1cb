"""The managed llama-servers of a config, run as the scheduler (ops/scheduler.py) decides:
loaded at boot or on demand, stopped when idle or to make room, restarted when a preloaded one
dies, stopped with CaseDesk. Each process is a state machine of its own (ops/process.py).

Requests hold a *lease* on their model (`acquire` … `release`, serving.py's ModelState.lease):
it loads the model if needed and counts the request as in flight, so that the model is never
stopped under it. This layer only does I/O: it turns each event into a scheduler call with the
time of its one clock, runs the actions that come back (grant and fail futures, load and stop
tasks, one timer), and feeds their results back as events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import Any

from casedesk.config import Config, ManagedServer, UpstreamAddress
from casedesk.ops.metrics import ModelStats
from casedesk.ops.process import LeaseTimeout, LoadFailed, ManagedProcess, State, same_launch
from casedesk.ops.scheduler import Action, Drain, Fail, Grant, Load, Scheduler, Stop, WakeAt
from casedesk.ops.slotcache import RunSlots, SlotStore, open_run
from casedesk.upstream.pool import UpstreamPool

log = logging.getLogger("casedesk.supervisor")

Clock = Callable[[], float]
_NO_SLOT_SAVE = frozenset({"--mmproj", "-mm", "--mmproj-url", "-mmu"})  # llama.cpp refuses to save these


class LeaseRequest:
    """A request waiting for a lease: the future its ticket arrives on."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[int]) -> None:
        self.future = future


class Supervisor:
    """All managed llama-servers of a config (the policy: ops/scheduler.py's docstring)."""

    def __init__(self, config: Config, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.processes: dict[tuple[str, str], ManagedProcess] = {}
        self.stats: dict[ManagedProcess, ModelStats] = {}
        self.scheduler: Scheduler[ManagedProcess, LeaseRequest] = Scheduler(config.server.max_loaded_models)
        self._tasks: dict[ManagedProcess, asyncio.Task[None]] = {}  # the load or stop under way
        self._wake: asyncio.TimerHandle | None = None
        # Slot files (issue 20): each run's slots, saved before it stops, restored on demand.
        settings = config.server
        self.slot_store = SlotStore(settings.state_path() / "slots", settings.slot_cache_bytes)
        self.slot_save_timeout = settings.slot_save_timeout
        self.runs: dict[ManagedProcess, RunSlots] = {}
        for key in config.managed:
            self.processes[key] = process = self._new_process(config, key)
            self._add(process, None)

    def _new_process(self, config: Config, key: tuple[str, str]) -> ManagedProcess:
        stats = ModelStats()
        spec = _spec(config, key)
        process = ManagedProcess(f"{key[0]}/{key[1]}", spec, stats.on_transition)
        self.stats[process] = stats
        if config.server.slot_cache_bytes and not config.deployments[key[0]].models[key[1]].upstreams:
            if any(arg in _NO_SLOT_SAVE for arg in spec.args):
                log.info("%s: a vision projector (--mmproj): llama-server cannot save its slots", process.name)
            else:
                directory = self.slot_store.directory(process.name)
                try:
                    directory.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    log.warning("%s: no slot cache: cannot create %s (%s)", process.name, directory, exc)
                    return process
                # --swa-full: a sliding-window model's restored slot is reused only with it
                # (docs/llama-server-facts.md, "Slot files"); other models ignore it.
                swa = () if "--swa-full" in spec.args else ("--swa-full",)
                process.extra_args = ("--slot-save-path", str(directory.resolve()), *swa)
        return process

    async def start(self) -> dict[tuple[str, str], list[UpstreamAddress]]:
        """Load every model with preload = true; the upstream URLs of all managed models."""
        for process in self.processes.values():
            if process.spec.preload:
                self._add(process, await self._load_now(process))
        return self.upstreams()

    def _add(self, process: ManagedProcess, load_seconds: float | None) -> None:
        spec = process.spec
        ready = load_seconds is not None
        self.scheduler.add(
            process, keep_running=spec.preload, ttl=spec.ttl, ready=ready, load_seconds=load_seconds or 0
        )

    async def _load_now(self, process: ManagedProcess) -> float:
        """A preload, outside the scheduler: its failure stops CaseDesk's start (or a reload)."""
        began = self.clock()
        try:
            await process.load()
        except LoadFailed as exc:
            _log_failure(exc)
            raise
        self._watch(process)
        await self._open_slots(process)
        return self.clock() - began

    def upstreams(self) -> dict[tuple[str, str], list[UpstreamAddress]]:
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
        fresh = {key: self._new_process(config, key) for key in wanted if key not in kept}
        loaded: dict[ManagedProcess, float] = {}
        try:
            for process in fresh.values():
                if process.spec.preload:
                    loaded[process] = await self._load_now(process)
        except BaseException:
            await asyncio.gather(*(self._shut(p) for p in loaded), return_exceptions=True)
            raise
        now = self.clock()
        for key, process in kept.items():
            process.spec = wanted[key]
            self._apply(
                self.scheduler.update(process, keep_running=process.spec.preload, ttl=process.spec.ttl, now=now)
            )
        retired = [p for key, p in self.processes.items() if key not in kept]
        for process in retired:
            self._apply(self.scheduler.retire(process))
        for process in fresh.values():
            self._add(process, loaded.get(process))
        self.processes = {**kept, **fresh}
        self._apply(self.scheduler.set_max_loaded(config.server.max_loaded_models, self.clock()))
        return retired

    async def stop(self) -> None:
        """Stop every server (after a load under way gave up) and refuse new leases."""
        if self._wake is not None:
            self._wake.cancel()
        self._apply(self.scheduler.close())
        await asyncio.gather(*(self.shutdown_process(p) for p in self.processes.values()), return_exceptions=True)

    async def shutdown_process(self, process: ManagedProcess) -> None:
        """Stop one server for good (a retired one, or at shutdown): a load under way gives
        up (through stopping), a stop under way finishes."""
        self._apply(self.scheduler.remove(process))
        await self._shut(process)

    async def _shut(self, process: ManagedProcess) -> None:
        task = self._tasks.get(process)
        if task is not None and not task.done():
            if process.state is State.STARTING:
                task.cancel()
            with suppress(BaseException):
                await task
        if process.state is State.READY:
            await self._save_slots(process)
            await process.unload()
        if process.state is State.STOPPED:
            process.shutdown()

    # What metrics, readiness and the request path read.

    def waiting(self, process: ManagedProcess) -> int:
        return self.scheduler.waiting(process)

    def slots(self, process: ManagedProcess) -> RunSlots | None:
        """The running model's slots, when its prompt caches are kept (issue 20)."""
        return self.runs.get(process) if process.state is State.READY else None

    def failure(self, process: ManagedProcess) -> LoadFailed | None:
        failure = self.scheduler.failure(process)
        return failure if isinstance(failure, LoadFailed) else None

    # Leases: the request path's one hook.

    async def acquire(self, process: ManagedProcess, timeout: float) -> int:
        """Wait until `process` can take one more request and count it in flight; the
        lease's ticket, for `release`."""
        lease = LeaseRequest(asyncio.get_running_loop().create_future())
        self._apply(self.scheduler.request(process, lease, self.clock()))
        future = lease.future
        if future.done():
            return future.result()  # granted (or failed) at once
        try:
            async with asyncio.timeout(timeout):
                return await future
        except (asyncio.CancelledError, TimeoutError) as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(process, future.result())  # granted as we left: give it back
            else:
                self._apply(self.scheduler.withdraw(process, lease, self.clock()))
            if isinstance(exc, TimeoutError):
                raise LeaseTimeout from None
            raise

    def release(self, process: ManagedProcess, ticket: int) -> None:
        """The request holding lease `ticket` on `process` is done with it."""
        self._apply(self.scheduler.release(process, ticket, self.clock()))

    # Running the actions.

    def _apply(self, actions: list[Action[ManagedProcess, LeaseRequest]]) -> None:
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Grant):
                if action.waiter.future.done():  # its request left as it was granted
                    queue.extend(self.scheduler.release(action.model, action.ticket, self.clock()))
                else:
                    action.waiter.future.set_result(action.ticket)
            elif isinstance(action, Fail):
                if not action.waiter.future.done():
                    failure = action.failure or LoadFailed(action.model.name, action.reason, [])
                    action.waiter.future.set_exception(failure)
            elif isinstance(action, Load):
                self._run(action.model, self._load(action.model))
            elif isinstance(action, Stop):
                self._begin_stop(action.model, action.reason)
            elif isinstance(action, Drain):
                log.info(
                    "llama-server for %s is draining (%d in flight) to make room", action.model.name, action.in_flight
                )
            elif isinstance(action, WakeAt):
                self._wake_at(action.when)

    def _run(self, process: ManagedProcess, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"llama-server {process.name}")
        self._tasks[process] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._tasks.get(process) is finished:
                del self._tasks[process]

        task.add_done_callback(done)

    async def _load(self, process: ManagedProcess) -> None:
        began = self.clock()
        try:
            await process.load()
        except LoadFailed as exc:
            _log_failure(exc)
            self._apply(self.scheduler.load_failed(process, exc, self.clock()))
            return
        self._watch(process)
        await self._open_slots(process)
        self._apply(self.scheduler.loaded(process, self.clock(), self.clock() - began))

    def _begin_stop(self, process: ManagedProcess, reason: str) -> None:
        self.stats[process].stopped(reason)
        if reason == "exited":
            log.error(
                "llama-server for %s exited with code %s; its stderr ended with:\n  %s",
                process.name,
                process.process.returncode if process.process is not None else "?",
                "\n  ".join(process.stderr_tail),
            )
        elif reason == "ttl":
            log.info("llama-server for %s idle for %g s (ttl): stopping it", process.name, process.spec.ttl)
        else:
            log.info("stopping llama-server for %s (%s)", process.name, reason)
        self._run(process, self._stop(process, save=reason != "exited"))

    async def _stop(self, process: ManagedProcess, save: bool) -> None:
        if save:
            await self._save_slots(process)
        elif (run := self.runs.pop(process, None)) is not None:
            run.pool.close()  # it died: nothing left to save
        await process.unload()
        self._apply(self.scheduler.stopped(process, self.clock()))

    async def _open_slots(self, process: ManagedProcess) -> None:
        if process.extra_args:
            pool = UpstreamPool(process.spec.host, process.port, 1, 5.0)
            run = await open_run(self.slot_store, process.name, process.command, pool)
            if run is not None:
                self.runs[process] = run
            else:
                pool.close()

    async def _save_slots(self, process: ManagedProcess) -> None:
        """Before a planned stop: the run's slots saved, within slot_save_timeout."""
        run = self.runs.pop(process, None)
        if run is not None:
            try:
                await run.save_all(self.slot_save_timeout)
            finally:
                run.pool.close()

    def _watch(self, process: ManagedProcess) -> None:
        """A ready process that dies by itself is an event (`exited`) for the scheduler."""
        exit_task = process.watch()
        generation = process.generation

        def exited(task: asyncio.Task[int]) -> None:
            if task.cancelled() or process.generation != generation or process.state is not State.READY:
                return  # stopped on purpose
            self._apply(self.scheduler.exited(process, self.clock()))

        exit_task.add_done_callback(exited)

    def _wake_at(self, when: float) -> None:
        """One timer: `tick` at clock time `when` (each WakeAt replaces the previous one)."""
        if self._wake is not None:
            self._wake.cancel()
        self._wake = asyncio.get_running_loop().call_later(max(0.0, when - self.clock()), self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._apply(self.scheduler.tick(self.clock()))


def _spec(config: Config, key: tuple[str, str]) -> ManagedServer:
    spec = config.deployments[key[0]].models[key[1]].llama_server
    assert spec is not None
    return spec


def _log_failure(exc: LoadFailed) -> None:
    tail = "\n  ".join(exc.stderr) if exc.stderr else "(nothing)"
    log.error("%s; its stderr ended with:\n  %s", exc, tail)

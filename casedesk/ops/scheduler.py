"""When each managed model loads, serves, drains and stops: a decision core without I/O.

Events and the time go in (a request waiting or withdrawn, a lease released, a load finished
or failed, a process exited, a stop finished, the timer fired); actions come out (grant, fail,
load, stop, drain, wake at). It owns its state, reads no clock and starts nothing: the
Supervisor (ops/supervisor.py) runs the actions and feeds their results back, so the policy
is tested exactly on a fake clock (tests/test_scheduler.py). docs/design.md, "Decision cores".

The policy (`max_loaded` bounds how many models hold memory at once; 0: no bound). A request
for a stopped model loads it when there is room. Otherwise the least recently used ready model
makes room, but not at once: it keeps serving until the oldest waiter has waited as long as its
own model's last load took (1 s before the first: `FIRST_HOLD`; a swap is then never more than
half of the time), or until it has been idle that long. Then it is stopped if idle, else
*drained*: requests for it that arrive while its older requests still run are served too (that
costs no extra wait), later ones wait and ride its next load, and it stops when its last
request ends. Requests waiting for the same model are all served when it is up. A model with
requests in flight is never stopped.

So with two models and one place, a request waits at most 3 L + 3 D + 2 S (L the load time,
or FIRST_HOLD before the first load; D the longest request; S the stop time), and never beyond
its deployment's queue_timeout (the Supervisor's: then 529). Either a load already under way
(L), the hold (L), the victim's drain (at most twice the longest request, 2 D), its stop and
its own load: 3 L + 2 D + S; or, arriving just after its own model's drain stopped taking
newcomers, the rest of a newcomer (D), that stop (S), the other's load (L), the other's drain
(2 D: its hold is spent already), its stop and its own load: 2 L + 3 D + 2 S. A hypothesis
property checks the bound (tests/test_scheduler.py), and an example reaches beyond 3 L + 2 D + S.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

FIRST_HOLD = 1.0  # seconds a waiter lets a victim serve before the first load was measured
BACKOFF_MAX = 30.0  # seconds: the longest pause before a failed model is tried again

K = TypeVar("K", bound=Hashable)  # a model
W = TypeVar("W", bound=Hashable)  # a waiting request


class Phase(enum.Enum):
    """The scheduler's view of a model (the process's own states are ops/process.py's)."""

    STOPPED = "stopped"
    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"


HOLDING_MEMORY = frozenset({Phase.LOADING, Phase.READY, Phase.STOPPING})


@dataclass(frozen=True, slots=True)
class Grant(Generic[K, W]):
    """`waiter` may use `model`: its lease is `ticket` (give it back with `release`)."""

    model: K
    waiter: W
    ticket: int


@dataclass(frozen=True, slots=True)
class Fail(Generic[K, W]):
    """`waiter` gives up: `failure` is the load's error (None: `reason` says why)."""

    model: K
    waiter: W
    failure: Exception | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Load(Generic[K]):
    model: K


@dataclass(frozen=True, slots=True)
class Stop(Generic[K]):
    """Stop `model`: "lru" (making room), "ttl" (idle), "exited" (it died: reap it)."""

    model: K
    reason: str


@dataclass(frozen=True, slots=True)
class Drain(Generic[K]):
    """`model` will stop once the `in_flight` requests it holds now (and newcomers) end."""

    model: K
    in_flight: int


@dataclass(frozen=True, slots=True)
class WakeAt:
    """Call `tick` at `when` (replaces any earlier WakeAt)."""

    when: float


Action = Grant[K, W] | Fail[K, W] | Load[K] | Stop[K] | Drain[K] | WakeAt


@dataclass(slots=True)
class _Model(Generic[W]):
    keep_running: bool  # load it without a request, and again when it dies (preload)
    ttl: float  # idle this long: stopped (0: never)
    phase: Phase = Phase.STOPPED
    retired: bool = False  # its config is gone: serves what it can, never loads again
    waiters: deque[tuple[W, float]] = field(default_factory=deque)  # (waiter, since), oldest first
    in_flight: int = 0
    tickets: int = 0  # leases granted so far: each lease's number
    last_used: float = 0.0
    drain_from: int | None = None  # chosen for eviction at this ticket: no new leases once old ones end
    old_in_flight: int = 0  # leases numbered up to drain_from, still running
    idle_until: float | None = None  # the TTL's deadline while idle
    failure: Exception | None = None  # the last load's failure, until a load succeeds
    failures: int = 0
    retry_at: float = float("-inf")  # backing off until then
    last_load: float | None = None  # seconds the last load took

    def can_serve(self) -> bool:
        return self.phase is Phase.READY and (self.drain_from is None or self.old_in_flight > 0)


class Scheduler(Generic[K, W]):
    """Every load, grant and eviction of a set of models, decided in one place (`_decide`)."""

    def __init__(self, max_loaded: int = 0) -> None:
        self.max_loaded = max_loaded
        self.closed = False
        self._models: dict[K, _Model[W]] = {}

    # Models: the config's.

    def add(self, model: K, *, keep_running: bool, ttl: float, ready: bool = False, load_seconds: float = 0.0) -> None:
        """A new model, stopped, or already loaded (a preload the Supervisor ran itself)."""
        entry = self._models[model] = _Model[W](keep_running, ttl)
        if ready:
            entry.phase, entry.last_load = Phase.READY, load_seconds

    def update(self, model: K, *, keep_running: bool, ttl: float, now: float) -> list[Action[K, W]]:
        """A reloaded config changed a model's lifecycle keys."""
        entry = self._models[model]
        entry.keep_running, entry.ttl = keep_running, ttl
        return self._decide(now)

    def retire(self, model: K) -> list[Action[K, W]]:
        """The model left the config: its waiters fail, it never loads again, and it no longer
        counts against max_loaded; until `remove`, a ready one still serves its old requests."""
        entry = self._models.get(model)
        if entry is None:
            return []
        entry.retired, entry.keep_running = True, False
        return self._fail_waiters(model, entry, None, "its config was reloaded without it")

    def remove(self, model: K) -> list[Action[K, W]]:
        """Forget the model (the Supervisor shuts its process down)."""
        entry = self._models.pop(model, None)
        return [] if entry is None else self._fail_waiters(model, entry, None, "CaseDesk is shutting down")

    def set_max_loaded(self, max_loaded: int, now: float) -> list[Action[K, W]]:
        self.max_loaded = max_loaded
        return self._decide(now)

    def close(self) -> list[Action[K, W]]:
        """Shutting down: every waiter fails, nothing loads any more."""
        self.closed = True
        actions: list[Action[K, W]] = []
        for model, entry in self._models.items():
            actions += self._fail_waiters(model, entry, None, "CaseDesk is shutting down")
        return actions

    # What the Supervisor and its metrics read.

    def phase(self, model: K) -> Phase:
        return self._models[model].phase

    def waiting(self, model: K) -> int:
        entry = self._models.get(model)
        return len(entry.waiters) if entry is not None else 0

    def failure(self, model: K) -> Exception | None:
        entry = self._models.get(model)
        return entry.failure if entry is not None else None

    def draining(self, model: K) -> bool:
        entry = self._models.get(model)
        return entry is not None and entry.drain_from is not None

    # Events.

    def request(self, model: K, waiter: W, now: float) -> list[Action[K, W]]:
        """A request wants a lease on `model`."""
        entry = self._models.get(model)
        if entry is None or self.closed:
            return [Fail(model, waiter, None, "CaseDesk is shutting down")]
        if entry.can_serve() and not entry.waiters:
            return [self._grant(model, entry, waiter, now)]
        if entry.retired:
            return [Fail(model, waiter, None, "its config was reloaded without it")]
        if entry.failure is not None and entry.phase is Phase.STOPPED and now < entry.retry_at:
            return [Fail(model, waiter, entry.failure)]  # failed a moment ago: not a reload loop
        entry.waiters.append((waiter, now))
        return self._decide(now)

    def withdraw(self, model: K, waiter: W, now: float) -> list[Action[K, W]]:
        """A waiting request gave up (its queue_timeout, or its client left)."""
        entry = self._models.get(model)
        if entry is None:
            return []
        for index, (waiting, _) in enumerate(entry.waiters):
            if waiting == waiter:
                del entry.waiters[index]
                break
        return self._decide(now)  # a drain nobody waits for any more is called off

    def release(self, model: K, ticket: int, now: float) -> list[Action[K, W]]:
        """The request holding lease `ticket` on `model` is done with it."""
        entry = self._models.get(model)
        if entry is None:
            return []
        entry.in_flight -= 1
        entry.last_used = now
        if entry.drain_from is not None and ticket <= entry.drain_from:
            entry.old_in_flight -= 1
        if entry.in_flight == 0 and entry.ttl > 0 and entry.phase is Phase.READY:
            entry.idle_until = now + entry.ttl
        return self._decide(now)

    def loaded(self, model: K, now: float, seconds: float) -> list[Action[K, W]]:
        """A Load finished: the model serves."""
        entry = self._models.get(model)
        if entry is None or entry.phase is not Phase.LOADING:
            return []
        entry.phase = Phase.READY
        entry.failure, entry.failures, entry.retry_at = None, 0, float("-inf")
        entry.drain_from, entry.last_load = None, seconds
        return self._decide(now)

    def load_failed(self, model: K, failure: Exception, now: float) -> list[Action[K, W]]:
        """A Load gave up (nothing left running): its waiters fail, and it backs off."""
        entry = self._models.get(model)
        if entry is None or entry.phase is not Phase.LOADING:
            return []
        entry.phase = Phase.STOPPED
        entry.failure = failure
        entry.failures += 1
        entry.retry_at = now + _backoff(entry.failures)
        return self._fail_waiters(model, entry, failure) + self._decide(now)

    def exited(self, model: K, now: float) -> list[Action[K, W]]:
        """A ready model's process died by itself: reap it; a kept one restarts after a backoff."""
        entry = self._models.get(model)
        if entry is None or self.closed or entry.phase is not Phase.READY:
            return []  # stopping already (or shutting down: the Supervisor stops it)
        if entry.keep_running:
            entry.failures += 1
            entry.retry_at = now + _backoff(entry.failures)
        return self._stop(model, entry, "exited") + self._decide(now)

    def stopped(self, model: K, now: float) -> list[Action[K, W]]:
        """A Stop finished: its memory is free."""
        entry = self._models.get(model)
        if entry is None or entry.phase is not Phase.STOPPING:
            return []
        entry.phase = Phase.STOPPED
        return self._decide(now)

    def tick(self, now: float) -> list[Action[K, W]]:
        """A WakeAt came due."""
        return self._decide(now)

    # The one place that decides.

    def _decide(self, now: float) -> list[Action[K, W]]:
        if self.closed:
            return []
        actions: list[Action[K, W]] = []
        deadlines: list[float] = []
        models = [(key, entry) for key, entry in self._models.items() if not entry.retired]
        self._grant_waiters(models, now, actions)  # before any eviction: a model just loaded serves its waiters
        for key, entry in models:  # idle past its TTL
            if entry.idle_until is not None and entry.phase is Phase.READY and not entry.waiters:
                if entry.in_flight == 0 and now >= entry.idle_until:
                    actions += self._stop(key, entry, "ttl")
                elif entry.in_flight == 0:
                    deadlines.append(entry.idle_until)
        # Stopped models that are wanted, oldest waiter first.
        wanted = sorted(
            ((k, e) for k, e in models if e.phase is Phase.STOPPED and (e.waiters or e.keep_running)),
            key=lambda item: item[1].waiters[0][1] if item[1].waiters else now,
        )
        free = (self.max_loaded or len(models)) - sum(e.phase in HOLDING_MEMORY for _, e in models)
        blocked: list[_Model[W]] = []
        for key, entry in wanted:
            if entry.retry_at > now:  # backing off: a failed load fails its waiters at once,
                if entry.failure is not None:  # a crashed one's wait for its restart
                    actions += self._fail_waiters(key, entry, entry.failure)
                if entry.waiters or entry.keep_running:
                    deadlines.append(entry.retry_at)
            elif free > 0:
                free -= 1
                entry.phase = Phase.LOADING
                actions.append(Load(key))
            elif entry.waiters:
                blocked.append(entry)
        # Make room: one eviction per blocked model, counting stops already under way.
        needed = len(blocked) - sum(e.phase is Phase.STOPPING for _, e in models)
        victims = sorted(
            ((k, e) for k, e in models if e.phase is Phase.READY),
            key=lambda item: (
                item[1].drain_from is None,
                bool(item[1].waiters),
                item[1].in_flight > 0,
                item[1].last_used,
            ),
        )
        chosen = {k for k, _ in victims[: max(0, needed)]}
        # No thrash: a swap is worth it once the oldest waiter has waited as long as its
        # model's load takes (ski rental: time lost to swaps <= time spent serving).
        hold = _hold(blocked[0]) if blocked else 0.0
        since = blocked[0].waiters[0][1] if blocked else now
        held = now >= since + hold  # (one comparison, so that WakeAt(since + hold) is due then)
        for key, entry in victims:
            if key not in chosen:
                entry.drain_from = None
            elif entry.drain_from is not None:
                if entry.in_flight == 0:
                    actions += self._stop(key, entry, "lru")
            elif entry.in_flight == 0 and (held or now >= entry.last_used + hold):
                actions += self._stop(key, entry, "lru")
            elif not held:  # look again when the waiter has waited the hold, or the idle victim idled it
                deadlines.append(min(since, entry.last_used) + hold if entry.in_flight == 0 else since + hold)
            else:
                entry.drain_from, entry.old_in_flight = entry.tickets, entry.in_flight
                actions.append(Drain(key, entry.in_flight))
        self._grant_waiters(models, now, actions)  # a drain called off
        if deadlines:
            actions.append(WakeAt(min(deadlines)))
        return actions

    def _grant(self, model: K, entry: _Model[W], waiter: W, now: float) -> Grant[K, W]:
        entry.in_flight += 1
        entry.tickets += 1
        entry.last_used = now
        entry.idle_until = None
        return Grant(model, waiter, entry.tickets)

    def _grant_waiters(self, models: list[tuple[K, _Model[W]]], now: float, actions: list[Action[K, W]]) -> None:
        for key, entry in models:
            while entry.waiters and entry.can_serve():
                waiter, _ = entry.waiters.popleft()
                actions.append(self._grant(key, entry, waiter, now))

    def _stop(self, model: K, entry: _Model[W], reason: str) -> list[Action[K, W]]:
        if reason != "exited":
            entry.keep_running = False  # evicted or idle: it loads again on its next request
        entry.phase, entry.drain_from, entry.idle_until = Phase.STOPPING, None, None
        return [Stop(model, reason)]

    def _fail_waiters(
        self, model: K, entry: _Model[W], failure: Exception | None, reason: str = ""
    ) -> list[Action[K, W]]:
        failed: list[Action[K, W]] = [Fail(model, waiter, failure, reason) for waiter, _ in entry.waiters]
        entry.waiters.clear()
        return failed


def _hold(entry: _Model[W]) -> float:
    return entry.last_load if entry.last_load is not None else FIRST_HOLD


def _backoff(failures: int) -> float:
    return min(BACKOFF_MAX, 2.0 ** (failures - 1))

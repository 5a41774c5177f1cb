"""Which batch item starts next, decided without I/O: events and `now` in, actions out.

An item starts only on what interactive traffic leaves: its deployment has no interactive
request waiting, a free admission slot and fewer than its batch limit of items running
(`batch_max_concurrency`), so an interactive request never waits for more than the slot that
frees first. Among a deployment's batches with items waiting, tenants take turns (round robin,
in the order of their oldest batch) and within a tenant the oldest batch goes first. A tenant
whose rate limits are spent starts nothing until they would let its next request pass (the
runner learns it when an item asks for its budget): its items wait, they never fail with a 429,
and the other tenants' turns go on. Items not started `item_ttl` seconds after their batch was
created expire. The runner (casedesk/batches/runner.py) reports the events and carries out the
actions.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

ITEM_TTL = 24 * 3600.0  # Anthropic's: a batch's items not started within 24 h expire


@dataclass(frozen=True, slots=True)
class Capacity:
    """A deployment's load, read by the runner just before it asks for a decision."""

    interactive_waiting: int  # requests queued for an admission slot
    in_flight: int  # requests holding an admission slot, the batch items among them
    max_concurrency: int
    batch_limit: int  # batch items that may run at once (Deployment.batch_limit)


@dataclass(frozen=True, slots=True)
class Start:
    """Start one more item of this batch (the runner claims the next one without a result)."""

    batch_id: str
    deployment: str


@dataclass(frozen=True, slots=True)
class Expire:
    """This batch's items that have not started expire (its 24 hours are over)."""

    batch_id: str


Action = Start | Expire


@dataclass(slots=True)
class _Batch:
    batch_id: str
    deployment: str
    tenant: Hashable  # whose turn it takes and whose limits it waits for ("" or None: nobody's)
    created_at: float
    order: int  # arrival order: ties of created_at
    waiting: int
    running: int = 0
    stopped: bool = False  # canceled, expired or deleted: nothing more of it starts
    not_before: float = 0.0  # after a failure that was not the item's fault: a pause


class BatchScheduler:
    """The batches that have items left, and the batch items running, per deployment."""

    def __init__(self, item_ttl: float = ITEM_TTL) -> None:
        self.item_ttl = item_ttl
        self._batches: dict[str, _Batch] = {}
        self._running: dict[str, int] = {}  # per deployment
        self._last_tenant: dict[str, Hashable] = {}  # per deployment: whose item started last
        self._tenant_not_before: dict[Hashable, float] = {}  # tenants whose rate limits are spent
        self._arrivals = 0

    # -- events ------------------------------------------------------------------------------

    def added(self, batch_id: str, deployment: str, tenant: Hashable, created_at: float, waiting: int) -> None:
        """A batch with `waiting` items to run (a new one, or one found at start-up)."""
        if waiting <= 0 or batch_id in self._batches:
            return
        self._arrivals += 1
        self._batches[batch_id] = _Batch(batch_id, deployment, tenant, created_at, self._arrivals, waiting)

    def finished(self, batch_id: str) -> None:
        """An item that a Start began has ended (with a result, or with nothing left to claim)."""
        batch = self._batches.get(batch_id)
        if batch is None:
            return
        batch.running -= 1
        self._running[batch.deployment] -= 1
        self._forget_if_done(batch)

    def returned(self, batch_id: str) -> None:
        """A Start the runner could not carry out (the slot was taken meanwhile): it waits again."""
        batch = self._batches.get(batch_id)
        if batch is None:
            return
        batch.running -= 1
        self._running[batch.deployment] -= 1
        if not batch.stopped:
            batch.waiting += 1
        self._forget_if_done(batch)

    def retry_later(self, batch_id: str, not_before: float) -> None:
        """A started item failed through no fault of its own (upstream down, model loading):
        it waits again, and nothing more of its batch starts before `not_before`."""
        batch = self._batches.get(batch_id)
        if batch is not None:
            batch.not_before = max(batch.not_before, not_before)
        self.returned(batch_id)

    def limited(self, batch_id: str, not_before: float) -> None:
        """A started item found its tenant's rate limits spent (it took nothing): it waits again,
        and nothing of that tenant, in any deployment, starts before `not_before` (the limits
        are the tenant's across deployments)."""
        batch = self._batches.get(batch_id)
        if batch is not None:
            tenant = batch.tenant
            self._tenant_not_before[tenant] = max(self._tenant_not_before.get(tenant, 0.0), not_before)
        self.returned(batch_id)

    def stopped(self, batch_id: str) -> None:
        """Nothing more of this batch starts (canceled, expired, deleted); running items finish."""
        batch = self._batches.get(batch_id)
        if batch is not None:
            batch.waiting = 0
            batch.stopped = True
            self._forget_if_done(batch)

    # -- reading -------------------------------------------------------------------------------

    def waiting(self, deployment: str) -> int:
        return sum(b.waiting for b in self._batches.values() if b.deployment == deployment)

    def running(self, deployment: str) -> int:
        return self._running.get(deployment, 0)

    def deployments(self) -> set[str]:
        return {b.deployment for b in self._batches.values()} | set(self._running)

    def next_deadline(self) -> float | None:
        """When the next Expire is due, if any batch has items waiting."""
        waiting = [b.created_at + self.item_ttl for b in self._batches.values() if b.waiting]
        return min(waiting, default=None)

    # -- the decision ----------------------------------------------------------------------------

    def decide(self, now: float, capacity: Mapping[str, Capacity]) -> list[Action]:
        """What to do now: expire what is too old, then start what the capacity allows."""
        actions: list[Action] = []
        for tenant in [t for t, until in self._tenant_not_before.items() if until <= now]:
            del self._tenant_not_before[tenant]
        for batch in list(self._batches.values()):
            if batch.waiting and now >= batch.created_at + self.item_ttl:
                actions.append(Expire(batch.batch_id))
                self.stopped(batch.batch_id)
        for deployment in sorted({b.deployment for b in self._batches.values() if b.waiting}):
            load = capacity.get(deployment)
            if load is None or load.interactive_waiting:
                continue  # a deployment no longer served waits; interactive requests go first
            free = min(
                load.max_concurrency - load.in_flight,
                load.batch_limit - self.running(deployment),
            )
            while free > 0:
                chosen = self._next(deployment, now)
                if chosen is None:
                    break
                chosen.waiting -= 1
                chosen.running += 1
                self._running[deployment] = self.running(deployment) + 1
                free -= 1
                actions.append(Start(chosen.batch_id, deployment))
        return actions

    def _next(self, deployment: str, now: float) -> _Batch | None:
        """The oldest batch of the tenant whose turn it is (the one after the last served)."""
        candidates = sorted(
            (b for b in self._batches.values() if b.deployment == deployment and self._may_start(b, now)),
            key=lambda b: (b.created_at, b.order),
        )
        if not candidates:
            return None
        tenants: list[Hashable] = []
        for batch in candidates:  # in the order of each tenant's oldest batch
            if batch.tenant not in tenants:
                tenants.append(batch.tenant)
        last = self._last_tenant.get(deployment, _NOBODY)
        tenant = tenants[(tenants.index(last) + 1) % len(tenants)] if last in tenants else tenants[0]
        self._last_tenant[deployment] = tenant
        return next(b for b in candidates if b.tenant == tenant)

    def _may_start(self, batch: _Batch, now: float) -> bool:
        return bool(batch.waiting) and batch.not_before <= now and self._tenant_not_before.get(batch.tenant, 0.0) <= now

    def _forget_if_done(self, batch: _Batch) -> None:
        if not batch.waiting and not batch.running:
            del self._batches[batch.batch_id]
        if not self._running.get(batch.deployment, 1):
            del self._running[batch.deployment]


_NOBODY = object()

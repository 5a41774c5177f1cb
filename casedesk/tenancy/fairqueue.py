"""Who gets the next free slot of a deployment: priority levels, then weighted fair queueing
across tenants, first come first served within one tenant.

The shape of Kubernetes API Priority and Fairness (queueset.go): a higher priority level is
served before any lower one; within a level each tenant is a flow, and the next request is the
head of the flow with the least virtual finish time. Every dispatch costs one slot; a flow's
finish time advances by 1/weight per request it gets, and a flow that was idle starts from the
level's virtual time (the start of the request last dispatched there), so idling earns no
credit. So two saturating tenants with weights 2 and 1 get slots 2:1, and a tenant with one
request waiting behind another's flood is served next or nearly. Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

PRIORITIES = ("high", "normal", "low")  # served in this order

T = TypeVar("T")


@dataclass(slots=True)
class _Flow(Generic[T]):
    finish: float = 0.0  # the virtual finish time of its last dispatched request
    waiting: deque[tuple[int, T]] = field(default_factory=deque)  # (arrival number, item)


@dataclass(slots=True)
class _Level(Generic[T]):
    now: float = 0.0  # virtual time: the start of the request last dispatched at this level
    flows: dict[str, _Flow[T]] = field(default_factory=dict)


class FairQueue(Generic[T]):
    """Waiting items by (priority, tenant); `pop` chooses the next one to run."""

    def __init__(self) -> None:
        self._levels: dict[str, _Level[T]] = {name: _Level() for name in PRIORITIES}
        self._arrivals = 0
        self._count = 0
        self._by_tenant: dict[str, int] = {}

    def __len__(self) -> int:
        return self._count

    def queued(self, tenant: str) -> int:
        return self._by_tenant.get(tenant, 0)

    def push(self, item: T, tenant: str, priority: str = "normal") -> None:
        flow = self._levels[priority].flows.setdefault(tenant, _Flow())
        self._arrivals += 1
        flow.waiting.append((self._arrivals, item))
        self._count += 1
        self._by_tenant[tenant] = self._by_tenant.get(tenant, 0) + 1

    def served(self, tenant: str, weight: float, priority: str = "normal") -> None:
        """A request of `tenant` got a slot without waiting: it counts as service all the same."""
        level = self._levels[priority]
        flow = level.flows.setdefault(tenant, _Flow())
        start = max(flow.finish, level.now)
        flow.finish = start + 1.0 / weight
        level.now = start
        self._forget_idle(level)

    def pop(self, weights: dict[str, float]) -> tuple[str, T] | None:
        """The next (tenant, item) to get a slot, or None if nothing waits."""
        for level in self._levels.values():
            best: tuple[float, int, str] | None = None
            for tenant, flow in level.flows.items():
                if not flow.waiting:
                    continue
                finish = max(flow.finish, level.now) + 1.0 / weights.get(tenant, 1.0)
                key = (finish, flow.waiting[0][0], tenant)
                if best is None or key < best:
                    best = key
            if best is None:
                continue
            finish, _, tenant = best
            flow = level.flows[tenant]
            _, item = flow.waiting.popleft()
            level.now = max(flow.finish, level.now)
            flow.finish = finish
            self._count -= 1
            self._by_tenant[tenant] -= 1
            self._forget_idle(level)
            return tenant, item
        return None

    def remove(self, item: T, tenant: str, priority: str = "normal") -> bool:
        """Take a waiting item out (its client left or its wait timed out)."""
        flow = self._levels[priority].flows.get(tenant)
        if flow is None:
            return False
        for entry in flow.waiting:
            if entry[1] is item:
                flow.waiting.remove(entry)
                self._count -= 1
                self._by_tenant[tenant] -= 1
                return True
        return False

    def _forget_idle(self, level: _Level[T]) -> None:
        """Flows with nothing waiting whose finish the level's time passed carry no state."""
        if len(level.flows) > 8:
            for tenant in [t for t, f in level.flows.items() if not f.waiting and f.finish <= level.now]:
                del level.flows[tenant]

"""Admission control per deployment: a bound on requests in flight and a bounded, timed, fair
wait queue.

Beyond `max_concurrency` a request waits for at most `queue_timeout` seconds; the next free
slot goes to the waiter chosen by casedesk/tenancy/fairqueue.py (priority, then weighted fair
queueing across tenants, first come first served within one). Beyond `max_queue` waiting (or
a tenant's own `max_queue`) it is refused at once with 529 overloaded_error, which the
Anthropic SDKs retry with backoff. Cancellation-safe: a client that leaves while queued gives
its place up, and a slot handed to it is passed on.

One Admission serves a deployment id for the life of the process: a reload `configure`s it
with the new limits, so requests still running on the old config keep counting against the
deployment (and their tenant) until they end.

The public surface, also used by batch items (which are charged to their batch's tenant):
`acquire(tenant)` / `release(tenant)` or `async with slot(tenant)`, and the read-only
`in_flight`, `queued`, `in_flight_of(tenant)`, `queued_of(tenant)`. The tenant "" is the
anonymous one (no tenants configured, or a deployment's `api_keys_sha256`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from casedesk.anthropic.errors import overloaded
from casedesk.tenancy.fairqueue import FairQueue


@dataclass(frozen=True, slots=True)
class TenantShare:
    """How a tenant shares a contended deployment."""

    weight: float = 1.0
    priority: str = "normal"  # "high", "normal" or "low"
    max_queue: int = 0  # its requests waiting at most; 0: only the deployment's bound


_DEFAULT_SHARE = TenantShare()


class Admission:
    def __init__(
        self,
        max_concurrency: int,
        max_queue: int,
        queue_timeout: float,
        shares: Mapping[str, TenantShare] | None = None,
    ) -> None:
        self._in_flight = 0
        self._by_tenant: dict[str, int] = {}
        self._queue: FairQueue[asyncio.Future[None]] = FairQueue()
        self.configure(max_concurrency, max_queue, queue_timeout, shares)

    def configure(
        self,
        max_concurrency: int,
        max_queue: int,
        queue_timeout: float,
        shares: Mapping[str, TenantShare] | None = None,
    ) -> None:
        """New limits (a reload): requests in flight stay counted; a larger bound admits waiters."""
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.shares: dict[str, TenantShare] = dict(shares or {})
        self._weights = {tenant: share.weight for tenant, share in self.shares.items()}
        while self._in_flight < self.max_concurrency and self._hand_over():
            pass

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._queue)

    def in_flight_of(self, tenant: str) -> int:
        return self._by_tenant.get(tenant, 0)

    def queued_of(self, tenant: str) -> int:
        return self._queue.queued(tenant)

    def slot(self, tenant: str = "") -> Slot:
        """`async with admission.slot(tenant):` a slot held for the block (acquire … release)."""
        return Slot(self, tenant)

    async def acquire(self, tenant: str = "") -> None:
        share = self.shares.get(tenant, _DEFAULT_SHARE)
        if self._in_flight < self.max_concurrency and not self._queue:
            self._queue.served(tenant, share.weight, share.priority)
            self._count_in(tenant)
            return
        if len(self._queue) >= self.max_queue:
            raise overloaded(
                f"this deployment is at capacity ({self._in_flight} requests in flight, "
                f"{len(self._queue)} queued); retry shortly",
                retry_after=1,
            )
        if share.max_queue and self._queue.queued(tenant) >= share.max_queue:
            raise overloaded(
                f"tenant {tenant!r} already has {self._queue.queued(tenant)} requests queued "
                f"on this deployment (its max_queue); retry shortly",
                retry_after=1,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.push(waiter, tenant, share.priority)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except (asyncio.CancelledError, TimeoutError) as exc:
            if waiter.done() and not waiter.cancelled():
                self.release(tenant)  # the slot arrived as we left: pass it on
            else:
                self._queue.remove(waiter, tenant, share.priority)
            if isinstance(exc, TimeoutError):
                raise overloaded(
                    f"waited {self.queue_timeout:g} s in this deployment's queue without a free slot",
                    retry_after=1,
                ) from None
            raise

    def release(self, tenant: str = "") -> None:
        self._count_out(tenant)
        if self._in_flight < self.max_concurrency:
            self._hand_over()

    def _hand_over(self) -> bool:
        """Give one free slot to the next waiter; False when nobody waits."""
        while True:
            chosen = self._queue.pop(self._weights)
            if chosen is None:
                return False
            tenant, waiter = chosen
            if not waiter.done():
                self._count_in(tenant)
                waiter.set_result(None)
                return True

    def _count_in(self, tenant: str) -> None:
        self._in_flight += 1
        self._by_tenant[tenant] = self._by_tenant.get(tenant, 0) + 1

    def _count_out(self, tenant: str) -> None:
        self._in_flight -= 1
        left = self._by_tenant.get(tenant, 0) - 1
        if left > 0:
            self._by_tenant[tenant] = left
        else:
            self._by_tenant.pop(tenant, None)


class Slot:
    """A deployment's slot for one block: a class, not an asynccontextmanager (on every
    request's path: a generator, its hooks and asyncio's registry of them cost ~5 µs)."""

    __slots__ = ("_admission", "_tenant")

    def __init__(self, admission: Admission, tenant: str) -> None:
        self._admission = admission
        self._tenant = tenant

    async def __aenter__(self) -> None:
        await self._admission.acquire(self._tenant)

    async def __aexit__(self, *_exc: object) -> None:
        self._admission.release(self._tenant)

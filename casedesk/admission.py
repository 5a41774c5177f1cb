"""Admission control per deployment: a bound on requests in flight and a bounded wait queue.

Beyond `max_concurrency` a request waits, first come first served, for at most
`queue_timeout` seconds; beyond `max_queue` waiting it is refused at once with 529
overloaded_error, which the Anthropic SDKs retry with backoff. Cancellation-safe: a client
that leaves while queued gives its place up, and a slot handed to it is passed on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from casedesk.anthropic.errors import overloaded


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        if self.in_flight < self.max_concurrency and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise overloaded(
                f"this deployment is at capacity ({self.in_flight} requests in flight, "
                f"{len(self._waiters)} queued); retry shortly",
                retry_after=1,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except (asyncio.CancelledError, TimeoutError) as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived as we left: pass it on
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                raise overloaded(
                    f"waited {self.queue_timeout:g} s in this deployment's queue without a free slot",
                    retry_after=1,
                ) from None
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; in_flight is unchanged
                return
        self.in_flight -= 1

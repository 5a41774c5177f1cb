"""llama-server calls over a pool: one request/response exchange at a time.

An Exchange is a request whose response head has arrived. Its body is then either read whole
(`read_body`, bounded) or relayed piece by piece (`relay`) with a stall watchdog. `close()`
decides the socket's fate: back to the pool only after a clean end, otherwise closed at once,
which is also how llama-server learns to stop generating for a client that went away.

Deadlines are timers that fail the connection (as the stall watchdog does), never
`asyncio.wait_for`: on Python 3.11 wait_for can swallow a cancellation that lands as the
awaited answer arrives, and the request would then run on for a client that is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import orjson

from casedesk.upstream.connection import UpstreamConnection, UpstreamError
from casedesk.upstream.framing import ResponseHead
from casedesk.upstream.pool import UpstreamPool

T = TypeVar("T")

MAX_UPSTREAM_BODY = 256 * 1024 * 1024  # a whole answer (apply-template of a huge prompt, tokenize)
MAX_ERROR_BODY = 64 * 1024  # an error answer needs kilobytes; its first 300 bytes are shown


async def _within(future: asyncio.Future[T], seconds: float, conn: UpstreamConnection, message: str) -> T:
    """`future`'s result, or UpstreamError(message) (the socket closed) after `seconds`."""
    handle = conn.loop.call_later(seconds, lambda: conn.fail(UpstreamError(message)))
    try:
        return await future
    finally:
        handle.cancel()
        # A failed future holds its exception, whose traceback holds this frame: let go of it.
        del future


class Exchange:
    __slots__ = ("pool", "conn", "head", "read_timeout", "_finished", "_paused", "_closed")

    def __init__(self, pool: UpstreamPool, conn: UpstreamConnection, head: ResponseHead, read_timeout: float) -> None:
        self.pool = pool
        self.conn = conn
        self.head = head
        self.read_timeout = read_timeout
        self._finished = False
        self._paused = False
        self._closed = False

    async def read_body(self, limit: int = MAX_UPSTREAM_BODY) -> bytes:
        """The whole body; UpstreamError past `limit` bytes or `read_timeout` seconds."""
        message = f"upstream sent no complete answer within {self.read_timeout:g} s"
        body = await _within(self.conn.read_body(limit), self.read_timeout, self.conn, message)
        self._finished = True
        return body

    async def read_json(self) -> object:
        body = await self.read_body()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"upstream answered with non-JSON: {body[:200]!r}") from None

    async def relay(
        self,
        sink: Callable[[bytes], object],
        gone: Callable[[], bool] | None = None,
        raw: Callable[[bytes], int] | None = None,
    ) -> None:
        """Hand body pieces to `sink` as they arrive, until the body ends (`raw`: see
        UpstreamConnection.stream_body).

        Raises UpstreamError when the upstream dies, garbles the framing, or sends nothing for
        `read_timeout` seconds while we are reading (pauses for a slow client do not count).
        `gone()` true (the client left) at a watchdog tick also ends the relay, in case the
        cancellation that should have ended it was lost.
        """
        conn = self.conn
        loop = conn.loop
        done = conn.stream_body(sink, raw)
        conn.last_data_at = loop.time()
        interval = max(0.05, min(self.read_timeout / 4, 1.0))

        def watchdog(again: Callable[..., None]) -> None:
            # (it gets itself as `again`: naming itself would make a cycle, this frame's objects
            # kept for the garbage collector instead of freed as the relay ends)
            if not conn.relaying:
                return
            if gone is not None and gone():
                conn.fail(UpstreamError("the client went away", local=True))
                return
            if not self._paused and loop.time() - conn.last_data_at > self.read_timeout:
                conn.fail(UpstreamError(f"upstream stalled: no bytes for {self.read_timeout:g} s"))
                return
            handle[0] = loop.call_later(interval, again, again)

        handle = [loop.call_later(interval, watchdog, watchdog)]
        try:
            await done
        finally:
            handle[0].cancel()
            del done
        self._finished = True

    def pause(self) -> None:
        """The client stopped reading: stop reading from llama-server too (back-pressure)."""
        self._paused = True
        self.conn.pause_reading()

    def resume(self) -> None:
        self._paused = False
        self.conn.last_data_at = self.conn.loop.time()
        self.conn.resume_reading()

    def abort(self) -> None:
        """Close the socket now, whatever is in flight (a stream cut short): llama-server stops
        generating at once, and the socket is never reused."""
        self._finished = False
        self.conn.abort()

    def close(self) -> None:
        """Return the socket if the response ended cleanly; otherwise close it at once.
        Only the first call counts."""
        if not self._closed:
            self._closed = True
            self.pool.release(self.conn, reusable=self._finished)


async def open_exchange(
    pool: UpstreamPool,
    method: str,
    path: str,
    body: bytes | None,
    read_timeout: float,
    sent: Callable[[], None] | None = None,
) -> Exchange:
    """Send one request and wait for its response head.

    A reused keep-alive socket that the server had already closed fails before any byte comes
    back; the request is then sent once more on a fresh connection, invisibly to the caller.
    `sent`, if given, runs each time the request has been written, before the wait for the
    head: work for the answer done while the server works on the request, not after.
    """
    message = f"upstream sent no response within {read_timeout:g} s"
    for attempt in (0, 1):
        conn = await pool.acquire(fresh=attempt == 1)
        try:
            waiting = conn.send_request(method, path, pool.authority, body)
            if sent is not None:
                sent()
            head = await _within(waiting, read_timeout, conn, message)
        except UpstreamError as exc:
            pool.release(conn, reusable=False)
            if exc.retryable and attempt == 0:
                continue
            raise
        except BaseException:
            pool.release(conn, reusable=False)
            raise
        return Exchange(pool, conn, head, read_timeout)
    raise AssertionError("unreachable")


async def call_json(
    pool: UpstreamPool, method: str, path: str, payload: object | None, read_timeout: float
) -> tuple[int, object]:
    """A whole JSON request/response (tokenize, apply-template, health…): (status, parsed body)."""
    body = orjson.dumps(payload) if payload is not None else None
    exchange = await open_exchange(pool, method, path, body, read_timeout)
    try:
        return exchange.head.status, await exchange.read_json()
    finally:
        exchange.close()

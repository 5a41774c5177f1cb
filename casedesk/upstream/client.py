"""llama-server calls over a pool: one request/response exchange at a time.

An Exchange is a request whose response head has arrived. Its body is then either read whole
(`read_body`) or relayed piece by piece (`relay`) with a stall watchdog. `close()` decides the
socket's fate: back to the pool only after a clean end, otherwise closed at once, which is
also how llama-server learns to stop generating for a client that went away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from casedesk.upstream.pool import ResponseHead, UpstreamConnection, UpstreamError, UpstreamPool

MAX_UPSTREAM_BODY = 256 * 1024 * 1024


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

    async def read_body(self) -> bytes:
        try:
            body = await asyncio.wait_for(self.conn.read_body(MAX_UPSTREAM_BODY), self.read_timeout)
        except asyncio.TimeoutError:
            raise UpstreamError(f"upstream sent no complete answer within {self.read_timeout:g} s") from None
        self._finished = True
        return body

    async def read_json(self) -> object:
        body = await self.read_body()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"upstream answered with non-JSON: {body[:200]!r}") from None

    async def relay(self, sink: Callable[[bytes], None]) -> None:
        """Hand body pieces to `sink` as they arrive, until the body ends.

        Raises UpstreamError when the upstream dies, garbles the framing, or sends nothing for
        `read_timeout` seconds while we are reading (pauses for a slow client do not count).
        """
        loop = asyncio.get_running_loop()
        conn = self.conn
        done = conn.stream_body(sink)
        conn.last_data_at = loop.time()
        interval = max(0.05, min(self.read_timeout / 4, 5.0))

        def watchdog() -> None:
            if done.done():
                return
            if not self._paused and loop.time() - conn.last_data_at > self.read_timeout:
                conn.fail(UpstreamError(f"upstream stalled: no bytes for {self.read_timeout:g} s"))
                return
            handle[0] = loop.call_later(interval, watchdog)

        handle = [loop.call_later(interval, watchdog)]
        try:
            await done
        finally:
            handle[0].cancel()
        self._finished = True

    def pause(self) -> None:
        """The client stopped reading: stop reading from llama-server too (back-pressure)."""
        self._paused = True
        self.conn.pause_reading()

    def resume(self) -> None:
        self._paused = False
        self.conn.last_data_at = asyncio.get_running_loop().time()
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
) -> Exchange:
    """Send one request and wait for its response head.

    A reused keep-alive socket that the server had already closed fails before any byte comes
    back; the request is then sent once more on a fresh connection, invisibly to the caller.
    """
    for attempt in (0, 1):
        conn = await pool.acquire(fresh=attempt == 1)
        try:
            head_future = conn.send_request(method, path, pool.authority, body)
            try:
                head = await asyncio.wait_for(head_future, read_timeout)
            except asyncio.TimeoutError:
                raise UpstreamError(f"upstream sent no response within {read_timeout:g} s") from None
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

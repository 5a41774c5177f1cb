"""Keep-alive connections to one llama-server, on raw asyncio sockets with h11 for the heads.

A connection goes back to the pool only after its response ended cleanly; anything cut short
is closed, never reused (the rule httpcore follows too). llama-server closes a connection
after every stream, after an error status, after 100 requests and when idle for 5 s
(docs/llama-server-facts.md §4–5): a socket that carried a stream is never pooled, and idle
ones are retired a little before the timeout; a request that still meets a closed socket is
sent once more on a fresh one (client.open_exchange).
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import h11

from casedesk.http.chunked import ChunkedDecoder, ChunkedError
from casedesk.http.headers import join_headers

_KEEP_ALIVE = re.compile(r"(timeout|max)\s*=\s*(\d+)")
_IDLE_MARGIN = 1.0  # retire idle sockets this long before the server's keep-alive timeout


class UpstreamError(Exception):
    """The upstream failed at the transport level (refused, reset, closed, garbled)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        # True when the server provably did not see the request (nothing came back on a
        # reused socket it had already closed): safe to send again.
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: dict[str, str]
    keep_alive: bool
    chunked: bool


class UpstreamConnection(asyncio.Protocol):
    """One socket. `send_request()` sends and returns the head; then `read_body()` or `stream_body()`."""

    # receive modes
    _IDLE, _HEAD, _HELD, _BODY_H11, _BODY_CHUNKED = range(5)

    def __init__(self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[UpstreamConnection], None]) -> None:
        self._loop = loop
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.requests_sent = 0
        self.max_requests = 100
        self.keepalive_timeout = 5.0
        self.idle_since = 0.0
        self.last_data_at = 0.0
        self.received_any = False
        self._mode = self._IDLE
        self._h11: h11.Connection | None = None
        # One future per phase; at most one is pending at a time.
        self._head_future: asyncio.Future[ResponseHead] | None = None
        self._body_future: asyncio.Future[bytes] | None = None
        self._stream_future: asyncio.Future[None] | None = None
        self._head: ResponseHead | None = None
        self._decoder: ChunkedDecoder | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._body_parts: list[bytes] = []
        self._body_limit = 0
        self._body_size = 0

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._mode == self._BODY_CHUNKED and self._decoder is not None and self._decoder.done:
            pass
        elif self._mode != self._IDLE:
            reason = f"upstream closed the connection ({exc})" if exc else "upstream closed the connection"
            self._fail(UpstreamError(reason, retryable=not self.received_any and self.requests_sent > 1))
        self._on_lost(self)

    def eof_received(self) -> bool | None:
        if self._mode == self._HEAD and not self.received_any:
            # Closed before answering: on a reused socket the server never saw the request.
            self._fail(
                UpstreamError("upstream closed the connection before answering", retryable=self.requests_sent > 1)
            )
            return None
        if self._h11 is not None and self._mode in (self._HEAD, self._BODY_H11):
            # Close-delimited bodies end here; h11 turns EOF into the end of the message.
            self._h11.receive_data(b"")
            self._pump()
        return None

    def data_received(self, data: bytes) -> None:
        self.last_data_at = self._loop.time()
        self.received_any = True
        mode = self._mode
        if mode == self._BODY_CHUNKED:
            # The per-token hot path: de-chunk by hand, hand the bytes on.
            assert self._decoder is not None and self._sink is not None
            try:
                body = self._decoder.feed(data)
            except ChunkedError as exc:
                self._fail(UpstreamError(f"upstream broke chunked framing: {exc}"))
                self.abort()
                return
            if body:
                self._sink(body)
            if self._decoder.done:
                self._finish_body()
            return
        if self._h11 is None:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.abort()
            return
        self._h11.receive_data(data)
        if mode != self._HELD:
            self._pump()

    # -- requests ------------------------------------------------------------------------

    def send_request(
        self, method: str, target: str, host: str, body: bytes | None, content_type: str = "application/json"
    ) -> asyncio.Future[ResponseHead]:
        """Write the request and return a future for its ResponseHead."""
        future: asyncio.Future[ResponseHead] = self._loop.create_future()
        if self.closed or self.transport is None or self.transport.is_closing():
            # Closed by the server since it was last checked: it never saw this request.
            future.set_exception(UpstreamError("upstream closed the connection before the request", retryable=True))
            return future
        self._h11 = h11.Connection(h11.CLIENT)
        headers = [("host", host), ("accept", "*/*")]
        if body is not None:
            headers += [("content-type", content_type), ("content-length", str(len(body)))]
        data = self._h11.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += self._h11.send(h11.Data(data=body))
        data += self._h11.send(h11.EndOfMessage())
        self.requests_sent += 1
        self.received_any = False
        self._head = None
        self._mode = self._HEAD
        self._head_future, self._body_future, self._stream_future = future, None, None
        self.transport.write(data)
        return future

    def read_body(self, limit: int) -> asyncio.Future[bytes]:
        """Collect the whole body (errors, non-streamed answers)."""
        self._body_parts = []
        self._body_limit = limit
        self._body_size = 0
        self._sink = None
        self._mode = self._BODY_H11
        future = self._body_future = self._loop.create_future()
        self._pump()
        return future

    def stream_body(self, sink: Callable[[bytes], None]) -> asyncio.Future[None]:
        """Hand each piece of body to `sink` as it arrives; the future ends with the body."""
        assert self._head is not None and self._h11 is not None
        self._sink = sink
        future = self._stream_future = self._loop.create_future()
        if self._head.chunked:
            self._decoder = ChunkedDecoder()
            pending, _closed = self._h11.trailing_data
            self._mode = self._BODY_CHUNKED
            if pending:
                self.data_received(pending)
        else:
            self._body_limit = 1 << 62
            self._mode = self._BODY_H11
            self._pump()
        return future

    def _pump(self) -> None:
        conn = self._h11
        assert conn is not None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(UpstreamError(f"upstream sent malformed HTTP: {exc}"))
                self.abort()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Response):
                self._head = _head_of(event, self)
                self._mode = self._HELD  # h11 buffers the body until the caller picks a mode
                if self._head_future is not None and not self._head_future.done():
                    self._head_future.set_result(self._head)
                return
            if isinstance(event, h11.Data):
                if self._sink is not None:
                    self._sink(bytes(event.data))
                else:
                    self._body_size += len(event.data)
                    if self._body_size > self._body_limit:
                        self._fail(UpstreamError("upstream response body too large"))
                        self.abort()
                        return
                    self._body_parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._finish_body()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._fail(UpstreamError("upstream closed the connection mid-response"))
                return

    def _finish_body(self) -> None:
        head = self._head
        # llama-server closes the connection after every chunked (streamed) answer, whatever its
        # Keep-Alive header says (docs/llama-server-facts.md §4): never offer that socket again.
        reusable = (
            head is not None
            and head.keep_alive
            and not head.chunked
            and self._h11 is not None
            and self._h11.their_state is h11.DONE
        )
        body = b"".join(self._body_parts)
        self._mode = self._IDLE
        self._h11 = None
        self._decoder = None
        self._sink = None
        self._body_parts = []
        if not reusable:
            self.max_requests = 0  # mark spent
        if self._body_future is not None and not self._body_future.done():
            self._body_future.set_result(body)
        if self._stream_future is not None and not self._stream_future.done():
            self._stream_future.set_result(None)

    def _fail(self, error: Exception) -> None:
        self._mode = self._IDLE
        self.max_requests = 0
        for future in (self._head_future, self._body_future, self._stream_future):
            if future is not None and not future.done():
                future.set_exception(error)
                # The failure may be read by nobody (the caller was cancelled): do not warn.
                future.exception()

    # -- lifecycle ------------------------------------------------------------------------

    def reusable(self, now: float) -> bool:
        return (
            not self.closed
            and self._mode == self._IDLE
            and self.requests_sent < self.max_requests
            and now - self.idle_since < self.keepalive_timeout - _IDLE_MARGIN
        )

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def fail(self, error: UpstreamError) -> None:
        """Give up on the response in progress with `error`, and close the socket at once."""
        self._fail(error)
        self.abort()

    def abort(self) -> None:
        """Close now, dropping unsent bytes: used for streams cut short (frees the slot)."""
        self.max_requests = 0
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def close(self) -> None:
        self.max_requests = 0
        if self.transport is not None and not self.closed:
            self.transport.close()


def _head_of(event: h11.Response, conn: UpstreamConnection) -> ResponseHead:
    headers = join_headers(event.headers)
    keep_alive = event.http_version == b"1.1" and "close" not in headers.get("connection", "").lower()
    for key, number in _KEEP_ALIVE.findall(headers.get("keep-alive", "")):
        if key == "timeout":
            conn.keepalive_timeout = float(number)
        else:
            conn.max_requests = int(number)
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    return ResponseHead(status=event.status_code, headers=headers, keep_alive=keep_alive, chunked=chunked)


@dataclass(slots=True)
class _Waiter:
    """A request for a connection: gets an idle socket, or None (a slot to open one in)."""

    future: asyncio.Future[UpstreamConnection | None]
    fresh: bool  # no idle socket: the retry after meeting one the server had closed


class UpstreamPool:
    """At most `max_connections` sockets to one upstream; idle ones reused newest-first.

    Every event (a request arrives, a socket is given back, a connect fails, a socket closes,
    a waiting request is cancelled) updates the counts and calls `_assign`, the one place
    that decides who gets what, as httpcore's `_assign_requests_to_connections` does.
    """

    def __init__(self, host: str, port: int, max_connections: int = 32, connect_timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._idle: list[UpstreamConnection] = []
        self._in_use = 0  # slots held by callers: a socket in use or one being opened
        self._queue: deque[_Waiter] = deque()
        self.connections_opened = 0

    @property
    def in_flight(self) -> int:
        return self._in_use

    @property
    def open_connections(self) -> int:
        return self._in_use + len(self._idle)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def acquire(self, fresh: bool = False) -> UpstreamConnection:
        """A connection to send one request on; release() it after. Cancellation-safe."""
        waiter = _Waiter(asyncio.get_running_loop().create_future(), fresh)
        self._queue.append(waiter)
        self._assign()
        try:
            conn = await waiter.future  # already done when a socket or a slot was free
        except asyncio.CancelledError:
            if waiter.future.cancelled():
                if waiter in self._queue:
                    self._queue.remove(waiter)
            else:  # handed a socket or a slot as the cancellation landed: give it back
                handed = waiter.future.result()
                if handed is not None:
                    self.release(handed)
                else:
                    self._in_use -= 1
            self._assign()
            raise
        return conn if conn is not None else await self._open()

    async def _open(self) -> UpstreamConnection:
        """Open a socket in a slot already taken; the slot is given back if that fails."""
        loop = asyncio.get_running_loop()
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(loop, self._lost), self.host, self.port),
                self.connect_timeout,
            )
        except BaseException as exc:
            self._in_use -= 1
            self._assign()
            if isinstance(exc, asyncio.TimeoutError):
                raise UpstreamError(
                    f"connecting to {self.authority} timed out after {self.connect_timeout:g} s"
                ) from None
            if isinstance(exc, OSError):
                raise UpstreamError(f"cannot connect to {self.authority}: {exc.strerror or exc}") from None
            raise
        self.connections_opened += 1
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool = True) -> None:
        """Give a connection back: kept for reuse only if its last response ended cleanly."""
        self._in_use -= 1
        now = asyncio.get_running_loop().time()
        conn.idle_since = now
        if reusable and conn.reusable(now):
            self._idle.append(conn)
        elif reusable:
            conn.close()
        else:
            conn.abort()  # cut short: llama-server learns at once that nobody reads it
        self._assign()

    def _lost(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:  # closed by the server while idle (its keep-alive timeout)
            self._assign()

    def _assign(self) -> None:
        """Drop idle sockets that cannot be used any more; then serve waiting requests in
        order: an idle socket, else a free slot, else (a fresh one wanted and the pool
        full) close the oldest idle socket to make room; else they keep waiting."""
        now = asyncio.get_running_loop().time()
        idle = self._idle
        for stale in [c for c in idle if not c.reusable(now)]:
            idle.remove(stale)
            stale.close()
        queue = self._queue
        while queue:
            waiter = queue[0]
            if waiter.future.done():  # cancelled while waiting
                queue.popleft()
                continue
            conn: UpstreamConnection | None = None
            if idle and not waiter.fresh:
                conn = idle.pop()
            elif self._in_use + len(idle) >= self.max_connections:
                if not idle:
                    return
                idle.pop(0).close()
            queue.popleft()
            self._in_use += 1
            waiter.future.set_result(conn)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

"""Keep-alive connections to one llama-server, on raw asyncio sockets with h11 for the heads.

A connection goes back to the pool only after its response ended cleanly; anything cut short
is closed, never reused (the rule httpcore follows too). llama-server closes a connection idle
for 5 s and after 100 requests (`Keep-Alive: timeout=5, max=100`), so connections are retired
a little before either; a request that still meets a closed connection is retried once on a
fresh one by UpstreamClient.
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
    """One socket. `request()` sends and returns the head; then `read_body()` or `stream_body()`."""

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
        self._waiter: asyncio.Future[object] | None = None
        self._head: ResponseHead | None = None
        self._decoder: ChunkedDecoder | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._body_parts: list[bytes] = []
        self._body_limit = 0
        self._body_size = 0
        self.counted = True  # held against the pool's bound until discarded

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
    ) -> asyncio.Future[object]:
        """Write the request and return a future for its ResponseHead."""
        if self.closed or self.transport is None or self.transport.is_closing():
            # Closed by the server since it was last checked: it never saw this request.
            waiter: asyncio.Future[object] = self._loop.create_future()
            waiter.set_exception(UpstreamError("upstream closed the connection before the request", retryable=True))
            return waiter
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
        self._waiter = self._loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        return self._waiter

    def read_body(self, limit: int) -> asyncio.Future[object]:
        """Collect the whole body (errors, non-streamed answers); future → bytes."""
        self._body_parts = []
        self._body_limit = limit
        self._body_size = 0
        self._sink = None
        self._mode = self._BODY_H11
        self._waiter = self._loop.create_future()
        self._pump()
        return self._waiter

    def stream_body(self, sink: Callable[[bytes], None]) -> asyncio.Future[object]:
        """Hand each piece of body to `sink` as it arrives; future → None at the end."""
        assert self._head is not None and self._h11 is not None
        self._sink = sink
        self._waiter = self._loop.create_future()
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
        return self._waiter

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
                self._resolve(self._head)
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
        result: object = None if self._sink is not None else b"".join(self._body_parts)
        self._mode = self._IDLE
        self._h11 = None
        self._decoder = None
        self._sink = None
        self._body_parts = []
        if not reusable:
            self.max_requests = 0  # mark spent
        self._resolve(result)

    def _resolve(self, value: object) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def _fail(self, error: Exception) -> None:
        self._mode = self._IDLE
        self.max_requests = 0
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
            # The failure may be read by nobody (the caller was cancelled): do not warn.
            waiter.exception()

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
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    keep_alive = event.http_version == b"1.1" and "close" not in headers.get("connection", "").lower()
    for key, number in _KEEP_ALIVE.findall(headers.get("keep-alive", "")):
        if key == "timeout":
            conn.keepalive_timeout = float(number)
        else:
            conn.max_requests = int(number)
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    return ResponseHead(status=event.status_code, headers=headers, keep_alive=keep_alive, chunked=chunked)


class UpstreamPool:
    """At most `max_connections` sockets to one upstream; idle ones reused newest-first."""

    def __init__(self, host: str, port: int, max_connections: int = 32, connect_timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._idle: list[UpstreamConnection] = []
        self._total = 0
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self.connections_opened = 0

    @property
    def in_flight(self) -> int:
        return self._total - len(self._idle)

    @property
    def open_connections(self) -> int:
        return self._total

    async def acquire(self, fresh: bool = False) -> UpstreamConnection:
        """A connection to send one request on. Cancellation-safe; release() it after.

        fresh: skip idle connections (the retry after meeting a socket the server had closed).
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.reusable(now):
                return conn
            self._discard(conn)
        if fresh and self._idle and self._total >= self.max_connections:
            self._discard(self._idle.pop(0))  # make room: the oldest idle socket goes
        if self._total < self.max_connections:
            self._total += 1
            return await self._open_counted()
        waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                result = waiter.result()
                if result is None:
                    self._total -= 1
                    self._wake_one()
                else:
                    self.release(result)
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise
        if handed is None:  # a slot was freed for us
            return await self._open_counted()
        if fresh or not handed.reusable(loop.time()):
            # Closed by the server while it was being handed over, or a fresh socket is
            # wanted: its slot opens a new connection.
            handed.counted = False
            handed.close()
            return await self._open_counted()
        return handed

    async def _open_counted(self) -> UpstreamConnection:
        """Open a socket for a slot already counted in _total; give the slot back on failure."""
        loop = asyncio.get_running_loop()
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(loop, self._lost), self.host, self.port),
                self.connect_timeout,
            )
        except BaseException as exc:
            self._total -= 1
            self._wake_one()
            if isinstance(exc, asyncio.TimeoutError):
                raise UpstreamError(
                    f"connecting to {self.authority} timed out after {self.connect_timeout:g} s"
                ) from None
            if isinstance(exc, OSError):
                reason = exc.strerror or str(exc)
                raise UpstreamError(f"cannot connect to {self.authority}: {reason}") from None
            raise
        self.connections_opened += 1
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool = True) -> None:
        """Give a connection back: kept for reuse only if its last response ended cleanly."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        conn.idle_since = now
        if reusable and conn.reusable(now):
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            self._idle.append(conn)
            return
        if not conn.closed:
            conn.abort() if not reusable else conn.close()
        self._discard(conn)

    def _discard(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
        if not conn.closed:
            conn.close()
        if conn.counted:
            conn.counted = False
            self._total -= 1
            self._wake_one()

    def _lost(self, conn: UpstreamConnection) -> None:
        # An idle socket closed by the server (keep-alive timeout): forget it now.
        if conn in self._idle:
            self._discard(conn)

    def _wake_one(self) -> None:
        while self._waiters and self._total < self.max_connections:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._total += 1
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in list(self._idle):
            self._discard(conn)

"""One keep-alive socket to a llama-server, on raw asyncio, framed by hand.

A connection carries one request at a time; its `ConnectionState` is the only state machine
on that socket: a clean end of a response on a keep-alive answer makes it HELD again,
anything else SPENT, and a SPENT one is never reused (the rule httpcore follows too).
llama-server closes a connection after every stream, after an error status, after 100
requests and when idle for 5 s (docs/llama-server-facts.md §4–5). The HTTP/1.1 framing is
upstream/framing.py's (the request's bytes, a strict head parser, how the body ends); which
connection serves which request is upstream/pool.py's.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import re
from collections.abc import Callable
from typing import Final, cast

from casedesk.http.chunked import ChunkedDecoder, ChunkedError
from casedesk.http.flow import StreamProtocol
from casedesk.upstream.framing import (
    BodyDecoder,
    FramingError,
    HeadParser,
    LengthDecoder,
    ResponseHead,
    UntilCloseDecoder,
    body_decoder,
    request_bytes,
)

_KEEP_ALIVE = re.compile(r"(timeout|max)\s*=\s*(\d+)")
_IDLE_MARGIN = 1.0  # retire idle sockets this long before the server's keep-alive timeout


@functools.lru_cache(maxsize=32)
def _keep_alive(value: str) -> tuple[float | None, int | None]:
    """A Keep-Alive header's (timeout, max), each None when absent (the last one counts); one
    llama-server sends the same value on every answer: read once."""
    timeout: float | None = None
    most: int | None = None
    for key, number in _KEEP_ALIVE.findall(value):
        if key == "timeout":
            timeout = float(number)
        else:
            most = int(number)
    return timeout, most


class UpstreamError(Exception):
    """The upstream failed at the transport level (refused, reset, closed, garbled)."""

    def __init__(self, message: str, *, retryable: bool = False, local: bool = False) -> None:
        super().__init__(message)
        # True when the server provably did not see the request (nothing came back on a
        # reused socket it had already closed): safe to send again.
        self.retryable = retryable
        # True when this process, not the upstream, failed (no file descriptor left to
        # connect with): the upstream's health is not touched.
        self.local = local


class ConnectionState(enum.Enum):
    """What one upstream socket is doing. The body states say what arriving bytes are."""

    CONNECTING = "connecting"  # handed to a request, its socket being opened
    IDLE = "idle"  # open and free, in the pool
    HELD = "held"  # a caller holds it, nothing in flight (just handed out, or its answer ended)
    AWAITING_HEAD = "awaiting head"  # bytes go to the head parser
    HEAD_RECEIVED = "head received"  # the body's bytes are kept until the caller says how to read it
    READING_BODY = "reading body"  # de-framed, into a bounded buffer (whole answers)
    RELAYING = "relaying"  # de-framed, piece by piece to a sink (a body not chunked)
    RELAYING_CHUNKED = "relaying chunked"  # de-chunked, piece by piece to a sink: the per-token path
    SPENT = "spent"  # can carry no other request (failed, cut, or no keep-alive): to be closed
    CLOSED = "closed"  # the socket is gone


# The states by module globals: Python 3.11's EnumType makes each `ConnectionState.X` in code a
# metaclass call (~850 instructions; http/server.py says more).
_CONNECTING: Final = ConnectionState.CONNECTING
_HELD: Final = ConnectionState.HELD
_AWAITING_HEAD: Final = ConnectionState.AWAITING_HEAD
_HEAD_RECEIVED: Final = ConnectionState.HEAD_RECEIVED
_READING_BODY: Final = ConnectionState.READING_BODY
_RELAYING: Final = ConnectionState.RELAYING
_CHUNKED: Final = ConnectionState.RELAYING_CHUNKED
_SPENT: Final = ConnectionState.SPENT
_CLOSED: Final = ConnectionState.CLOSED
_BODY_STATES = frozenset({_READING_BODY, _RELAYING, _CHUNKED})
_IN_FLIGHT = frozenset({_AWAITING_HEAD, _HEAD_RECEIVED, *_BODY_STATES})


class UpstreamConnection(StreamProtocol):
    """One socket. `send_request()` sends and returns the head; then `read_body()` or `stream_body()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[UpstreamConnection], None]) -> None:
        super().__init__()
        self._loop = loop
        self._on_lost = on_lost
        self.state = _CONNECTING
        self.requests_sent = 0
        self.max_requests = 100  # the server's Keep-Alive `max`
        self.keepalive_timeout = 5.0
        self.idle_since = 0.0
        self.last_data_at = 0.0
        self.received_any = False
        # Opened ahead of need (a spare, see UpstreamPool): a close met on its first request
        # means, as on a reused socket, that the server never saw it. `spare` stays True until
        # it is handed out: until then it is no request's.
        self.opened_ahead = False
        self.spare = False
        # The future of the phase in progress (head, whole body, or relayed body).
        self._future: asyncio.Future[ResponseHead] | asyncio.Future[bytes] | asyncio.Future[None] | None = None
        self._method = ""
        self._parser: HeadParser | None = None
        self._head: ResponseHead | None = None
        self._pending: list[bytes] = []  # body bytes that came with or after the head, unread
        self._eof = False  # the server closed while its head waited for the caller
        self._decoder: BodyDecoder | None = None
        self._sink: Callable[[bytes], object] | None = None
        # A relayed chunked body's reader of whole chunks straight off the wire (the relay's
        # per-token fast path): it takes what it can from the start of a read, when the read
        # begins a chunk, and says how many bytes it took; the rest is de-chunked as usual.
        self._raw: Callable[[bytes], int] | None = None
        self._body_parts: list[bytes] = []
        self._body_limit = 0
        self._body_size = 0

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.state is _CONNECTING:
            self.state = _HELD

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        if state in _BODY_STATES and self._decoder is not None and self._decoder.done:
            pass
        elif state is _HEAD_RECEIVED:
            # The server closed after its head (an error answer says `Connection: close`) before
            # the caller asked for the body: what it sent waits in _pending, and the body's
            # reader decides, from those bytes and this close, how the answer ended.
            self._eof = True
            self._on_lost(self)
            return
        elif state in _IN_FLIGHT:
            reason = f"upstream closed the connection ({exc})" if exc else "upstream closed the connection"
            self._fail(UpstreamError(reason, retryable=not self.received_any and self.waited))
        self.state = _CLOSED
        self._on_lost(self)

    def eof_received(self) -> bool | None:
        state = self.state
        if state is _AWAITING_HEAD:
            if not self.received_any:
                # Closed before answering: on a reused socket the server never saw the request.
                self._fail(UpstreamError("upstream closed the connection before answering", retryable=self.waited))
            else:
                self._fail(UpstreamError("upstream closed the connection inside the response head"))
        elif state is _HEAD_RECEIVED:
            self._eof = True  # told to the body's reader once the caller picks one
        elif state in _BODY_STATES:
            self._body_eof()
        return None

    def _body_eof(self) -> None:
        decoder = self._decoder
        if isinstance(decoder, UntilCloseDecoder):
            decoder.close()  # a close-delimited body ends here
            self._finish_body()
        elif decoder is not None and not decoder.done:
            self._fail(UpstreamError("upstream closed the connection mid-response"))

    def data_received(self, data: bytes) -> None:
        self.last_data_at = self._loop.time()
        self.received_any = True
        state = self.state
        if state is _CHUNKED or state is _RELAYING:
            # The per-token hot path: de-frame by hand, hand the bytes on.
            decoder = self._decoder
            sink = self._sink
            assert decoder is not None and sink is not None
            raw = self._raw
            if raw is not None and cast(ChunkedDecoder, decoder).between_chunks:
                taken = raw(data)
                if taken:
                    if self.state is not state:  # (the relay cut it short)
                        return
                    if taken == len(data):
                        return  # (whole text chunks: the body's last chunk is never one)
                    data = data[taken:]
            try:
                body = decoder.feed(data)
            except ChunkedError as exc:
                self.fail(UpstreamError(f"upstream broke chunked framing: {exc}"))
                return
            if body:
                sink(body)
            if decoder.done and self.state is state:  # (the sink may have cut it short)
                self._finish_body()
        elif state is _AWAITING_HEAD:
            self._head_bytes(data)
        elif state is _HEAD_RECEIVED:
            self._pending.append(data)
        elif state is _READING_BODY:
            self._collect(data)
        else:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.abort()

    # -- requests ------------------------------------------------------------------------

    def send_request(
        self, method: str, target: str, host: str, body: bytes | None, content_type: str = "application/json"
    ) -> asyncio.Future[ResponseHead]:
        """Write the request and return a future for its ResponseHead."""
        future: asyncio.Future[ResponseHead] = self._loop.create_future()
        transport = self.transport
        if self.state is not _HELD or transport is None or transport.is_closing():
            # Closed by the server since it was last checked: it never saw this request.
            future.set_exception(UpstreamError("upstream closed the connection before the request", retryable=True))
            return future
        data = request_bytes(method, target, host, body, content_type)
        self.requests_sent += 1
        self.received_any = False
        self._method = method
        self._parser = HeadParser()
        self._head = None
        self._pending = []
        self.state = _AWAITING_HEAD
        self._future = future
        transport.write(data)
        return future

    def _head_bytes(self, data: bytes) -> None:
        assert self._parser is not None
        try:
            parsed = self._parser.feed(data)
        except FramingError as exc:
            self.fail(UpstreamError(f"upstream sent malformed HTTP: {exc}"))
            return
        if parsed is None:
            return
        head, rest = parsed
        timeout, most = _keep_alive(head.headers.get("keep-alive", ""))
        if timeout is not None:
            self.keepalive_timeout = timeout
        if most is not None:
            self.max_requests = most
        self._parser = None
        self._head = head
        if rest:
            self._pending.append(rest)
        self.state = _HEAD_RECEIVED  # the body waits until the caller picks a way to read it
        self._resolve(head)

    def read_body(self, limit: int) -> asyncio.Future[bytes]:
        """Collect the whole body (errors, non-streamed answers); more than `limit` bytes fail."""
        assert self.state is _HEAD_RECEIVED
        self._body_parts = []
        self._body_limit = limit
        self._body_size = 0
        self._sink = self._raw = None
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._future = future
        self._start_body(_READING_BODY)
        return future

    def stream_body(
        self, sink: Callable[[bytes], object], raw: Callable[[bytes], int] | None = None
    ) -> asyncio.Future[None]:
        """Hand each piece of body to `sink` as it arrives; the future ends with the body.
        `raw`, for a chunked body: offered each read that begins a chunk first (see _raw)."""
        assert self.state is _HEAD_RECEIVED and self._head is not None
        self._sink = sink
        self._raw = raw if self._head.chunked else None
        future: asyncio.Future[None] = self._loop.create_future()
        self._future = future
        self._start_body(_CHUNKED if self._head.chunked else _RELAYING)
        return future

    def _start_body(self, state: ConnectionState) -> None:
        assert self._head is not None
        decoder = self._decoder = body_decoder(self._head, self._method)
        pending, self._pending = self._pending, []
        self.state = state
        if decoder.done:  # no body at all (204, 304, a HEAD request, Content-Length: 0)
            if pending:
                decoder.feed(b"".join(pending))  # not body: the socket is out of step
            self._finish_body()
            return
        if pending:
            self.data_received(b"".join(pending))
        if self._eof and self.state is state:
            self._body_eof()

    def _collect(self, data: bytes) -> None:
        decoder = self._decoder
        assert decoder is not None
        try:
            body = decoder.feed(data)
        except ChunkedError as exc:
            self.fail(UpstreamError(f"upstream broke chunked framing: {exc}"))
            return
        if body:
            self._body_size += len(body)
            if self._body_size > self._body_limit:
                self.fail(UpstreamError(f"upstream response body larger than {self._body_limit} bytes"))
                return
            self._body_parts.append(body)
        if decoder.done:
            self._finish_body()

    def _finish_body(self) -> None:
        head = self._head
        decoder = self._decoder
        body = b"".join(self._body_parts)
        self._decoder = None
        self._sink = self._raw = None
        self._body_parts = []
        # llama-server closes the connection after every chunked (streamed) answer, whatever its
        # Keep-Alive header says (docs/llama-server-facts.md §4): never offer that socket again.
        # A body that ran to EOF, or bytes past a body's end, leave nothing to reuse either.
        reusable = (
            head is not None
            and head.keep_alive
            and not head.chunked
            and isinstance(decoder, LengthDecoder)
            and not decoder.overrun
            and self.requests_sent < self.max_requests
        )
        if self._eof:
            self.state = _CLOSED  # it closed while the caller had the head
        else:
            self.state = _HELD if reusable else _SPENT
        self._resolve(body)

    def _resolve(self, result: object) -> None:
        # The connection lets go of the future before resolving it: an exception raised
        # through it must not keep this connection, or the request's frames, alive.
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(result)  # type: ignore[arg-type]

    def _fail(self, error: UpstreamError) -> None:
        if self.state is not _CLOSED:
            self.state = _SPENT
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_exception(error)
            # The failure may be read by nobody (the caller was cancelled): do not warn.
            future.exception()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def waited(self) -> bool:
        """It sat open before this request (reused, or a spare): the server may have closed it
        meanwhile, so a close with no answer means it never saw the request."""
        return self.requests_sent > 1 or self.opened_ahead

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop it was opened on (asked of it rather than of asyncio: see UpstreamPool._loop)."""
        return self._loop

    @property
    def relaying(self) -> bool:
        return self.state is _CHUNKED or self.state is _RELAYING

    def expired(self, now: float) -> bool:
        """Idle so long that the server may close it under us (its keep-alive timeout)."""
        return now - self.idle_since >= self.keepalive_timeout - _IDLE_MARGIN

    def pause_reading(self) -> None:
        self.flow.pause_reading()

    def resume_reading(self) -> None:
        self.flow.resume_reading()

    def fail(self, error: UpstreamError) -> None:
        """Give up on the response in progress with `error`, and close the socket at once."""
        self._fail(error)
        self.abort()

    def abort(self) -> None:
        """Close now, dropping unsent bytes: used for streams cut short (frees the slot)."""
        if self.state is not _CLOSED:
            self._fail(UpstreamError("the gateway closed the connection"))  # ends what waits
            if self.transport is not None:
                self.transport.abort()

    def close(self) -> None:
        if self.state is not _CLOSED:
            self.state = _SPENT
            if self.transport is not None:
                self.transport.close()

"""HttpProtocol: one asyncio.Protocol per client connection, driving h11 as the server.

h11 owns the connection state machine and the message heads; this module owns the socket:
limits, timeouts, keep-alive, flow control, and the response writer handlers use. It knows
HTTP and nothing of Anthropic: the application renders its own errors, and gives this layer an
`ErrorRenderer` for the ones it finds itself (413, 431, 408, 400, 529 at the connection cap).
The shape follows uvicorn's h11 protocol (one class per connection, one dispatch loop).
"""

from __future__ import annotations

import asyncio
import fcntl
import http
import logging
import os
import socket
import struct
import termios
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, cast

import h11

from casedesk.http.headers import join_headers

log = logging.getLogger("casedesk.http")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 128
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    write_timeout: float = 60.0  # a client that acknowledges nothing for this long is cut
    # After an answer sent before the request was read: how long and how much to read and
    # discard before closing (see HttpProtocol._linger).
    linger_seconds: float = 5.0
    linger_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """An error answer in the application's format: this layer sends it without knowing it."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


# The application's format for an error this layer finds itself: (status, message) → answer.
ErrorRenderer = Callable[[int, str], ErrorResponse]


@dataclass(slots=True)
class Request:
    """A request: the body is read in full before a handler sees it (a HeadCheck sees it empty)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    client: str
    request_id: str


Handler = Callable[[Request, "ResponseWriter"], Awaitable[None]]
# Asked about a request whose client waits for `100 Continue` before sending the body: an
# answer refuses it now, unread (unknown path, bad key…); None lets the body come.
HeadCheck = Callable[[Request], ErrorResponse | None]
# The body limit of one request, decided from its head (a path may allow more than
# ServerLimits.max_body_bytes: the Message Batches create, issue 18).
BodyLimit = Callable[[Request], int]


def frame_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1), framed by hand for the per-token path."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _reason(status: int) -> bytes:
    if status == 529:
        return b"Overloaded"  # Anthropic's own status; not in the IANA registry
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def new_request_id() -> str:
    return "req_" + os.urandom(12).hex()


class ConnectionTracker:
    """The open connections of one listening server: the connection cap and shutdown use it."""

    def __init__(self) -> None:
        self.open: set[HttpProtocol] = set()
        self.idle_changed = asyncio.Event()
        self.write_timeouts = 0  # requests ended because the client stopped reading


class ResponseWriter:
    """Writes one response: a whole one (`send`) or a streamed one (`start_stream`, `write`…, `end`).

    Streamed bodies are framed as chunks by hand: h11 spends about 4 µs framing one chunk and
    this is the per-token hot path (docs/design.md "The hot path"); the head and the final
    zero-chunk still go through h11 so its state machine stays exact. See
    tests/test_framing.py::test_whole_wire_matches_h11.
    """

    __slots__ = (
        "_protocol",
        "request_id",
        "status",
        "started",
        "finished",
        "_hand_chunked",
        "head_only",
        "_held_head",
    )

    def __init__(self, protocol: HttpProtocol, request_id: str, head_only: bool) -> None:
        self._protocol = protocol
        self.request_id = request_id
        self.status = 0
        self.started = False
        self.finished = False
        self._hand_chunked = False
        self.head_only = head_only
        self._held_head = b""

    @property
    def bytes_written(self) -> int:
        """Bytes written on this connection so far: a cheap "anything new since?" check."""
        return self._protocol.bytes_written

    @property
    def disconnected(self) -> bool:
        return self._protocol.closed

    def _head(self, status: int, headers: list[tuple[str, str]]) -> h11.Response:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        headers.append(("request-id", self.request_id))
        return h11.Response(status_code=status, headers=headers, reason=_reason(status))

    def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: tuple[tuple[str, str], ...] = (),
        close: bool = False,
    ) -> None:
        """Send a whole response with a Content-Length body."""
        conn = self._protocol.conn
        head = [("content-type", content_type), ("content-length", str(len(body))), *headers]
        if close:
            head.append(("connection", "close"))
        data = conn.send(self._head(status, head))
        if body and not self.head_only:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        self.finished = True
        self._protocol.write(data)

    def send_error(self, error: ErrorResponse, close: bool = False) -> None:
        self.send(error.status, error.body, error.content_type, error.headers, close=close)

    def start_stream(
        self,
        status: int = 200,
        content_type: str = "text/event-stream",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Start a streamed (chunked) response; body pieces follow with write().

        The head leaves with the first piece, in the same write (the first event, or a
        keep-alive comment): this saves the client a wakeup and a syscall on the way to the
        first token.
        """
        conn = self._protocol.conn
        head = [("content-type", content_type), ("cache-control", "no-cache"), *headers]
        self._held_head = conn.send(self._head(status, head))
        # h11 frames the body as chunks exactly when the peer speaks HTTP/1.1 and no length
        # was given; HTTP/1.0 peers get a close-delimited body, framed by h11 itself.
        self._hand_chunked = conn.their_http_version == b"1.1"

    def write(self, data: bytes) -> None:
        """Send one body piece now (one chunk, one transport.write: nothing is batched)."""
        if not data or self.finished:
            return
        framed = frame_chunk(data) if self._hand_chunked else self._protocol.conn.send(h11.Data(data=data))
        if self._held_head:
            framed = self._held_head + framed
            self._held_head = b""
        self._protocol.write(framed)

    def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._protocol.write(self._held_head + self._protocol.conn.send(h11.EndOfMessage()))
        self._held_head = b""

    def set_flow_listener(self, listener: FlowListener | None) -> None:
        """Tell `listener` when the client stops and starts reading (back-pressure upstream)."""
        self._protocol.flow_listener = listener


class FlowListener(Protocol):
    """What a relay does when the client's socket fills up and drains again."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class HttpProtocol(asyncio.Protocol):
    """One client connection: parse with h11, run one handler task per request, keep alive."""

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits,
        tracker: ConnectionTracker,
        render_error: ErrorRenderer,
        check_head: HeadCheck | None = None,
        body_limit: BodyLimit | None = None,
    ) -> None:
        self._handler = handler
        self._body_limit = body_limit
        self._max_body = limits.max_body_bytes  # this request's, once its head is read
        self._limits = limits
        self._tracker = tracker
        self._render_error = render_error
        self._check_head = check_head
        self._loop = asyncio.get_running_loop()
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.closed = False
        self.flow_listener: FlowListener | None = None
        self._reading_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._request: Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._task: asyncio.Task[None] | None = None
        self.writer: ResponseWriter | None = None
        self._linger_left = -1  # bytes still to discard before closing; -1: not lingering
        # The write watchdog: what the client has acknowledged, and when that last grew.
        self.bytes_written = 0
        self._fd = -1
        self._acked = -1
        self._progress_at = 0.0
        self._write_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._fd = sock.fileno()
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        self._tracker.open.add(self)
        if len(self._tracker.open) > self._limits.max_connections:
            log.warning("connection cap %d reached; refusing %s", self._limits.max_connections, self.client)
            # No request has been read, so h11 cannot frame this answer: it is written by hand.
            error = self._render_error(529, "too many open connections to this gateway; retry shortly")
            head = [b"HTTP/1.1 529 Overloaded", b"content-type: " + error.content_type.encode("latin-1")]
            head += [f"{name}: {value}".encode("latin-1") for name, value in error.headers]
            head += [b"connection: close", b"content-length: %d" % len(error.body), b"", b""]
            self.write(b"\r\n".join(head) + error.body)
            self._linger()
            return
        self._arm_timer(self._limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self._stop_write_watchdog()
        self._tracker.open.discard(self)
        self._tracker.idle_changed.set()
        if self._task is not None:
            self._task.cancel()

    def eof_received(self) -> bool | None:
        # A client that closes its side is gone: close, which cancels any running handler so
        # the upstream request is abandoned at once (llama-server then frees the slot).
        return None

    def data_received(self, data: bytes) -> None:
        if self._linger_left >= 0:
            self._discard(data)
            return
        self.conn.receive_data(data)
        self._handle_events()

    def pause_writing(self) -> None:
        if self.flow_listener is not None:
            self.flow_listener.pause()

    def resume_writing(self) -> None:
        if self.flow_listener is not None:
            self.flow_listener.resume()

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.bytes_written += len(data)
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- the dispatch loop -------------------------------------------------------------------

    def _handle_events(self) -> None:
        while not self.closed and self._linger_left < 0:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._reject(exc.error_status_hint, f"malformed HTTP request: {exc}")
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                # A pipelined request waits until the current response is complete.
                if not self._reading_paused and self.transport is not None:
                    self.transport.pause_reading()
                    self._reading_paused = True
                return
            if isinstance(event, h11.Data):
                self._body_size += len(event.data)
                if self._body_size > self._max_body:
                    self._reject_too_large()
                    return
                self._body.append(event.data)
            elif isinstance(event, h11.Request):
                self._on_request_head(event)
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _on_request_head(self, head: h11.Request) -> None:
        self._body = []
        self._body_size = 0
        # h11 bounds only a head that arrives in pieces; one that arrives whole is checked here.
        size = len(head.target) + sum(len(name) + len(value) + 4 for name, value in head.headers)
        if size > self._limits.max_header_bytes or len(head.headers) > self._limits.max_header_count:
            self._reject(
                431,
                f"request headers too large (limits: {self._limits.max_header_bytes} bytes, "
                f"{self._limits.max_header_count} fields)",
            )
            return
        path, _, query = head.target.decode("latin-1").partition("?")
        request = self._request = Request(
            method=head.method.decode("ascii", "replace"),
            path=path,
            query=query,
            headers=join_headers(head.headers),
            body=b"",
            client=self.client,
            request_id=new_request_id(),
        )
        self._max_body = self._body_limit(request) if self._body_limit is not None else self._limits.max_body_bytes
        for name, value in head.headers:
            if name == b"content-length" and int(value) > self._max_body:
                self._reject_too_large()
                return
        if self.conn.they_are_waiting_for_100_continue:
            # The client holds its body back until told to send it (curl does, for bodies
            # over 1 MB). h11: a server must answer 100 before it blocks on the body; and a
            # request the application would refuse anyway is refused now, its body unread.
            refusal = self._check_head(request) if self._check_head is not None else None
            if refusal is not None:
                self._answer_unread(refusal, request.request_id)
                return
            self.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
        self._arm_timer(self._limits.body_timeout)

    def _reject_too_large(self) -> None:
        self._reject(413, f"request body is larger than the limit of {self._max_body} bytes")

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we will not handle, then close: the rest of its bytes are unread."""
        self._answer_unread(self._render_error(status, message))

    def _answer_unread(self, response: ErrorResponse, request_id: str | None = None) -> None:
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and self._task is None:
            try:
                writer = ResponseWriter(self, request_id or new_request_id(), head_only=False)
                writer.send_error(response, close=True)
            except h11.LocalProtocolError:
                self.close()
                return
            self._linger()
        else:
            self.close()

    def _linger(self) -> None:
        """Close after an answer sent before the request was read, without losing the answer.

        Closing a socket with unread bytes in it makes the kernel send a reset, and a reset
        destroys what the client has not read yet: our answer. So stop writing (shutdown of
        the write side, after the answer), read and discard for a bounded time and byte
        count, then close. h11's example server: `send_simple_response` then
        `shutdown_and_clean_up`; nginx: `lingering_close`.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._linger_left = self._limits.linger_bytes
        self._arm_timer(self._limits.linger_seconds)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        try:
            transport.write_eof()  # after what is buffered
        except (NotImplementedError, OSError, RuntimeError):
            self.close()

    def _discard(self, data: bytes) -> None:
        self._linger_left -= len(data)
        if self._linger_left < 0:
            self._linger_left = 0
            self.close()

    def _dispatch(self) -> None:
        request = self._request
        assert request is not None
        self._cancel_timer()
        request.body = b"".join(self._body)
        self._body = []
        self._request = None
        self.writer = ResponseWriter(self, request.request_id, head_only=request.method == "HEAD")
        self._task = self._loop.create_task(self._run(request, self.writer))
        self._start_write_watchdog()

    async def _run(self, request: Request, writer: ResponseWriter) -> None:
        try:
            await self._handler(request, writer)
            if not writer.started:
                raise RuntimeError(f"handler for {request.path} sent no response")
        except asyncio.CancelledError:
            pass
        except Exception:
            # The application renders its own errors: this is the last resort for a bug.
            log.exception("handler failed for %s %s", request.method, request.path)
            if not writer.started and not self.closed:
                writer.send_error(self._render_error(500, "internal error in the gateway; see its log"))
            elif not writer.finished:
                self.close()  # a half-sent body cannot be ended in the application's format
        finally:
            self._stop_write_watchdog()
            self._task = None
            self.writer = None
            self.flow_listener = None
            self._tracker.idle_changed.set()
            self._cycle_done()

    def _cycle_done(self) -> None:
        if self.closed:
            return
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            self._arm_timer(self._limits.keepalive_timeout)
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            self._handle_events()
        else:
            self.close()

    # -- timers --------------------------------------------------------------------------------

    def _arm_timer(self, seconds: float) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(seconds, self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        """Idle keep-alive, a client too slow sending its request, or lingering done: drop it."""
        self._timer = None
        if self._linger_left >= 0:
            self.close()
        elif self._task is None:
            if self.conn.their_state is h11.SEND_BODY or (
                self.conn.their_state is h11.IDLE and self.conn.they_are_waiting_for_100_continue
            ):
                self._reject(408, "timed out waiting for the request body")
            else:
                self.close()

    # -- the write watchdog: a client that stops reading -----------------------------------

    def _start_write_watchdog(self) -> None:
        self._acked = -1  # the first tick only takes the measure
        self._progress_at = self._loop.time()
        self._write_timer = self._loop.call_later(self._write_tick(), self._watch_writes)

    def _stop_write_watchdog(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_tick(self) -> float:
        return min(max(self._limits.write_timeout / 4, 0.05), 5.0)

    def _watch_writes(self) -> None:
        """A periodic check while a handler runs, never per write: has the client taken more?

        Waiting for `pause_writing` is not enough: a socket's send buffer autotunes to
        megabytes, minutes of tokens at a model's pace. So progress is what the client's TCP
        has acknowledged: bytes written minus those still in our buffer and in the kernel's
        send queue. Nothing acknowledged for `write_timeout` seconds while something waits
        for it ends the request: the connection is aborted, which cancels the handler, which
        closes its upstream (llama-server frees the slot) and its admission slot.
        """
        self._write_timer = None
        if self.closed or self.transport is None:
            return
        now = self._loop.time()
        pending = self._unacknowledged()
        acked = self.bytes_written - pending
        if pending == 0 or acked > self._acked:
            self._acked = acked
            self._progress_at = now
        elif now - self._progress_at >= self._limits.write_timeout:
            log.warning(
                "client %s took no data for %g s (%d bytes waiting): request ended",
                self.client,
                self._limits.write_timeout,
                pending,
            )
            self._tracker.write_timeouts += 1
            self.transport.abort()
            return
        self._write_timer = self._loop.call_later(self._write_tick(), self._watch_writes)

    def _unacknowledged(self) -> int:
        """Bytes written and not yet acknowledged: ours still buffered, plus the kernel's send
        queue (SIOCOUTQ, Linux: unsent plus unacknowledged bytes; tcp(7)). Where that ioctl
        is missing only our buffer counts, i.e. progress is seen once the kernel's is full."""
        assert self.transport is not None
        pending = self.transport.get_write_buffer_size()
        if self._fd >= 0:
            try:
                pending += struct.unpack("i", fcntl.ioctl(self._fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                self._fd = -1
        return pending

    def shutdown_if_idle(self) -> bool:
        """Close this connection now if no request is in progress (graceful shutdown)."""
        if self._task is None and self.conn.their_state is h11.IDLE and self._linger_left < 0:
            self.close()
            return True
        return False


async def start_server(
    handler: Handler,
    limits: ServerLimits,
    tracker: ConnectionTracker,
    render_error: ErrorRenderer,
    check_head: HeadCheck | None = None,
    host: str | None = None,
    port: int | None = None,
    sock: socket.socket | None = None,
    body_limit: BodyLimit | None = None,
) -> asyncio.Server:
    """Listen on host:port (or an already bound socket, e.g. from systemd) and serve.

    `render_error` gives the application's format to errors this layer finds itself;
    `check_head`, if given, may refuse a request before its client sends the body;
    `body_limit`, if given, decides each request's body limit from its head.
    """
    loop = asyncio.get_running_loop()
    factory = lambda: HttpProtocol(handler, limits, tracker, render_error, check_head, body_limit)  # noqa: E731
    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=2048)
    return await loop.create_server(factory, host=host, port=port or 0, backlog=2048, reuse_address=True)

"""HttpProtocol: one asyncio.Protocol per client connection, reading requests, writing answers.

Request heads are parsed by http/request_head.py (a fast path for the common shape, h11 for
the rest and the authority); bodies are read here; the answers are framed by hand
(http/response_head.py, byte for byte as h11 framed them). This module owns the socket:
limits, timeouts, keep-alive, flow control, and the response writer handlers use. It knows
HTTP and nothing of Anthropic: the application renders its own errors, and gives this layer an
`ErrorRenderer` for the ones it finds itself (413, 431, 408, 400, 403, 505, 529 at the cap).
The shape follows uvicorn's h11 protocol: the connection (`HttpProtocol`, its `Phase`) apart
from the request in flight (`RequestCycle`). docs/design.md "The request cycle" walks it.
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import functools
import ipaddress
import logging
import os
import re
import resource
import socket
import struct
import termios
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Final

import h11

from casedesk.http.flow import FlowListener, StreamProtocol, peer_name, tcp_fd
from casedesk.http.headers import join_headers
from casedesk.http.limits import ServerLimits
from casedesk.http.request_head import RequestHead, parse_request_head
from casedesk.http.request_body import BodyError, ChunkedBodyReader, Progress
from casedesk.http.response_head import (
    CHUNKED_END,
    CONTINUE,
    NO_REQUEST,
    Asker,
    Body,
    Head,
    HeadError,
    asker_of,
    response_head,
    response_head_of,
)

log = logging.getLogger("casedesk.http")


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
# Asked about every request that has a body, once its head is in: an answer refuses it now,
# its body unread (unknown path, bad key…); None lets the body come. A client waiting for
# `100 Continue` gets it only after this said None.
HeadCheck = Callable[[Request], ErrorResponse | None]
# The body limit of one request, decided from its head (a path may allow more than
# ServerLimits.max_body_bytes: the Message Batches create, issue 18).
BodyLimit = Callable[[Request], int]

# The end of a request head: h11 accepts bare LF line ends too, so this does.
_HEAD_END = re.compile(rb"\n\r?\n")
# Chunk lines parsed before the loop is given back (request_body.ChunkedBodyReader.step):
# about a millisecond of work, whatever the chunks' sizes.
_CHUNK_LINES_PER_STEP = 2048
# Descriptors kept for everything that is not a client connection (listeners, logs, managed
# servers' pipes); each client connection may hold an upstream one as well.
_FD_RESERVE = 64


def frame_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1), framed by hand for the per-token path."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def asker_of_head(head: RequestHead) -> Asker:
    """What a parsed request head says about its answer's framing."""
    return asker_of(head.http_version, head.method, [value for name, value in head.headers if name == b"connection"])


def new_request_id() -> str:
    return "req_" + os.urandom(12).hex()


_ID_STAND_IN = "req_" + "x" * 24  # (no id is one: not hex)
_ID_LINE = b"request-id: %b\r\n" % _ID_STAND_IN.encode()


class Phase(enum.Enum):
    """Where a connection is; each phase has its own deadline (HttpProtocol._enter)."""

    IDLE = "idle"  # nothing of a request yet: fresh (header_timeout) or kept alive (keepalive_timeout)
    HEAD = "head"  # part of a request head is in (header_timeout)
    BODY = "body"  # the head is in, its body is coming (body_timeout)
    HANDLING = "handling"  # a handler answers (the write watchdog: write_timeout)
    DRAINING = "draining"  # answered; our buffer is over its high-water mark: the next request waits
    LINGERING = "lingering"  # answered before the request was read: discard what comes, then close
    CLOSED = "closed"


# Python 3.11's EnumType has a __getattr__, so every `Phase.IDLE` in code is a call of the
# metaclass's __getattribute__ (~850 instructions, callgrind; 75 of them a request here and in
# upstream/): the request cycle names its phases, and the writer its answer's framing, by these
# module globals, a dict lookup.
_IDLE: Final = Phase.IDLE
_HEAD: Final = Phase.HEAD
_BODY: Final = Phase.BODY
_HANDLING: Final = Phase.HANDLING
_DRAINING: Final = Phase.DRAINING
_LINGERING: Final = Phase.LINGERING
_CLOSED: Final = Phase.CLOSED
_LENGTH_BODY: Final = Body.LENGTH
_CHUNKED_BODY: Final = Body.CHUNKED
_UNTIL_CLOSE_BODY: Final = Body.UNTIL_CLOSE
_NO_BODY: Final = Body.NONE


class ConnectionTracker:
    """The open connections of one listening server: the caps and shutdown use it."""

    def __init__(self) -> None:
        self.open: set[HttpProtocol] = set()
        # Connections in Phase.IDLE, longest idle first (dicts keep insertion order).
        self.idle: dict[HttpProtocol, None] = {}
        self.per_ip: dict[str, int] = {}
        self.idle_changed = asyncio.Event()
        self.write_timeouts = 0  # requests ended because the client stopped reading
        self.draining = False  # shutting down: every answer says `connection: close`

    def make_room(self, ip: str, limits: ServerLimits) -> tuple[HttpProtocol | None, str | None]:
        """Room for one more connection from `ip`: (an idle connection to close first, or
        None) when there is some, else (None, why not). Longest idle goes first (nginx's
        reusable connections): an idle keep-alive connection costs its client one reconnect."""
        if self.per_ip.get(ip, 0) >= limits.per_ip_cap():
            victim = next((p for p in self.idle if p.ip == ip), None)
            if victim is None:
                return None, "too many open connections from your address; retry shortly"
            return victim, None
        if len(self.open) >= limits.max_connections:
            victim = next(iter(self.idle), None)
            if victim is None:
                return None, "too many open connections to this gateway; retry shortly"
            return victim, None
        return None, None

    def add(self, protocol: HttpProtocol) -> None:
        self.open.add(protocol)
        self.per_ip[protocol.ip] = self.per_ip.get(protocol.ip, 0) + 1

    def remove(self, protocol: HttpProtocol) -> None:
        """Forget a connection (idempotent: once when it is evicted, again when it is lost)."""
        self.idle.pop(protocol, None)
        if protocol in self.open:
            self.open.discard(protocol)
            left = self.per_ip[protocol.ip] - 1
            if left:
                self.per_ip[protocol.ip] = left
            else:
                del self.per_ip[protocol.ip]
        self.idle_changed.set()


class ResponseWriter:
    """Writes one response: a whole one (`send`) or a streamed one (`start_stream`, `write`…, `end`).

    Framed by hand, head and body (http/response_head.py: the bytes h11 wrote, without its
    cost per header; chunks by `frame_chunk`, the per-token hot path, docs/design.md "The hot
    path"). `keep_alive` says whether the connection may carry another request once this
    answer is finished, as h11's state machine said (tests/test_framing.py).
    """

    __slots__ = (
        "_protocol",
        "request_id",
        "status",
        "started",
        "finished",
        "keep_alive",
        "_asker",
        "_body",
        "_held_head",
        "_prepared",
    )

    def __init__(self, protocol: HttpProtocol, request_id: str, asker: Asker) -> None:
        self._protocol = protocol
        self.request_id = request_id
        self.status = 0
        self.started = False
        self.finished = False
        self.keep_alive = False
        self._asker = asker
        self._body = _NO_BODY
        self._held_head = b""
        self._prepared: tuple[tuple[object, ...], Head] | None = None  # see prepare_stream

    @property
    def head_only(self) -> bool:
        return self._asker.method == b"HEAD"

    @property
    def bytes_written(self) -> int:
        """Bytes written on this connection so far: a cheap "anything new since?" check."""
        return self._protocol.bytes_written

    @property
    def disconnected(self) -> bool:
        return self._protocol.closed

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        if self.started:
            raise RuntimeError("response already started")
        return self._commit(status, self._render(status, headers))

    def _render(self, status: int, headers: list[tuple[str, str]]) -> Head:
        # Rendered with a stand-in for the request's id (every answer's own) and remembered
        # for the next answer with the same headers (response_head_of); the id is put in after.
        headers.append(("request-id", _ID_STAND_IN))
        if self._protocol.tracker.draining and ("connection", "close") not in headers:
            headers.append(("connection", "close"))  # shutting down: no next request here
        head = response_head_of(status, tuple(headers), self._asker)
        data = head.data.replace(_ID_LINE, b"request-id: %b\r\n" % self.request_id.encode(), 1)
        return Head(data, head.body, head.keep_alive)  # (dataclasses.replace: 0.7 µs more, every answer)

    def _commit(self, status: int, head: Head) -> bytes:
        self.started = True
        self.status = status
        self._body = head.body
        self.keep_alive = head.keep_alive
        return head.data

    def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: tuple[tuple[str, str], ...] = (),
        close: bool = False,
    ) -> None:
        """Send a whole response with a Content-Length body."""
        head = [("content-type", content_type), ("content-length", str(len(body))), *headers]
        if close:
            head.append(("connection", "close"))
        data = self._head(status, head)
        if self._body is _LENGTH_BODY:
            data += body
        elif body and not self.head_only:
            raise HeadError(f"a {status} answer has no body")  # as h11 refused it
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
        """Start a streamed response (chunked to HTTP/1.1 clients, close-delimited to
        HTTP/1.0 ones); body pieces follow with write().

        The head leaves with the first piece, in the same write (the first event, or a
        keep-alive comment): this saves the client a wakeup and a syscall on the way to the
        first token.
        """
        prepared, self._prepared = self._prepared, None
        if self.started:
            raise RuntimeError("response already started")
        key = (status, content_type, headers, self._protocol.tracker.draining)
        if prepared is not None and prepared[0] == key:
            self._held_head = self._commit(status, prepared[1])
            return
        self._held_head = self._commit(status, self._render(status, self._stream_headers(content_type, headers)))

    def prepare_stream(
        self,
        status: int = 200,
        content_type: str = "text/event-stream",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Render the head `start_stream` with these arguments will send, without sending it or
        starting the answer: called while llama-server works on the request (the relay's
        `sent`), it takes the head's ~15 µs off the way to the first token. `start_stream`
        renders afresh if it is called with anything else, or once shutdown began meanwhile."""
        if self.started:
            return
        key = (status, content_type, headers, self._protocol.tracker.draining)
        try:
            self._prepared = (key, self._render(status, self._stream_headers(content_type, headers)))
        except HeadError:
            self._prepared = None  # start_stream raises it, where it is answered

    @staticmethod
    def _stream_headers(content_type: str, headers: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        return [("content-type", content_type), ("cache-control", "no-cache"), *headers]

    def write(self, data: bytes) -> None:
        """Send one body piece now (one chunk, one transport.write: nothing is batched)."""
        if not data or self.finished:
            return
        body = self._body
        if body is _CHUNKED_BODY:
            framed = frame_chunk(data)
        elif body is _UNTIL_CLOSE_BODY:
            framed = data
        elif self.started:
            return  # HEAD, 204, 304: the head only
        else:
            raise RuntimeError("a body piece before the response started")  # h11 refused it too
        if self._held_head:
            framed = self._held_head + framed
            self._held_head = b""
        self._protocol.write(framed)

    def end(self, last: bytes = b"") -> None:
        """End the body; `last`, its final piece, leaves with the end in the same write (one
        syscall, not two, for the closing events of every stream)."""
        if self.finished:
            return
        if not self.started:
            raise RuntimeError("the end of a response that has not started")  # h11 refused it too
        self.finished = True
        if self._body is _CHUNKED_BODY:
            tail = (frame_chunk(last) + CHUNKED_END) if last else CHUNKED_END
        else:
            tail = last if self._body is _UNTIL_CLOSE_BODY else b""  # HEAD, 204, 304: the head only
        self._protocol.write(self._held_head + tail)
        self._held_head = b""

    def set_flow_listener(self, listener: FlowListener | None) -> None:
        """Tell `listener` when the client stops and starts reading (back-pressure upstream);
        told at once if the client's socket is already full."""
        self._protocol.flow.set_listener(listener)


class RequestCycle:
    """One request on a connection, from its head to its answer (uvicorn's RequestResponseCycle).

    It gathers the body (in one buffer: `body`, or `chunked` for a chunked one) and runs the
    handler as a task; the connection starts the next cycle when this one is done.
    """

    __slots__ = ("request", "body", "body_left", "chunked", "writer", "task")

    def __init__(
        self, protocol: HttpProtocol, request: Request, asker: Asker, content_length: int, chunked: bool
    ) -> None:
        self.request = request
        self.body = bytearray()
        self.body_left = content_length  # Content-Length bytes not yet read
        self.chunked = ChunkedBodyReader(protocol.max_body) if chunked else None
        self.writer = ResponseWriter(protocol, request.request_id, asker)
        self.task: asyncio.Task[None] | None = None

    async def run(self, handler: Handler, render_error: ErrorRenderer, protocol: HttpProtocol) -> None:
        request, writer = self.request, self.writer
        try:
            await handler(request, writer)
            if not writer.started:
                raise RuntimeError(f"handler for {request.path} sent no response")
        except asyncio.CancelledError:
            pass
        except Exception:
            # The application renders its own errors: this is the last resort for a bug.
            log.exception("handler failed for %s %s", request.method, request.path)
            if not writer.started and not protocol.closed:
                writer.send_error(render_error(500, "internal error in the gateway; see its log"))
            elif not writer.finished:
                protocol.close()  # a half-sent body cannot be ended in the application's format
        finally:
            self.task = None
            protocol.cycle_done()


class HttpProtocol(StreamProtocol):
    """One client connection: read requests one at a time, answer each in a RequestCycle."""

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits,
        tracker: ConnectionTracker,
        render_error: ErrorRenderer,
        check_head: HeadCheck | None = None,
        body_limit: BodyLimit | None = None,
    ) -> None:
        super().__init__()
        self._handler = handler
        self.limits = limits
        self.tracker = tracker
        self._body_limit = body_limit
        self._max_body = limits.max_body_bytes  # this request's, once its head is read
        self._render_error = render_error
        self._check_head = check_head
        self._loop = asyncio.get_running_loop()
        self._asker = NO_REQUEST  # what the request being read says about its answer
        self.client = ""
        self.ip = ""
        self.closed = False
        self.phase = _IDLE
        self._timer: asyncio.TimerHandle | None = None  # the current phase's deadline
        # While _process runs, a phase's deadline waits here and is armed once, at its end: a
        # request that arrives whole passes HEAD and BODY without a timer made for either.
        self._reading = False
        self._deadline: float | None = None
        self._inbuf = bytearray()  # received, not yet parsed as a head or read as a body
        self._scanned = 0  # bytes of _inbuf already searched for the head's end
        self._stepping = False  # a chunked body's next step is scheduled (reading waits)
        self._loopback_listener = False
        self.cycle: RequestCycle | None = None
        self._linger_left = 0  # bytes still to discard, while LINGERING
        # The write watchdog: what the client has acknowledged, and when that last grew.
        self.bytes_written = 0
        self._acked = -1
        self._progress_at = 0.0
        self._fd: int | None = None  # the socket's, for SIOCOUTQ: looked up on the first tick

    @property
    def max_body(self) -> int:
        """The body limit of the request being read (BodyLimit may raise it for a path)."""
        return self._max_body

    @property
    def writer(self) -> ResponseWriter | None:
        """The writer of the answer a handler is writing, if one is."""
        return self.cycle.writer if self.cycle is not None and self.phase is _HANDLING else None

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")  # (uvloop asks the kernel each time: once)
        self.client = peer_name(peer)
        self.ip = str(peer[0]) if isinstance(peer, tuple) else self.client
        self._loopback_listener = _is_loopback_listener(transport.get_extra_info("sockname"))
        victim, refusal = self.tracker.make_room(self.ip, self.limits)
        if victim is not None:
            victim.evict()
        self.tracker.add(self)
        if refusal is not None:
            log.warning("connection cap reached (%s); refusing %s", refusal, self.client)
            self._refuse_connection(refusal)
            return
        self._enter(_IDLE, self.limits.header_timeout)

    def _refuse_connection(self, message: str) -> None:
        # No request has been read: the answer has no request id, and the connection closes.
        error = self._render_error(529, message)
        headers = [("content-type", error.content_type), *error.headers, ("connection", "close")]
        headers.append(("content-length", str(len(error.body))))
        self.write(response_head(529, headers, NO_REQUEST).data + error.body)
        self._linger()

    def evict(self) -> None:
        """Close this idle connection to make room for a new one."""
        log.info("closing idle connection %s to make room", self.client)
        self.tracker.remove(self)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._enter(_CLOSED)
        self.tracker.remove(self)
        if self.cycle is not None and self.cycle.task is not None:
            self.cycle.task.cancel()

    def eof_received(self) -> bool | None:
        # A client that closes its side is gone: close, which cancels any running handler so
        # the upstream request is abandoned at once (llama-server then frees the slot).
        return None

    def data_received(self, data: bytes) -> None:
        if self.phase is _LINGERING:
            self._discard(data)
            return
        self._inbuf += data
        self._process()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.phase is _DRAINING:
            self._next_request()

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.bytes_written += len(data)
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- phases ----------------------------------------------------------------------------

    def _enter(self, phase: Phase, deadline: float | None = None) -> None:
        """Move to `phase`; its timer (if any) fires `_on_timeout` after `deadline` seconds."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.phase is _IDLE and phase is not _IDLE:
            self.tracker.idle.pop(self, None)
        self.phase = phase
        if phase is _IDLE and not self.closed:
            self.tracker.idle[self] = None
        if self._reading:
            self._deadline = deadline
        elif deadline is not None and not self.closed:
            self._timer = self._loop.call_later(deadline, self._on_timeout)

    def _on_timeout(self) -> None:
        self._timer = None
        phase = self.phase
        if phase is _BODY:
            self._reject(408, "timed out waiting for the request body")
        elif phase in (_HANDLING, _DRAINING):
            self._watch_writes()
        else:  # idle too long, a head too slow, or lingering done
            self.close()

    # -- reading requests ------------------------------------------------------------------

    def _process(self) -> None:
        """Read what has arrived as far as the phase allows, then decide whether to read on."""
        if self._reading:  # (re-entered from a handler's end: the outer call arms the timer)
            self._read_on()
            return
        self._reading = True
        self._deadline = None
        try:
            self._read_on()
        finally:
            self._reading = False
        deadline = self._deadline
        if deadline is not None and not self.closed and self._timer is None:
            self._timer = self._loop.call_later(deadline, self._on_timeout)
        self._update_reading()

    def _read_on(self) -> None:
        while not self.closed:
            phase = self.phase
            if phase is _IDLE:
                if not self._skip_empty_lines():
                    break
                self._enter(_HEAD, self.limits.header_timeout)
            elif phase is _HEAD:
                if not self._read_head():
                    break
            elif phase is _BODY:
                if not self._read_body():
                    break
            else:
                break

    def _update_reading(self) -> None:
        """Read on only while the bytes can be used: never ahead of a request in progress
        (a pipelined request waits, unread, until the previous answer is written out), and
        not while a chunked body's step waits for its turn."""
        if self.closed or self.phase is _LINGERING:
            return
        busy = self.phase in (_HANDLING, _DRAINING) and bool(self._inbuf)
        if busy or self._stepping:
            self.flow.pause_reading()
        else:
            self.flow.resume_reading()

    def _skip_empty_lines(self) -> bool:
        """RFC 9112 §2.2: empty lines before a request line are ignored (old clients send a
        CRLF after a body). True when something else is waiting."""
        inbuf = self._inbuf
        if inbuf and inbuf[0] in (13, 10):  # CR, LF
            self._inbuf = inbuf = inbuf.lstrip(b"\r\n")
        return bool(inbuf)

    def _read_head(self) -> bool:
        inbuf = self._inbuf
        found = _HEAD_END.search(inbuf, max(0, self._scanned - 2))
        end = found.end() if found is not None else len(inbuf)
        if end > self.limits.max_header_bytes:
            self._reject_headers_too_large()
            return False
        if found is None:
            self._scanned = len(inbuf)
            return False
        # Exactly one head is parsed (and given to h11, when the fast path sends it there): the
        # body is read by this module, so bytes after this request never wait inside a parser.
        data = bytes(inbuf[:end])
        del inbuf[:end]
        self._scanned = 0
        try:
            head = parse_request_head(data, self.limits.max_header_bytes)
        except h11.RemoteProtocolError as exc:
            self._reject(exc.error_status_hint, f"malformed HTTP request: {exc}")
            return False
        self._asker = asker_of_head(head)
        self._on_request_head(head)
        return True

    def _reject_headers_too_large(self) -> None:
        self._reject(
            431,
            f"request headers too large (limits: {self.limits.max_header_bytes} bytes, "
            f"{self.limits.max_header_count} fields)",
        )

    def _on_request_head(self, head: RequestHead) -> None:
        limits = self.limits
        if head.http_version not in (b"1.0", b"1.1"):
            version = head.http_version.decode("ascii", "replace")
            self._reject(505, f"HTTP/{version} is not supported: this gateway speaks HTTP/1.1")
            return
        if len(head.headers) > limits.max_header_count:
            self._reject_headers_too_large()
            return
        headers = join_headers(head.headers)
        if "content-length" in headers and "transfer-encoding" in headers:
            # RFC 9112 §6.1: a request that carries both may be a smuggling attempt.
            self._reject(400, "a request may not carry both Content-Length and Transfer-Encoding")
            return
        authority, path, query = _split_target(head.target.decode("latin-1"))
        if "origin" in headers:
            self._reject(403, "requests from web pages are refused: this gateway is not for browsers (Origin)")
            return
        host = authority if authority is not None else headers.get("host", "")
        if self._loopback_listener and not _allowed_host(host, limits.allowed_hosts):
            self._reject(
                403,
                f"Host {host[:100]!r} is not a loopback name or address: this gateway listens on "
                "loopback only; list the name in [server] allowed_hosts to reach it by that name",
            )
            return
        chunked = "transfer-encoding" in headers  # h11 accepts only chunked
        request = Request(
            method=head.method.decode("ascii", "replace"),
            path=path,
            query=query,
            headers=headers,
            body=b"",
            client=self.client,
            request_id=new_request_id(),
        )
        self._max_body = self._body_limit(request) if self._body_limit is not None else limits.max_body_bytes
        content_length = int(headers.get("content-length", "0") or 0)  # h11 checked it is a number
        if content_length > self._max_body:
            self._reject_too_large()
            return
        self.cycle = RequestCycle(self, request, self._asker, content_length, chunked)
        if (chunked or content_length) and self._check_head is not None:
            # A request the application would refuse anyway (unknown path, missing or wrong
            # key) is refused now, its body unread: a client without a key cannot make this
            # process read, hold or parse a body.
            refusal = self._check_head(request)
            if refusal is not None:
                self._answer_unread(refusal, request.request_id)
                return
        if head.expects_continue:
            # The client holds its body back until told to send it (curl does, for bodies
            # over 1 MB); h11: a server must answer 100 before it blocks on the body.
            self.write(CONTINUE)
        self._enter(_BODY, limits.body_timeout)

    def _read_body(self) -> bool:
        """The body, read here (the head was parsed by request_head.py; its Content-Length checked):
        bytes counted off a Content-Length, or a chunked body through http/request_body.py."""
        cycle = self.cycle
        assert cycle is not None
        reader = cycle.chunked
        if reader is not None:
            if self._inbuf:
                reader.feed(self._inbuf)
                self._inbuf = bytearray()
            try:
                progress = reader.step(_CHUNK_LINES_PER_STEP)
            except BodyError as exc:
                self._reject(exc.status, str(exc))
                return False
            if progress is Progress.NEED_DATA:
                return False
            if progress is Progress.BUDGET_SPENT:
                self._stepping = True
                self._loop.call_soon(self._next_step)
                return False
            self._inbuf = bytearray(reader.leftover())
            cycle.body = reader.body
            cycle.chunked = None
        elif cycle.body_left:
            if not self._inbuf:
                return False
            take = min(cycle.body_left, len(self._inbuf))
            cycle.body += self._inbuf[:take]
            del self._inbuf[:take]
            cycle.body_left -= take
            if cycle.body_left:
                return False
        self._dispatch()
        return True

    def _next_step(self) -> None:
        self._stepping = False
        if self.phase is _BODY:
            self._process()

    def _reject_too_large(self) -> None:
        self._reject(413, f"request body is larger than the limit of {self._max_body} bytes")

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we will not handle, then close: the rest of its bytes are unread."""
        self._answer_unread(self._render_error(status, message))

    def _answer_unread(self, response: ErrorResponse, request_id: str | None = None) -> None:
        if self.phase in (_IDLE, _HEAD, _BODY):  # no answer begun yet
            try:
                writer = ResponseWriter(self, request_id or new_request_id(), self._asker)
                writer.send_error(response, close=True)
            except HeadError:
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
        self.cycle = None
        self._inbuf = bytearray()
        self._linger_left = self.limits.linger_bytes
        self._enter(_LINGERING, self.limits.linger_seconds)
        self.flow.resume_reading()
        try:
            transport.write_eof()  # after what is buffered
        except (NotImplementedError, OSError, RuntimeError):
            self.close()

    def _discard(self, data: bytes) -> None:
        self._linger_left -= len(data)
        if self._linger_left < 0:
            self.close()

    # -- the cycle ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        cycle = self.cycle
        assert cycle is not None
        cycle.request.body = bytes(cycle.body)
        cycle.body = bytearray()
        self._acked = -1  # the write watchdog's first tick only takes the measure
        self._progress_at = self._loop.time()
        self._enter(_HANDLING, self._write_tick())
        cycle.task = self._loop.create_task(cycle.run(self._handler, self._render_error, self))

    def cycle_done(self) -> None:
        """The handler is done: keep the connection for the next request, or close it."""
        self.flow.set_listener(None)
        self.tracker.idle_changed.set()
        cycle = self.cycle
        if self.closed or self.phase is not _HANDLING or cycle is None:
            return
        self.cycle = None
        # The body was read whole before the handler ran (_dispatch): the answer decides.
        if cycle.writer.finished and cycle.writer.keep_alive:
            self._asker = NO_REQUEST
            if self.flow.writing_paused:
                # The answer waits in our buffer: the next request is read once it has left
                # (nginx and uvicorn do the same), or the watchdog cuts a client that takes none.
                self._enter(_DRAINING, self._write_tick())
                self._update_reading()
            else:
                self._next_request()
        else:
            self.close()

    def _next_request(self) -> None:
        self._enter(_IDLE, self.limits.keepalive_timeout)
        self._process()

    # -- the write watchdog: a client that stops reading -----------------------------------

    def _write_tick(self) -> float:
        return min(max(self.limits.write_timeout / 4, 0.05), 5.0)

    def _watch_writes(self) -> None:
        """A periodic check while a handler runs or an answer drains, never per write: has
        the client taken more?

        Waiting for `pause_writing` is not enough: a socket's send buffer autotunes to
        megabytes, minutes of tokens at a model's pace. So progress is what the client's TCP
        has acknowledged: bytes written minus those still in our buffer and in the kernel's
        send queue. Nothing acknowledged for `write_timeout` seconds while something waits
        for it ends the request: the connection is aborted, which cancels the handler, which
        closes its upstream (llama-server frees the slot) and its admission slot.
        """
        if self.closed or self.transport is None:
            return
        now = self._loop.time()
        pending = self._unacknowledged()
        acked = self.bytes_written - pending
        if pending == 0 or acked > self._acked:
            self._acked = acked
            self._progress_at = now
        elif now - self._progress_at >= self.limits.write_timeout:
            log.warning(
                "client %s took no data for %g s (%d bytes waiting): connection cut",
                self.client,
                self.limits.write_timeout,
                pending,
            )
            self.tracker.write_timeouts += 1
            self.transport.abort()
            return
        self._timer = self._loop.call_later(self._write_tick(), self._on_timeout)

    def _unacknowledged(self) -> int:
        """Bytes written and not yet acknowledged: ours still buffered, plus the kernel's send
        queue (SIOCOUTQ, Linux: unsent plus unacknowledged bytes; tcp(7)). Where that ioctl
        is missing only our buffer counts, i.e. progress is seen once the kernel's is full."""
        assert self.transport is not None
        pending = self.transport.get_write_buffer_size()
        if self._fd is None:
            self._fd = tcp_fd(self.transport)
        if self._fd >= 0:
            try:
                pending += struct.unpack("i", fcntl.ioctl(self._fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                self._fd = -1
        return pending

    def shutdown_if_idle(self) -> bool:
        """Graceful shutdown: close this connection now if no request is in progress; from
        the first call on, every answer on any connection says `connection: close`."""
        self.tracker.draining = True
        if self.phase in (_IDLE, _HEAD):
            self.close()
            return True
        return False


def _split_target(target: str) -> tuple[str | None, str, str]:
    """(authority of an absolute-form target or None, path, query). RFC 9112 §3.2.2: a
    server MUST accept the absolute form, and its authority stands for the Host header."""
    authority: str | None = None
    lowered = target[:8].lower()
    if lowered.startswith(("http://", "https://")):
        rest = target[target.index("//") + 2 :]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, target = rest[:cut], rest[cut:]
        if not target.startswith("/"):
            target = "/" + target
    path, _, query = target.partition("?")
    return authority, path, query


def _is_loopback_listener(sockname: object) -> bool:
    if not isinstance(sockname, tuple):
        return False  # a Unix socket: no DNS name can lead to it
    return _is_loopback_address(str(sockname[0]))


@functools.lru_cache(maxsize=64)
def _is_loopback_address(address: str) -> bool:
    # Cached: the same few listening addresses, asked on every connection (ipaddress parses
    # in pure Python, ~10 µs).
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)  # a few Host values, asked on every request (bounded: any client picks them)
def _allowed_host(host: str, allowed: tuple[str, ...]) -> bool:
    """Is `host` (a Host header: name or address, maybe a port) one a loopback listener may
    answer? A DNS-rebinding page reaches it under the page's own name, a name in the public
    DNS that its author controls: never a loopback name or address, nor a name without a dot
    (no one can register one; only the operator's own hosts file or search domain resolves
    it). Ollama's fix for CVE-2024-28224 is the same kind of rule."""
    if not host:
        return True  # HTTP/1.0 without Host: no browser sends that
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".")
    if "." not in name or name.endswith(".localhost"):
        return True  # localhost, the machine's short name, x.localhost (RFC 6761 §6.3)
    try:
        if ipaddress.ip_address(name).is_loopback:
            return True
    except ValueError:
        pass
    return "*" in allowed or name in (entry.lower().rstrip(".") for entry in allowed)


def connection_cap(configured: int, open_files: int) -> int:
    """The most client connections the open-file limit allows: each may hold an upstream
    connection too, and some descriptors serve everything else."""
    return max(1, min(configured, (open_files - _FD_RESERVE) // 2))


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (nginx's `worker_rlimit_nofile`); the
    soft limit now in force. A shell's default soft limit (1024) is below what a gateway
    needs, and the hard one is the administrator's real bound."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or target <= soft:
        return soft if soft != resource.RLIM_INFINITY else 1 << 30
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


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
    open_files = raise_open_file_limit()
    cap = connection_cap(limits.max_connections, open_files)
    if cap < limits.max_connections:
        log.warning(
            "open-file limit %d allows %d client connections: max_connections lowered from %d",
            open_files,
            cap,
            limits.max_connections,
        )
        limits = replace(limits, max_connections=cap)
    else:
        log.info("open-file limit %d; max_connections %d", open_files, cap)
    loop = asyncio.get_running_loop()
    factory = lambda: HttpProtocol(handler, limits, tracker, render_error, check_head, body_limit)  # noqa: E731
    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=2048)
    return await loop.create_server(factory, host=host, port=port or 0, backlog=2048, reuse_address=True)

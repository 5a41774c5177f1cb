"""One llama-server answer for one client request: failover, then a relay chunk by chunk.

Until the client has been sent the answer's first event, a failed attempt is retried on the
balancer's next candidate, each upstream at most once, and the client never learns of it:
a refused or reset connection, a 5xx the request did not cause, a head followed by death
before the first token. From the first event on, a failure is the end of the answer.

Every attempt ends in one `Outcome` (its `Fault` and what the client hears); failover reads
it, and `_judge` applies it to the upstream's health, in one place. Only transport failures
(refused, reset, closed early, stalled, garbled) and server faults (a 5xx the request did not
cause) take an upstream out. An error the request caused (a 4xx, or llama-server's 500 "image
input is not supported" that translate/errors.py maps to a 400), an error llama-server reports
inside its stream, and an answer CaseDesk cannot use (chunks of the wrong shape, more than
`max_tokens` can produce) are the client's answer and leave the upstream's health alone; so
does this gateway's own failure (no file descriptor left to connect with: a 529).

Failures are values here, not exceptions kept in variables: an exception held by a frame its
traceback passes through would keep that frame, and the request's payload, alive in a cycle.

This is where upstream/ meets translate/: llama-server's error answers become Anthropic errors
(translate/errors.py) and chunks become events (translate/stream.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import orjson

from casedesk.anthropic.errors import ApiError, overloaded
from casedesk.http.sse import SseDecoder
from casedesk.translate.errors import stream_error_message, upstream_error
from casedesk.translate.fast_delta import WireTexts, text_delta, wire_events
from casedesk.translate.stream import StreamTranslator
from casedesk.upstream.affinity import RouteKey
from casedesk.upstream.balancer import Balancer, UpstreamState
from casedesk.upstream.client import MAX_ERROR_BODY, Exchange, open_exchange
from casedesk.upstream.connection import UpstreamError

log = logging.getLogger("casedesk.relay")

CHAT_PATH = "/v1/chat/completions"


def answer_limit(max_tokens: int) -> int:
    """The most event bytes an answer of `max_tokens` tokens can make: a bound for answers
    held whole (non-streamed), generous (a token's event is about 100 bytes)."""
    return (1 << 20) + 512 * max_tokens


class Fault(enum.Enum):
    """Whose doing the end of an attempt was: what failover and health go by."""

    NONE = "none"  # a complete answer
    REQUEST = "request"  # an error the request caused: the client's answer, the upstream is fine
    ANSWER = "answer"  # a 200 whose answer is an error or unusable: the client's answer
    SERVER = "server"  # a 5xx the request did not cause: the next upstream
    TRANSPORT = "transport"  # refused, reset, closed early, stalled, garbled: the next upstream
    GATEWAY = "gateway"  # this process failed (out of file descriptors): no one else's fault


_UPSTREAM_AT_FAULT = frozenset({Fault.SERVER, Fault.TRANSPORT})


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended. `error` is what the client hears (None: the answer is complete);
    `began`: the client had seen the answer's first event, so nothing can be retried."""

    fault: Fault
    error: ApiError | None = None
    began: bool = False

    @property
    def retry(self) -> bool:
        return not self.began and self.fault in _UPSTREAM_AT_FAULT

    def raise_error(self) -> None:
        """Raise a copy of `error`: the outcome may be held by a frame the raise passes through."""
        error = self.error
        if error is not None:
            raise ApiError(error.status, error.message, error.error_type, error.headers)


COMPLETE = Outcome(Fault.NONE)


def _judge(balancer: Balancer, state: UpstreamState, outcome: Outcome) -> None:
    """The one place an attempt moves its upstream's health."""
    if outcome.fault in _UPSTREAM_AT_FAULT:
        balancer.failed(state)
    elif outcome.fault is not Fault.GATEWAY:
        balancer.succeeded(state)  # it answered (rightly, when the request was at fault)


def _raise_last(last: Outcome | None) -> NoReturn:
    """The error of the last attempt that failed, or 502 when there was none to try."""
    if last is None:
        raise ApiError(502, "no upstream to try")
    last.raise_error()
    raise AssertionError("unreachable")


def _transport(error: UpstreamError) -> Outcome:
    if error.local:
        return Outcome(Fault.GATEWAY, overloaded(f"the gateway is overloaded: {error}"))
    return Outcome(Fault.TRANSPORT, ApiError(502, f"no upstream could be reached: {error}"))


async def _open(
    state: UpstreamState,
    method: str,
    path: str,
    body: bytes | None,
    read_timeout: float,
    sent: Callable[[], None] | None = None,
) -> Exchange | Outcome:
    """Send to one upstream: its 200 exchange, or the outcome of any other answer."""
    try:
        exchange = await open_exchange(state.pool, method, path, body, read_timeout, sent)
    except UpstreamError as exc:
        return _transport(exc)
    if exchange.head.status == 200:
        return exchange
    status = exchange.head.status
    try:
        raw = await exchange.read_body(MAX_ERROR_BODY)
    except UpstreamError as exc:  # an error it cannot even send (too large, cut): its fault
        message = f"upstream {state.pool.authority} failed (HTTP {status}) and its error could not be read: {exc}"
        return Outcome(Fault.SERVER, ApiError(502, message))
    finally:
        exchange.close()
    error = upstream_error(status, raw, state.pool.authority)
    return Outcome(Fault.SERVER if error.status >= 500 else Fault.REQUEST, error)


async def open_with_failover(
    balancer: Balancer, method: str, path: str, body: bytes | None, read_timeout: float
) -> Exchange:
    """A 200 exchange for `method path` with `body` from the best upstream that gives one,
    each tried at most once; otherwise raises the ApiError to send (the last server fault's,
    the request's own error at once, or 502 when none could be reached)."""
    last: Outcome | None = None  # (made only when needed: an exception is not free)
    for state in balancer.candidates():
        opened = await _open(state, method, path, body, read_timeout)
        if isinstance(opened, Exchange):
            _judge(balancer, state, COMPLETE)
            return opened
        _judge(balancer, state, opened)
        last = opened
        if not opened.retry:
            break
    _raise_last(last)


class AnswerRelay:
    """Relays one chat answer from the balancer's best upstream, through a StreamTranslator.

    `write` receives the answer's events as bytes, those of one upstream read joined in one
    call, the closing events (`StreamTranslator.finish`) included; `start` runs once, before
    the first write. Also the client socket's FlowListener: a client that stops reading
    pauses the upstream. `client_gone()` true stops the relay even if the cancellation that
    should have stopped it was lost (Python 3.11's `wait_for` can swallow one).
    `answer_limit`: the most event bytes to take (non-streamed answers are held whole).
    """

    def __init__(
        self,
        balancer: Balancer,
        read_timeout: float,
        route_key: RouteKey | None = None,
        *,
        client_gone: Callable[[], bool] | None = None,
        answer_limit: int | None = None,
    ) -> None:
        self.balancer = balancer
        self.read_timeout = read_timeout
        self.route_key = route_key  # where the prompt's cache most likely is (upstream/affinity.py)
        self.upstream = ""  # the authority of the upstream last tried (for the access log)
        self.client_gone = client_gone
        self.answer_limit = answer_limit
        self._current: _Attempt | None = None
        self._translator: StreamTranslator | None = None  # the last attempt's

    async def run(
        self,
        payload: bytes,
        new_translator: Callable[[], StreamTranslator],
        start: Callable[[], None],
        write: Callable[[bytes], None],
        on_first_token: Callable[[], None] | None = None,
        end: Callable[[bytes], None] | None = None,
        sent: Callable[[], None] | None = None,
    ) -> Outcome:
        """Relay the answer to `payload` (a llama-server chat request, streamed).

        new_translator: a fresh StreamTranslator for each attempt (a failed one said nothing).
        start: called once, before the first write (e.g. commit the response head).
        write: the answer's events, as bytes.
        on_first_token: called once, just before the first token is written.
        end: when given, a complete answer's last events go to it instead of `write`, so that
            they leave with the end of the response in one write (e.g. ResponseWriter.end).
        sent: called each time the request has been written to an upstream, while it works on
            it (e.g. ResponseWriter.prepare_stream: the head rendered before it is needed).
        Returns the outcome of the attempt that answered: complete (`error` None), or ended
        early after its first event (`error`: the event to end the stream with). Raises the
        ApiError to answer when no attempt's answer began.
        """
        last: Outcome | None = None
        for state in self.balancer.candidates(self.route_key):
            self.upstream = state.pool.authority
            with self.balancer.serving(self.route_key, state):
                outcome = await self._attempt(state, payload, new_translator, start, write, on_first_token, end, sent)
            _judge(self.balancer, state, outcome)
            if outcome.fault is Fault.NONE or outcome.began:
                return outcome
            last = outcome
            if not outcome.retry:
                break
            assert outcome.error is not None
            log.warning("upstream %s failed before the answer began: %s", self.upstream, outcome.error.message)
        _raise_last(last)

    async def _attempt(
        self,
        state: UpstreamState,
        payload: bytes,
        new_translator: Callable[[], StreamTranslator],
        start: Callable[[], None],
        write: Callable[[bytes], None],
        on_first_token: Callable[[], None] | None,
        end: Callable[[bytes], None] | None,
        sent: Callable[[], None] | None,
    ) -> Outcome:
        self._stop_if_client_gone()
        opened = await _open(state, "POST", CHAT_PATH, payload, self.read_timeout, sent)
        if isinstance(opened, Outcome):
            return opened
        try:
            self._stop_if_client_gone()
            self.balancer.served(self.route_key, state)
            translator = self._translator = new_translator()
            attempt = self._current = _Attempt(
                opened, translator, start, write, on_first_token, self.answer_limit, state.pool.authority, end
            )
            outcome = await attempt.run(self.client_gone)
            self._stop_if_client_gone()
            return outcome
        finally:
            self._current = None
            opened.close()

    def _stop_if_client_gone(self) -> None:
        if self.client_gone is not None and self.client_gone():
            raise asyncio.CancelledError("the client went away")

    def usage(self) -> dict[str, int]:
        """The usage of the last attempt's answer so far (its tokens counted when it was cut
        short); {} when none began."""
        translator = self._translator
        if translator is None or not translator.started:
            return {}
        if not translator.finished:
            try:
                translator.finish()  # only for its count: the client is gone or has its error
            except Exception:  # an unusable usage chunk: counted as nothing
                return {}
        return translator.final_usage

    # FlowListener: the client's socket is full / drained again.
    def pause(self) -> None:
        if self._current is not None:
            self._current.exchange.pause()

    def resume(self) -> None:
        if self._current is not None:
            self._current.exchange.resume()


def hand_over_cpu() -> None:
    """Let a runnable process have this CPU once, now that a stream's first token is written.

    Its reader (a client or a proxy on this box) was just woken, while llama-server goes on
    generating and this loop on relaying: on a box with fewer free cores than busy processes,
    the reader then waits for a scheduler tick, and the first token with it. Measured on the
    2-core box (make bench's fake upstream, 256-token streams one at a time, 1,600 streams each
    way, interleaved, twice in either order): first tokens read over 1.5 ms after the request
    18-19 % without, 9 % with; TTFT p50 0.94-1.02 -> 0.76-0.77 ms, p90 2.06 -> 1.41 ms. Only
    for a stream alone on its upstream: with others in flight, they would wait for it instead.
    One syscall a stream where nothing else wants the CPU."""
    _sched_yield()


_sched_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)


def _discard(_data: bytes) -> None:
    pass


class _Attempt:
    """One upstream's SSE stream → decoded chunks → translator → `write`.

    The translator's `cut` after a chunk means the answer is complete early (see its
    single_tool_use): the upstream is then closed, which also stops generation there.
    """

    __slots__ = (
        "exchange",
        "translator",
        "start",
        "write",
        "on_first_token",
        "last_write",
        "upstream",
        "pending",
        "begun",
        "waiting",
        "complete",
        "fault",
        "message",
        "limit",
        "taken",
        "sse",
        "streamed",
        "wire_texts",
    )

    def __init__(
        self,
        exchange: Exchange,
        translator: StreamTranslator,
        start: Callable[[], None],
        write: Callable[[bytes], None],
        on_first_token: Callable[[], None] | None,
        limit: int | None,
        upstream: str,
        end: Callable[[bytes], None] | None = None,
    ) -> None:
        self.exchange = exchange
        self.translator = translator
        self.start = start
        self.write = write if limit is None else self._bounded(write)
        self.on_first_token = on_first_token
        # A complete answer's last events (`end` takes them unbounded: only streams pass one).
        self.last_write = end if end is not None and limit is None else self.write
        self.upstream = upstream
        self.pending: list[bytes] = []
        self.begun = False  # `start` has run
        self.waiting = True  # for the first token to be written
        self.complete = False  # [DONE], or cut short on purpose
        self.fault: Fault | None = None  # what ended it early, once known
        self.message = ""
        self.limit = limit or 0
        self.taken = 0
        self.sse = SseDecoder(self.on_data, self.on_error)
        self.streamed = limit is None  # to a client as it comes (not held whole)
        self.wire_texts = WireTexts()  # (its envelope remembered from read to read)

    async def run(self, client_gone: Callable[[], bool] | None) -> Outcome:
        """Relay until the stream ends; the outcome says how it ended."""
        feed = self.sse.feed
        flush = self.flush

        def feed_then_flush(body: bytes) -> None:
            try:
                feed(body)
                flush()
            except Exception:
                # No upstream answer, however wrong, may reach the client as Python's words.
                log.warning("upstream %s sent an answer that cannot be translated: %.200r", self.upstream, body)
                log.debug("the translation failed", exc_info=True)
                self.end(Fault.ANSWER, "upstream sent a chunk of an unexpected shape")

        try:
            try:
                await self.exchange.relay(feed_then_flush, client_gone, self.take_raw)
            except UpstreamError as exc:
                if self.fault is None and not self.complete:
                    self.end(Fault.GATEWAY if exc.local else Fault.TRANSPORT, str(exc))
            if self.fault is None and not self.complete:
                self.end(Fault.TRANSPORT, "upstream ended the stream before the answer was complete")
            if self.fault is None:
                try:
                    self.pending.append(self.translator.finish())
                    self.flush(self.last_write)
                except Exception:
                    log.warning("upstream %s ended with a usage CaseDesk cannot read", self.upstream)
                    log.debug("the translation failed", exc_info=True)
                    self.pending.clear()
                    self.fault, self.message = Fault.ANSWER, "upstream sent a final chunk of an unexpected shape"
            if self.fault is None:
                return COMPLETE
            began = self.begun  # the client (or the accumulator) has had events: no retry
            if began:
                error = ApiError(502, f"upstream failed mid-stream: {self.message}")
            elif self.fault is Fault.TRANSPORT:
                error = ApiError(502, f"no upstream could be reached: {self.message}")
            else:
                error = ApiError(502, f"upstream {self.upstream} failed: {self.message}")
            return Outcome(self.fault, error, began)
        finally:
            self._let_go()

    def _let_go(self) -> None:
        """Break the cycles an attempt is in (its decoder holds its methods, a bounded write
        holds it): the request's objects are then freed by reference counts as it ends, not left
        for the garbage collector to find and walk (tests/test_relay.py)."""
        self.sse.close()
        self.write = self.last_write = _discard

    def take_raw(self, wire: bytes) -> int:
        """The whole chunks at the start of an upstream read, taken straight off the wire
        (translate/fast_delta.py) while each is a plain text delta (once the first token is out:
        `WireTexts.take`, the read's run of them translated in one call) or one single-line
        event or a few (`wire_events`, to `on_data` as the SSE decoder would give them); how many bytes were
        taken: the rest of the read goes through the decoders, in order. The read's events
        leave at its end in one write, the first token at once (on_data flushes it). Not while
        an event is half read."""
        if self.complete or self.fault is not None or not self.sse.idle:
            return 0
        translator, pending, take_texts = self.translator, self.pending, self.wire_texts.take
        pos, size = 0, len(wire)
        try:
            while pos < size:
                if not self.waiting:
                    texts: list[str] = []
                    pos = take_texts(wire, pos, texts)
                    if texts:
                        out = translator.feed_texts(texts)
                        if out:
                            pending.append(out)
                        if translator.cut:  # (text never cuts an answer short today: only a second tool call)
                            self.complete = True
                            self.flush()
                            self.exchange.abort()  # the answer is complete; llama-server stops here
                            return pos
                    if pos == size:
                        break  # (the read was all text: nothing left for wire_events to look at)
                events = wire_events(wire, pos)
                if events is None:
                    break
                payloads, pos = events
                for payload in payloads:
                    self.on_data(payload)
                if self.complete or self.fault is not None:
                    break
            self.flush()  # (this read's events, in one write)
        except Exception:
            log.warning("upstream %s sent an answer that cannot be translated: %.200r", self.upstream, wire[:200])
            log.debug("the translation failed", exc_info=True)
            self.end(Fault.ANSWER, "upstream sent a chunk of an unexpected shape")
            return size
        return pos

    def on_data(self, payload: bytes) -> None:
        if self.complete or self.fault is not None:
            return
        text = text_delta(payload)  # almost every chunk: one plain text delta, cut out unparsed
        if text is not None:
            out = self.translator.feed_text(text)
        else:
            if payload == b"[DONE]":
                self.complete = True
                return
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.end(Fault.TRANSPORT, f"upstream sent a malformed event: {payload[:100]!r}")
                return
            if not isinstance(chunk, dict) or "error" in chunk:
                self.end(Fault.ANSWER, stream_error_message(payload))
                return
            out = self.translator.feed(chunk)
        if out:
            self.pending.append(out)
            if self.waiting and self.translator.has_content:
                # The first token leaves at once, with message_start and the head, not after
                # the rest of this read (a fast upstream's first read may hold hundreds).
                self.flush()
        if self.translator.cut:
            self.complete = True
            self.exchange.abort()  # the answer is complete; llama-server stops here

    def flush(self, write: Callable[[bytes], None] | None = None) -> None:
        # The events of one upstream read leave in one write. Nothing waits for anything: each
        # read is written before the next is taken, but a burst of tokens (a fast model, or a
        # client catching up) costs one syscall instead of one each.
        pending = self.pending
        if pending:
            first = self.waiting
            if first:
                self._before_first_writes()
            (write or self.write)(pending[0] if len(pending) == 1 else b"".join(pending))
            pending.clear()
            if first and not self.waiting:
                pool = self.exchange.pool
                if self.streamed and pool.carries_one():
                    hand_over_cpu()  # (alone: with other streams in flight, they would wait instead)
                pool.answer_begun()  # (its spare opens while it runs)

    def _bounded(self, write: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """`write`, ending the answer once it would take more than `limit` bytes."""

        def bounded(data: bytes) -> None:
            self.taken += len(data)
            if self.taken > self.limit:
                self.end(Fault.ANSWER, f"upstream sent more than max_tokens allows (over {self.limit} bytes)")
                return
            write(data)

        return bounded

    def _before_first_writes(self) -> None:
        if not self.begun:
            self.begun = True
            self.start()
        if self.translator.has_content:
            self.waiting = False
            if self.on_first_token is not None:
                self.on_first_token()

    def on_error(self, payload: bytes) -> None:
        self.end(Fault.ANSWER, stream_error_message(payload))

    def end(self, fault: Fault, message: str) -> None:
        """The answer ends early: the first reason counts; the rest of this read is dropped."""
        if self.fault is None and not self.complete:
            self.fault = fault
            self.message = message
        self.pending.clear()
        self.exchange.abort()

"""One llama-server answer for one client request: failover, then a relay chunk by chunk.

Until the client has been sent the answer's first event, a failed attempt is retried on the
balancer's next candidate, each upstream at most once, and the client never learns of it:
a refused or reset connection, a 5xx the request did not cause, a head followed by death
before the first token. From the first event on, a failure is the end of the answer.

Health: only transport failures (refused, reset, closed early, stalled, garbled) and server
faults (a 5xx the request did not cause) take an upstream out. An error the request caused
(a 4xx, or llama-server's 500 "image input is not supported" that translate/errors.py maps to
a 400) is the client's answer and leaves the upstream's health alone.

This is where upstream/ meets translate/: llama-server's error answers become Anthropic errors
(translate/errors.py) and chunks become events (translate/stream.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson

from casedesk.anthropic.errors import ApiError
from casedesk.http.sse import SseDecoder
from casedesk.translate.errors import stream_error_message, upstream_error
from casedesk.translate.stream import StreamTranslator
from casedesk.upstream.affinity import RouteKey
from casedesk.upstream.balancer import Balancer, UpstreamState
from casedesk.upstream.client import Exchange, open_exchange
from casedesk.upstream.pool import UpstreamError

log = logging.getLogger("casedesk.relay")

CHAT_PATH = "/v1/chat/completions"


class _ServerFault(Exception):
    """A non-200 answer the request did not cause: worth trying the next upstream."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


async def _attempt(
    balancer: Balancer,
    state: UpstreamState,
    method: str,
    path: str,
    body: bytes | None,
    read_timeout: float,
    route_key: RouteKey | None = None,
) -> Exchange:
    """Send to one upstream; its 200 exchange. Raises UpstreamError (transport), _ServerFault,
    or the ApiError of an answer the request caused; health is updated accordingly, and a 200
    tells the balancer where this prompt's cache now is."""
    try:
        exchange = await open_exchange(state.pool, method, path, body, read_timeout)
    except UpstreamError:
        balancer.failed(state)
        raise
    if exchange.head.status == 200:
        balancer.succeeded(state)
        balancer.served(route_key, state)
        return exchange
    try:
        error = upstream_error(exchange.head.status, await exchange.read_body(), state.pool.authority)
    except UpstreamError:
        balancer.failed(state)
        raise
    finally:
        exchange.close()
    if error.status >= 500:
        balancer.failed(state)
        raise _ServerFault(error)
    balancer.succeeded(state)  # it answered, and rightly: the request was at fault
    raise error


def _final(error: Exception | None) -> ApiError:
    """What the client hears when every candidate failed: the last server's own error, or 502."""
    if isinstance(error, _ServerFault):
        return error.error
    return ApiError(502, f"no upstream could be reached: {error}")


async def open_with_failover(
    balancer: Balancer, method: str, path: str, body: bytes | None, read_timeout: float
) -> Exchange:
    """A 200 exchange for `method path` with `body` from the best upstream that gives one,
    each tried at most once; otherwise raises the ApiError to send (the last server fault's,
    the request's own error at once, or 502 when none could be reached)."""
    last: Exception | None = None
    for state in balancer.candidates():
        try:
            return await _attempt(balancer, state, method, path, body, read_timeout)
        except (UpstreamError, _ServerFault) as exc:
            last = exc
    raise _final(last)


class AnswerRelay:
    """Relays one chat answer from the balancer's best upstream, through a StreamTranslator.

    `write` receives the answer's events as bytes, those of one upstream read joined in one
    call; `start` runs once, before the first write. Also the client socket's FlowListener: a
    client that stops reading pauses the upstream.
    """

    def __init__(self, balancer: Balancer, read_timeout: float, route_key: RouteKey | None = None) -> None:
        self.balancer = balancer
        self.read_timeout = read_timeout
        self.route_key = route_key  # where the prompt's cache most likely is (upstream/affinity.py)
        self.upstream = ""  # the authority of the upstream last tried (for the access log)
        self._current: _Attempt | None = None

    async def run(
        self,
        payload: bytes,
        new_translator: Callable[[], StreamTranslator],
        start: Callable[[], None],
        write: Callable[[bytes], None],
        on_first_token: Callable[[], None] | None = None,
    ) -> tuple[StreamTranslator, str | None]:
        """Relay the answer to `payload` (a llama-server chat request, streamed).

        new_translator: a fresh StreamTranslator for each attempt (a failed one said nothing).
        start: called once, before the first write (e.g. commit the response head).
        write: the answer's events, as bytes.
        on_first_token: called once, just before the first token is written.
        Returns the translator that made the answer and what went wrong after its first event
        (None: the answer is complete). Raises ApiError when no attempt's answer began.
        """
        last: Exception | None = None
        for state in self.balancer.candidates(self.route_key):
            self.upstream = state.pool.authority
            with self.balancer.serving(self.route_key, state):
                try:
                    exchange = await _attempt(
                        self.balancer, state, "POST", CHAT_PATH, payload, self.read_timeout, self.route_key
                    )
                except (UpstreamError, _ServerFault) as exc:
                    last = exc
                    continue
                translator = new_translator()
                attempt = self._current = _Attempt(exchange, translator, start, write, on_first_token)
                try:
                    await attempt.run()
                finally:
                    self._current = None
                    exchange.close()
            if attempt.error is None:
                return translator, None
            if attempt.transport_failed:
                self.balancer.failed(state)
            if translator.started:
                return translator, attempt.error
            if not attempt.transport_failed:  # llama-server reported an error: its answer
                raise ApiError(502, f"upstream {self.upstream} failed: {attempt.error}")
            log.warning("upstream %s failed before the answer began: %s", self.upstream, attempt.error)
            last = UpstreamError(attempt.error)
        raise _final(last)

    # FlowListener: the client's socket is full / drained again.
    def pause(self) -> None:
        if self._current is not None:
            self._current.exchange.pause()

    def resume(self) -> None:
        if self._current is not None:
            self._current.exchange.resume()


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
        "pending",
        "begun",
        "waiting",
        "done",
        "error",
        "transport_failed",
    )

    def __init__(
        self,
        exchange: Exchange,
        translator: StreamTranslator,
        start: Callable[[], None],
        write: Callable[[bytes], None],
        on_first_token: Callable[[], None] | None,
    ) -> None:
        self.exchange = exchange
        self.translator = translator
        self.start = start
        self.write = write
        self.on_first_token = on_first_token
        self.pending: list[bytes] = []
        self.begun = False  # `start` has run
        self.waiting = True  # for the first token to be written
        self.done = False
        self.error: str | None = None
        self.transport_failed = False

    async def run(self) -> None:
        """Relay until the stream ends; afterwards `error` says what went wrong, if anything."""
        decoder = SseDecoder(self.on_data, self.on_error)
        feed = decoder.feed
        flush = self.flush

        def feed_then_flush(body: bytes) -> None:
            feed(body)
            flush()

        try:
            await self.exchange.relay(feed_then_flush)
        except UpstreamError as exc:
            if not self.translator.cut:
                self.fail(self.error or str(exc), transport=self.error is None)
        flush()
        if self.error is None and not self.done:
            self.fail("upstream ended the stream before the answer was complete", transport=True)

    def on_data(self, payload: bytes) -> None:
        if self.done:
            return
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.fail(f"upstream sent a malformed event: {payload[:100]!r}", transport=True)
            return
        if not isinstance(chunk, dict) or "error" in chunk:
            self.fail(stream_error_message(payload))
            return
        out = self.translator.feed(chunk)
        if out:
            self.pending.append(out)
            if self.waiting and self.translator.has_content:
                # The first token leaves at once, with message_start and the head, not after
                # the rest of this read (a fast upstream's first read may hold hundreds).
                self.flush()
        if self.translator.cut:
            self.done = True
            self.exchange.abort()  # the answer is complete; llama-server stops here

    def flush(self) -> None:
        # The events of one upstream read leave in one write. Nothing waits for anything: each
        # read is written before the next is taken, but a burst of tokens (a fast model, or a
        # client catching up) costs one syscall instead of one each.
        pending = self.pending
        if pending:
            if self.waiting:
                self._before_first_writes()
            self.write(pending[0] if len(pending) == 1 else b"".join(pending))
            pending.clear()

    def _before_first_writes(self) -> None:
        if not self.begun:
            self.begun = True
            self.start()
        if self.translator.has_content:
            self.waiting = False
            if self.on_first_token is not None:
                self.on_first_token()

    def on_error(self, payload: bytes) -> None:
        self.fail(stream_error_message(payload))

    def fail(self, message: str, *, transport: bool = False) -> None:
        if self.error is None:
            self.error = message
            self.transport_failed = transport
        self.done = True  # the rest of this read is not relayed
        self.exchange.abort()

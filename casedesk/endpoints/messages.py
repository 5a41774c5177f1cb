"""POST /proxy/{deployment}/anthropic/v1/messages: the Messages API, streamed or not.

auth → JSON → validation → model tag → admission → translate → upstream (with failover)
→ translate back → respond. llama-server is always asked for a stream: a streaming client
gets each chunk translated and written inside the same data_received call, with no task
switch per token (shared/design.md, "The hot path"); a non-streaming client gets the chunks
accumulated into one message. Either way the stall timeout means "no bytes for N seconds",
never "the answer is long".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from casedesk.anthropic.errors import ApiError
from casedesk.anthropic.schema import parse_messages_request
from casedesk.http.server import Request, ResponseWriter
from casedesk.http.sse import SseDecoder
from casedesk.ops.accesslog import RequestRecord
from casedesk.translate.errors import stream_error_message, upstream_error
from casedesk.translate.request import to_chat_request
from casedesk.translate.response import CompletionAccumulator, to_message
from casedesk.translate.stream import StreamTranslator
from casedesk.upstream.balancer import open_with_failover
from casedesk.upstream.client import Exchange
from casedesk.upstream.pool import UpstreamError

if TYPE_CHECKING:
    from casedesk.app import Gateway, ModelRoute

log = logging.getLogger("casedesk.messages")

CHAT_PATH = "/v1/chat/completions"


async def handle_messages(gateway: Gateway, request: Request, writer: ResponseWriter, deployment: str) -> None:
    record = request.record
    route = gateway.deployment(deployment, request)
    route.authorize(request.headers)
    parsed = parse_messages_request(gateway.anthropic_body(request))
    record.model, record.stream = parsed.model, parsed.stream
    model = route.model(parsed.model)
    record.tag = model.tag
    async with route.admission.slot():
        # llama-server is asked for the tag (the answer still names what the client asked for).
        payload = orjson.dumps({**to_chat_request(parsed, stream=True), "model": model.tag})
        exchange = await _open(gateway, model, payload)
        record.upstream = exchange.pool.authority
        try:
            if exchange.head.status != 200:
                raise upstream_error(exchange.head.status, await exchange.read_body(), exchange.pool.authority)
            if parsed.stream:
                translator = StreamTranslator(
                    parsed.model, wants_thinking=parsed.wants_thinking, single_tool_use=parsed.single_tool_use
                )
                await _relay_to_client(exchange, translator, writer, record)
            else:
                accumulator = CompletionAccumulator(single_tool_use=parsed.single_tool_use)
                relay = _Relay(exchange, accumulator.feed, lambda: accumulator.cut)
                await relay.run()
                if relay.error is not None:
                    raise ApiError(502, f"upstream failed: {relay.error}")
                message = to_message(accumulator.completion(), parsed.model, wants_thinking=parsed.wants_thinking)
                writer.send(200, orjson.dumps(message))
                usage = message["usage"]
                record.input_tokens = usage["input_tokens"] + usage["cache_read_input_tokens"]
                record.output_tokens = usage["output_tokens"]
        finally:
            exchange.close()


async def _open(gateway: Gateway, model: ModelRoute, payload: bytes) -> Exchange:
    try:
        exchange, _state = await open_with_failover(
            model.balancer, "POST", CHAT_PATH, payload, gateway.settings.upstream_read_timeout
        )
    except UpstreamError as exc:
        raise ApiError(502, f"no upstream for model {model.tag!r} could be reached: {exc}") from None
    return exchange


class _Relay:
    """Reads llama-server's SSE stream: each chunk, decoded, goes to `on_chunk`.

    `is_cut()` true after a chunk means the answer is complete early (see StreamTranslator's
    single_tool_use): the upstream is then closed, which also stops generation there.
    """

    __slots__ = ("exchange", "on_chunk", "is_cut", "after_read", "done", "error")

    def __init__(
        self,
        exchange: Exchange,
        on_chunk: Callable[[dict[str, Any]], None],
        is_cut: Callable[[], bool],
        after_read: Callable[[], None] | None = None,
    ) -> None:
        self.exchange = exchange
        self.on_chunk = on_chunk
        self.is_cut = is_cut
        self.after_read = after_read  # called once per upstream read, after its chunks
        self.done = False
        self.error: str | None = None

    async def run(self) -> None:
        """Relay until the stream ends; afterwards `error` says what went wrong, if anything."""
        decoder = SseDecoder(self.on_data, self.on_error)
        after_read = self.after_read
        sink: Callable[[bytes], None] = decoder.feed
        if after_read is not None:

            def feed_then_flush(body: bytes) -> None:
                decoder.feed(body)
                after_read()

            sink = feed_then_flush

        try:
            await self.exchange.relay(sink)
        except UpstreamError as exc:
            if not self.is_cut():
                self.error = self.error or str(exc)
        if self.error is None and not self.done:
            self.error = "upstream ended the stream before the answer was complete"

    def on_data(self, payload: bytes) -> None:
        if self.done:
            return
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.fail(f"upstream sent a malformed event: {payload[:100]!r}")
            return
        if not isinstance(chunk, dict) or "error" in chunk:
            self.fail(stream_error_message(payload))
            return
        self.on_chunk(chunk)
        if self.is_cut():
            self.done = True
            self.exchange.conn.abort()  # the answer is complete; llama-server stops here

    def on_error(self, payload: bytes) -> None:
        self.fail(stream_error_message(payload))

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        self.exchange.conn.abort()

    # FlowListener: the client's socket is full / drained again.
    def pause(self) -> None:
        self.exchange.pause()

    def resume(self) -> None:
        self.exchange.resume()


async def _relay_to_client(
    exchange: Exchange, translator: StreamTranslator, writer: ResponseWriter, record: RequestRecord
) -> None:
    write = writer.write
    pending: list[bytes] = []

    def on_chunk(chunk: dict[str, Any]) -> None:
        had_content = translator.has_content
        out = translator.feed(chunk)
        if out:
            if had_content:
                pending.append(out)
            else:
                write(out)  # up to and with the first token, every event leaves at once
                if translator.has_content:
                    record.ttft = time.monotonic() - record.started

    def flush() -> None:
        # Events that came in one upstream read leave in one write: nothing waits for
        # anything (each read is written before the next is taken), but a burst of tokens
        # (a fast model, or a client catching up) costs one syscall instead of one each.
        if pending:
            write(pending[0] if len(pending) == 1 else b"".join(pending))
            pending.clear()

    relay = _Relay(exchange, on_chunk, lambda: translator.cut, flush)
    writer.start_stream()
    writer.set_flow_listener(relay)
    await relay.run()
    flush()
    if relay.error is not None:
        log.warning("stream from %s failed: %s", exchange.pool.authority, relay.error)
        write(ApiError(529, f"upstream failed mid-stream: {relay.error}").sse_event())
    else:
        write(translator.finish())
    writer.end()
    usage = translator.final_usage
    record.input_tokens = usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)
    record.output_tokens = usage.get("output_tokens", 0)

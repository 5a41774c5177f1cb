"""POST /proxy/{deployment}/anthropic/v1/messages: the Messages API, streamed or not.

auth → JSON → validation → model tag → admission → translate → upstream (with failover)
→ translate back → respond. Streams are relayed by callbacks: each upstream chunk is
de-framed, decoded, translated and written to the client inside the same data_received
call, with no task switch per token (shared/design.md, "The hot path").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson

from casedesk.anthropic.errors import ApiError
from casedesk.anthropic.schema import MessagesRequest, parse_messages_request
from casedesk.http.server import Request, ResponseWriter
from casedesk.http.sse import SseDecoder
from casedesk.translate.errors import stream_error_message, upstream_error
from casedesk.translate.request import to_chat_request
from casedesk.translate.response import to_message
from casedesk.translate.stream import StreamTranslator
from casedesk.upstream.balancer import open_with_failover
from casedesk.upstream.client import Exchange
from casedesk.upstream.pool import UpstreamError

if TYPE_CHECKING:
    from casedesk.app import Gateway, ModelRoute

log = logging.getLogger("casedesk.messages")

CHAT_PATH = "/v1/chat/completions"


async def handle_messages(gateway: Gateway, request: Request, writer: ResponseWriter, deployment: str) -> None:
    route = gateway.deployment(deployment)
    route.authorize(request.headers)
    body = gateway.anthropic_body(request)
    parsed = parse_messages_request(body)
    model = route.model(parsed.model)
    async with route.admission.slot():
        payload = orjson.dumps(to_chat_request(parsed, stream=parsed.stream))
        exchange = await _open(gateway, model, payload)
        try:
            if exchange.head.status != 200:
                raise upstream_error(exchange.head.status, await exchange.read_body(), exchange.pool.authority)
            if parsed.stream:
                await _relay_stream(exchange, parsed, writer)
            else:
                completion = await exchange.read_json()
                if not isinstance(completion, dict):
                    raise ApiError(502, "upstream answered with an unexpected JSON shape")
                message = to_message(
                    completion, parsed.model, wants_thinking=parsed.wants_thinking, single_tool_use=parsed.single_tool_use
                )
                writer.send(200, orjson.dumps(message))
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


class _StreamRelay:
    """The callbacks of one streamed answer: upstream SSE payloads in, client events out."""

    __slots__ = ("exchange", "translator", "writer", "done", "error")

    def __init__(self, exchange: Exchange, translator: StreamTranslator, writer: ResponseWriter) -> None:
        self.exchange = exchange
        self.translator = translator
        self.writer = writer
        self.done = False
        self.error: str | None = None

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
        out = self.translator.feed(chunk)
        if out:
            self.writer.write(out)
        if self.translator.cut:
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


async def _relay_stream(exchange: Exchange, parsed: MessagesRequest, writer: ResponseWriter) -> None:
    translator = StreamTranslator(
        parsed.model, wants_thinking=parsed.wants_thinking, single_tool_use=parsed.single_tool_use
    )
    relay = _StreamRelay(exchange, translator, writer)
    decoder = SseDecoder(relay.on_data, relay.on_error)
    writer.start_stream()
    writer.set_flow_listener(relay)
    try:
        await exchange.relay(decoder.feed)
    except UpstreamError as exc:
        if not translator.cut:
            relay.error = relay.error or str(exc)
    if relay.error is None and not relay.done and translator.finish_reason is None:
        relay.error = "upstream ended the stream before the answer was complete"
    if relay.error is not None:
        log.warning("stream from %s failed: %s", exchange.pool.authority, relay.error)
        writer.write(ApiError(529, f"upstream failed mid-stream: {relay.error}").sse_event())
    else:
        writer.write(translator.finish())
    writer.end()

"""POST /proxy/{deployment}/anthropic/v1/messages: the Messages API, streamed or not.

auth → JSON → validation → model tag → admission → translate → upstream/relay.py (failover,
then chunk by chunk through one StreamTranslator) → respond. llama-server is always asked
for a stream: a streaming client gets each chunk translated and written inside the same
data_received call, with no task switch per token (docs/design.md, "The hot path"); a
non-streaming client gets the same events accumulated into one message. Either way the stall
timeout means "no bytes for N seconds", never "the answer is long".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from casedesk.anthropic.schema import MessagesRequest, parse_messages_request, request_json
from casedesk.http.keepalive import STREAM_HEADERS, StreamKeepAlive
from casedesk.http.server import Request, ResponseWriter
from casedesk.ops.accesslog import RequestRecord
from casedesk.serving import DeploymentState
from casedesk.translate.request import to_chat_request
from casedesk.translate.response import MessageAccumulator, new_message_id
from casedesk.translate.stream import StreamTranslator
from casedesk.upstream.relay import AnswerRelay, answer_limit

log = logging.getLogger("casedesk.messages")


async def handle_messages(
    deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    deployment.authorize(request.headers)
    parsed = parse_messages_request(request_json(request.headers, request.body))
    record.model, record.stream = parsed.model, parsed.stream
    # From here on a streamed request is never silent, whatever it waits for (queue, busy
    # slots, prefill, a model loading); an error after the head went out becomes an event
    # (app.py renders it).
    keepalive = StreamKeepAlive(writer, deployment.settings.stream_keepalive) if parsed.stream else None
    try:
        await _answer(deployment, parsed, writer, record)
    finally:
        if keepalive is not None:
            keepalive.cancel()


async def _answer(
    deployment: DeploymentState, parsed: MessagesRequest, writer: ResponseWriter, record: RequestRecord
) -> None:
    model = deployment.model(parsed.model)
    record.tag = model.tag
    # model.lease(): a managed model is loaded if needed and kept running until the end
    # (ondemand; issue 10). The wait for a load happens here, inside the handler.
    async with deployment.admission.slot(), model.lease():
        # llama-server is asked for the tag (the answer still names what the client asked for).
        chat = {**to_chat_request(parsed, stream=True), "model": model.tag}
        payload = orjson.dumps(chat)
        timeout = deployment.settings.upstream_read_timeout
        relay = AnswerRelay(
            model.balancer,
            timeout,
            model.balancer.route_key(chat),
            client_gone=lambda: writer.disconnected,
            # A non-streamed answer is held whole: no more than max_tokens can make.
            answer_limit=None if parsed.stream else answer_limit(parsed.max_tokens),
        )
        message_id = new_message_id()

        def new_translator() -> StreamTranslator:  # one per attempt; all give the same id
            return StreamTranslator(
                parsed.model,
                wants_thinking=parsed.wants_thinking,
                single_tool_use=parsed.single_tool_use,
                message_id=message_id,
            )

        try:
            if parsed.stream:
                await _stream(relay, payload, new_translator, writer, record)
            else:
                await _whole(relay, payload, new_translator, writer, record)
        finally:
            record.upstream = relay.upstream


async def _stream(
    relay: AnswerRelay,
    payload: bytes,
    new_translator: Callable[[], StreamTranslator],
    writer: ResponseWriter,
    record: RequestRecord,
) -> None:
    def start() -> None:
        if not writer.started:  # the keep-alive may have started it already
            writer.start_stream(headers=STREAM_HEADERS)

    def first_token() -> None:
        record.ttft = time.monotonic() - record.started

    writer.set_flow_listener(relay)
    try:
        outcome = await relay.run(payload, new_translator, start, writer.write, first_token)
    finally:
        _count(record, relay.usage())  # also when the client left: what it was sent
    start()
    if outcome.error is not None:
        log.warning("stream from %s failed: %s", relay.upstream, outcome.error.message)
        writer.write(outcome.error.sse_event())
    writer.end()


async def _whole(
    relay: AnswerRelay,
    payload: bytes,
    new_translator: Callable[[], StreamTranslator],
    writer: ResponseWriter,
    record: RequestRecord,
) -> None:
    accumulator = MessageAccumulator()  # fed only once an attempt's answer began: never twice
    try:
        outcome = await relay.run(payload, new_translator, lambda: None, accumulator.feed)
    finally:
        _count(record, relay.usage())
    outcome.raise_error()
    writer.send(200, orjson.dumps(accumulator.message))


def _count(record: RequestRecord, usage: dict[str, int]) -> None:
    record.input_tokens = usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)
    record.cached_tokens = usage.get("cache_read_input_tokens", 0)
    record.output_tokens = usage.get("output_tokens", 0)

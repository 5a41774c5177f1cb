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
from functools import partial
from typing import Any, cast

import orjson

from casedesk.anthropic.errors import ApiError
from casedesk.anthropic.schema import MessagesRequest, parse_messages_request, request_json
from casedesk.http.keepalive import STREAM_HEADERS, StreamKeepAlive
from casedesk.http.server import Request, ResponseWriter
from casedesk.ops.accesslog import RequestRecord
from casedesk.serving import DeploymentState
from casedesk.tenancy.charge import Charge
from casedesk.translate.request import to_chat_request
from casedesk.translate.response import MessageAccumulator, new_message_id
from casedesk.translate.stream import StreamTranslator
from casedesk.upstream.relay import AnswerRelay

log = logging.getLogger("casedesk.messages")


async def handle_messages(
    deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    record.tenant = tenant = deployment.authorize(request.headers, request.client)
    parsed = parse_messages_request(request_json(request.headers, request.body))
    record.model, record.stream = parsed.model, parsed.stream
    # The tenant's rate limits (issue 17): a 429 now, or its headers for the answer's head.
    charge = Charge(deployment.limiter, tenant)
    await charge.admit(partial(_note_limit, record))
    # From here on a streamed request is never silent, whatever it waits for (queue, busy
    # slots, prefill, a model loading); an error after the head went out becomes an event
    # (app.py renders it).
    keepalive = None
    if parsed.stream:
        keepalive = StreamKeepAlive(_headed(writer, charge.headers), deployment.settings.stream_keepalive)
    try:
        await _answer(deployment, parsed, writer, record, charge)
    finally:
        if keepalive is not None:
            keepalive.cancel()


def _note_limit(record: RequestRecord, _tenant: str, bucket: str) -> None:
    record.limit = bucket


class _HeadedWriter:
    """The writer as StreamKeepAlive sees it: a head it commits carries the rate-limit headers
    too (StreamKeepAlive always sends STREAM_HEADERS alone)."""

    __slots__ = ("_writer", "_headers")

    def __init__(self, writer: ResponseWriter, headers: tuple[tuple[str, str], ...]) -> None:
        self._writer = writer
        self._headers = headers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def start_stream(self, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._writer.start_stream(headers=(*headers, *self._headers))


def _headed(writer: ResponseWriter, headers: tuple[tuple[str, str], ...]) -> ResponseWriter:
    return writer if not headers else cast(ResponseWriter, _HeadedWriter(writer, headers))


async def _answer(
    deployment: DeploymentState,
    parsed: MessagesRequest,
    writer: ResponseWriter,
    record: RequestRecord,
    charge: Charge,
) -> None:
    model = deployment.model(parsed.model)
    record.tag = model.tag
    # model.lease(): a managed model is loaded if needed and kept running until the end
    # (ondemand; issue 10). The wait for a load happens here, inside the handler.
    async with deployment.admission.slot(charge.tenant), model.lease():
        # llama-server is asked for the tag (the answer still names what the client asked for).
        chat = {**to_chat_request(parsed, stream=True), "model": model.tag}
        payload = orjson.dumps(chat)
        timeout = deployment.settings.upstream_read_timeout
        relay = AnswerRelay(model.balancer, timeout, model.balancer.route_key(chat))
        message_id = new_message_id()

        made: list[StreamTranslator] = []

        def new_translator() -> StreamTranslator:  # one per attempt; all give the same id
            made.append(
                StreamTranslator(
                    parsed.model,
                    wants_thinking=parsed.wants_thinking,
                    single_tool_use=parsed.single_tool_use,
                    message_id=message_id,
                )
            )
            return made[-1]

        def begun() -> None:  # message_start: the uncached prompt tokens are known
            charge.input_known(made[-1].prompt_usage[0])

        try:
            if parsed.stream:
                await _stream(relay, payload, new_translator, writer, record, begun, charge.headers)
            else:
                await _whole(relay, payload, new_translator, writer, record, begun, charge.headers)
        finally:
            record.upstream = relay.upstream
            _charge_end(charge, made[-1] if made else None)


def _charge_end(charge: Charge, translator: StreamTranslator | None) -> None:
    """What the request used, once it ended (well, failed, or with its client gone)."""
    if translator is None:
        return
    if translator.finished:
        usage = translator.final_usage
        charge.end(usage.get("input_tokens", 0), usage.get("output_tokens", 0))
    else:
        charge.end(translator.prompt_usage[0], translator.generated)


async def _stream(
    relay: AnswerRelay,
    payload: bytes,
    new_translator: Callable[[], StreamTranslator],
    writer: ResponseWriter,
    record: RequestRecord,
    begun: Callable[[], None],
    headers: tuple[tuple[str, str], ...],
) -> None:
    def start() -> None:
        begun()
        if not writer.started:  # the keep-alive may have started it already
            writer.start_stream(headers=(*STREAM_HEADERS, *headers))

    def first_token() -> None:
        record.ttft = time.monotonic() - record.started

    writer.set_flow_listener(relay)
    translator, error = await relay.run(payload, new_translator, start, writer.write, first_token)
    start()
    if error is not None:
        log.warning("stream from %s failed: %s", relay.upstream, error)
        writer.write(ApiError(502, f"upstream failed mid-stream: {error}").sse_event())
    else:
        writer.write(translator.finish())
    writer.end()
    _count(record, translator.final_usage)


async def _whole(
    relay: AnswerRelay,
    payload: bytes,
    new_translator: Callable[[], StreamTranslator],
    writer: ResponseWriter,
    record: RequestRecord,
    begun: Callable[[], None],
    headers: tuple[tuple[str, str], ...],
) -> None:
    accumulator = MessageAccumulator()  # fed only once an attempt's answer began: never twice
    translator, error = await relay.run(payload, new_translator, begun, accumulator.feed)
    if error is not None:
        raise ApiError(502, f"upstream failed: {error}")
    accumulator.feed(translator.finish())
    writer.send(200, orjson.dumps(accumulator.message), headers=headers)
    _count(record, translator.final_usage)


def _count(record: RequestRecord, usage: dict[str, int]) -> None:
    record.input_tokens = usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)
    record.cached_tokens = usage.get("cache_read_input_tokens", 0)
    record.output_tokens = usage.get("output_tokens", 0)

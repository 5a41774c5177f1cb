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

from casedesk.anthropic.schema import MessagesRequest
from casedesk.endpoints.model_facts import has_later_system_turn, takes_mid_system_turns
from casedesk.endpoints.request_body import chat_payload, parsed_request, sized_work
from casedesk.http.keepalive import STREAM_HEADERS, StreamKeepAlive
from casedesk.http.server import Request, ResponseWriter
from casedesk.ops.accesslog import RequestRecord
from casedesk.serving import DeploymentState, Lease, ModelState
from casedesk.tenancy.charge import Charge
from casedesk.translate.request import repairable_tools, to_chat_request
from casedesk.translate.response import MessageAccumulator, new_message_id
from casedesk.translate.stream import StreamTranslator
from casedesk.upstream.affinity import RouteKey, route_key
from casedesk.upstream.relay import AnswerRelay, answer_limit

log = logging.getLogger("casedesk.messages")


async def handle_messages(
    deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    record.tenant = tenant = deployment.authorize(request.headers, request.client)
    parsed = await parsed_request(deployment, request)
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
        await _answer(deployment, parsed, writer, record, charge, len(request.body))
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
    size: int,
) -> None:
    model = deployment.model(parsed.model)
    record.tag = model.tag
    # model.lease(): a managed model is loaded if needed and kept running until the end
    # (README, "Models on demand"). The wait for a load happens here, inside the handler.
    async with deployment.admission.slot(charge.tenant), model.lease() as lease:
        answer = await _prepare(deployment, model, parsed, size, charge, lease, lambda: writer.disconnected)
        try:
            if parsed.stream:
                await _stream(answer, writer, record, charge.headers)
            else:
                message = await _whole(answer, record)
                writer.send(200, orjson.dumps(message), headers=charge.headers)
        finally:
            record.upstream = answer.relay.upstream
            _charge_end(charge, answer.made[-1] if answer.made else None)


async def answer_message(
    deployment: DeploymentState, parsed: MessagesRequest, record: RequestRecord, charge: Charge
) -> dict[str, Any]:
    """The message a non-streamed POST …/v1/messages answers `parsed` with, for a caller with no
    HTTP writer that already holds an admission slot (a batch item: casedesk/batches/runner.py);
    it raises the ApiError the endpoint would answer."""
    model = deployment.model(parsed.model)
    record.tag = model.tag
    async with model.lease() as lease:
        answer = await _prepare(deployment, model, parsed, 0, charge, lease)
        try:
            return await _whole(answer, record)
        finally:
            record.upstream = answer.relay.upstream
            _charge_end(charge, answer.made[-1] if answer.made else None)


class _Answer:
    """One answer's relay, payload and translators (one per attempt, all with the same id)."""

    __slots__ = ("relay", "payload", "made", "_parsed", "_message_id", "_charge")

    def __init__(self, relay: AnswerRelay, payload: bytes, parsed: MessagesRequest, charge: Charge) -> None:
        self.relay = relay
        self.payload = payload
        self.made: list[StreamTranslator] = []
        self._parsed = parsed
        self._message_id = new_message_id()
        self._charge = charge

    def new_translator(self) -> StreamTranslator:
        parsed = self._parsed
        self.made.append(
            StreamTranslator(
                parsed.model,
                wants_thinking=parsed.wants_thinking,
                single_tool_use=parsed.single_tool_use,
                message_id=self._message_id,
                max_tokens=parsed.max_tokens,
                repair_tools=repairable_tools(parsed),
            )
        )
        return self.made[-1]

    def begun(self) -> None:
        """message_start: the uncached prompt tokens are known, and charged."""
        self._charge.input_known(self.made[-1].prompt_usage[0])


async def _prepare(
    deployment: DeploymentState,
    model: ModelState,
    parsed: MessagesRequest,
    size: int,
    charge: Charge,
    lease: Lease,
    client_gone: Callable[[], bool] | None = None,
) -> _Answer:
    timeout = deployment.settings.upstream_read_timeout
    fold = has_later_system_turn(parsed.messages) and not await takes_mid_system_turns(model, timeout)
    payload, key = await sized_work(deployment, size, _chat_request, parsed, model, fold)
    slot = await lease.pin(key)
    if slot is not None:  # the slot that holds (or was just given) this prompt's cache (issue 20)
        payload = b'{"id_slot":%d,' % slot + payload[1:]  # orjson's object: "{" then its members
    relay = AnswerRelay(
        model.balancer,
        timeout,
        key,
        client_gone=client_gone,
        # A non-streamed answer is held whole: no more than max_tokens can make.
        answer_limit=None if parsed.stream else answer_limit(parsed.max_tokens),
    )
    return _Answer(relay, payload, parsed, charge)


def _charge_end(charge: Charge, translator: StreamTranslator | None) -> None:
    """What the request used, once it ended (well, failed, or with its client gone)."""
    if translator is None:
        return
    if translator.finished:
        usage = translator.final_usage
        charge.end(usage.get("input_tokens", 0), usage.get("output_tokens", 0))
    else:
        charge.end(translator.prompt_usage[0], translator.generated)


def _chat_request(parsed: MessagesRequest, model: ModelState, fold: bool) -> tuple[bytes, RouteKey | None]:
    """The llama-server request's bytes (llama-server is asked for the tag), and its route
    key (pure work that grows with the conversation: off the loop for a large body). A
    managed model always gets the key: its slots are chosen by it (ops/slotcache.py)."""
    chat = {**to_chat_request(parsed, stream=True, fold_system=fold), "model": model.tag}
    key = route_key(chat) if model.managed is not None else model.balancer.route_key(chat)
    return chat_payload(chat), key


async def _stream(
    answer: _Answer, writer: ResponseWriter, record: RequestRecord, headers: tuple[tuple[str, str], ...]
) -> None:
    relay = answer.relay

    def start() -> None:
        answer.begun()
        if not writer.started:  # the keep-alive may have started it already
            writer.start_stream(headers=(*STREAM_HEADERS, *headers))

    def first_token() -> None:
        record.ttft = time.monotonic() - record.started

    writer.set_flow_listener(relay)
    try:
        outcome = await relay.run(answer.payload, answer.new_translator, start, writer.write, first_token)
    finally:
        _count(record, answer)  # also when the client left: what it was sent
    start()
    if outcome.error is not None:
        log.warning("stream from %s failed: %s", relay.upstream, outcome.error.message)
        writer.write(outcome.error.sse_event())
    writer.end()


async def _whole(answer: _Answer, record: RequestRecord) -> dict[str, Any]:
    accumulator = MessageAccumulator()  # fed only once an attempt's answer began: never twice
    try:
        outcome = await answer.relay.run(answer.payload, answer.new_translator, answer.begun, accumulator.feed)
    finally:
        _count(record, answer)
    outcome.raise_error()
    return accumulator.message


def _count(record: RequestRecord, answer: _Answer) -> None:
    """The usage of the answer the client got (the relay's last attempt), however it ended."""
    usage = answer.relay.usage()  # (the relay's closing events made it, or it counts the cut)
    if not answer.made:
        return
    translator = answer.made[-1]
    record.repaired_tool_calls = int(translator.repaired)
    record.input_tokens = usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)
    record.cached_tokens = usage.get("cache_read_input_tokens", 0)
    record.output_tokens = usage.get("output_tokens", 0)

"""POST /proxy/{deployment}/anthropic/v1/messages: the Messages API, streamed or not.

auth → JSON → validation → rate limits → admission → answering/answer.py (translate, then
upstream/relay.py: failover, chunk by chunk through one StreamTranslator) → respond. llama-server is always asked
for a stream: a streaming client gets each chunk translated and written inside the same
data_received call, with no task switch per token (docs/design.md, "The hot path"); a
non-streaming client gets the same events accumulated into one message. Either way the stall
timeout means "no bytes for N seconds", never "the answer is long".
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, cast

import orjson

from casedesk.anthropic.schema import MessagesRequest
from casedesk.answering.answer import Answer, prepare, whole
from casedesk.endpoints.request_body import parsed_request
from casedesk.http.keepalive import STREAM_HEADERS, StreamKeepAlive
from casedesk.http.server import Request, ResponseWriter
from casedesk.ops.accesslog import RequestRecord
from casedesk.serving import DeploymentState
from casedesk.tenancy.charge import Charge

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
        answer = await prepare(deployment, model, parsed, size, charge, lease, lambda: writer.disconnected)
        try:
            if parsed.stream:
                await _stream(answer, writer, record, charge.headers)
            else:
                message = await whole(answer, record)
                writer.send(200, orjson.dumps(message), headers=charge.headers)
        finally:
            record.upstream = answer.relay.upstream
            answer.charge_end()


async def _stream(
    answer: Answer, writer: ResponseWriter, record: RequestRecord, headers: tuple[tuple[str, str], ...]
) -> None:
    relay = answer.relay
    head = (*STREAM_HEADERS, *headers)

    def sent() -> None:
        writer.prepare_stream(headers=head)  # while llama-server reads the prompt

    def start() -> None:
        answer.begun()
        if not writer.started:  # the keep-alive may have started it already
            writer.start_stream(headers=head)

    def first_token() -> None:
        record.ttft = time.monotonic() - record.started

    writer.set_flow_listener(relay)
    try:
        outcome = await relay.run(
            answer.payload, answer.new_translator, start, writer.write, first_token, writer.end, sent
        )
    finally:
        answer.count(record)  # also when the client left: what it was sent
    start()
    if outcome.error is not None:
        log.warning("stream from %s failed: %s", relay.upstream, outcome.error.message)
        writer.write(outcome.error.sse_event())
    writer.end()  # (a complete answer's last events ended it already)

"""One checked Messages request answered by a deployment's model: the chat request built (its
system turns folded where the template needs it, its slot pinned), relayed with failover, its
usage counted and charged to the tenant.

POST …/v1/messages streams it to the client (endpoints/messages.py) or sends it whole; a batch
item (batches/runner.py) takes it whole through `answer_message`. Both run exactly this code,
so a batch result is the very message /v1/messages would have answered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from casedesk.anthropic.schema import MessagesRequest
from casedesk.answering.model_facts import has_later_system_turn, takes_mid_system_turns
from casedesk.answering.work import chat_payload, sized_work
from casedesk.ops.accesslog import RequestRecord
from casedesk.serving import DeploymentState, Lease, ModelState
from casedesk.tenancy.charge import Charge
from casedesk.translate.request import repairable_tools, to_chat_request
from casedesk.translate.response import MessageAccumulator, new_message_id
from casedesk.translate.stream import StreamTranslator
from casedesk.upstream.affinity import RouteKey, route_key
from casedesk.upstream.relay import AnswerRelay, answer_limit


class Answer:
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

    def count(self, record: RequestRecord) -> None:
        """The usage of the answer the client got (the relay's last attempt), however it ended."""
        usage = self.relay.usage()  # (the relay's closing events made it, or it counts the cut)
        if not self.made:
            return
        translator = self.made[-1]
        record.repaired_tool_calls = int(translator.repaired)
        record.input_tokens = usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)
        record.cached_tokens = usage.get("cache_read_input_tokens", 0)
        record.output_tokens = usage.get("output_tokens", 0)

    def charge_end(self) -> None:
        """What the request used, once it ended (well, failed, or with its client gone)."""
        if not self.made:
            return
        translator = self.made[-1]
        if translator.finished:
            usage = translator.final_usage
            self._charge.end(usage.get("input_tokens", 0), usage.get("output_tokens", 0))
        else:
            self._charge.end(translator.prompt_usage[0], translator.generated)


async def prepare(
    deployment: DeploymentState,
    model: ModelState,
    parsed: MessagesRequest,
    size: int,
    charge: Charge,
    lease: Lease,
    client_gone: Callable[[], bool] | None = None,
) -> Answer:
    """The answer to relay: its payload built (off the loop for a large body) and its slot pinned."""
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
    return Answer(relay, payload, parsed, charge)


async def whole(answer: Answer, record: RequestRecord) -> dict[str, Any]:
    """The answer as one message (the relay's events accumulated); raises its ApiError."""
    accumulator = MessageAccumulator()  # fed only once an attempt's answer began: never twice
    try:
        outcome = await answer.relay.run(answer.payload, answer.new_translator, answer.begun, accumulator.feed)
    finally:
        answer.count(record)
    outcome.raise_error()
    return accumulator.message


async def answer_message(
    deployment: DeploymentState, parsed: MessagesRequest, record: RequestRecord, charge: Charge
) -> dict[str, Any]:
    """The message a non-streamed POST …/v1/messages answers `parsed` with, for a caller with no
    HTTP writer that already holds an admission slot (a batch item: casedesk/batches/runner.py);
    it raises the ApiError the endpoint would answer."""
    model = deployment.model(parsed.model)
    record.tag = model.tag
    async with model.lease() as lease:
        answer = await prepare(deployment, model, parsed, 0, charge, lease)
        try:
            return await whole(answer, record)
        finally:
            record.upstream = answer.relay.upstream
            answer.charge_end()


def _chat_request(parsed: MessagesRequest, model: ModelState, fold: bool) -> tuple[bytes, RouteKey | None]:
    """The llama-server request's bytes (llama-server is asked for the tag), and its route
    key (pure work that grows with the conversation: off the loop for a large body). A
    managed model always gets the key: its slots are chosen by it (ops/slotcache.py)."""
    chat = {**to_chat_request(parsed, stream=True, fold_system=fold), "model": model.tag}
    key = route_key(chat) if model.managed is not None else model.balancer.route_key(chat)
    return chat_payload(chat), key

"""StreamTranslator and the whole-answer mapping, without sockets: chunks in, events out.

The final events are fed to the official SDK's own accumulator, so what a client builds
from them is checked too.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from casedesk.translate.response import CompletionAccumulator, to_message
from casedesk.translate.stream import StreamTranslator

EVENT = TypeAdapter(RawMessageStreamEvent)


def delta(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "finish_reason": None, "delta": fields}]}


def finish(reason: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "finish_reason": reason, "delta": {}}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 10}}}
PROGRESS = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}],
            "prompt_progress": {"total": 30, "cache": 10, "processed": 20, "time_ms": 3}}


def run(chunks: list[dict[str, Any]], **options: Any) -> list[tuple[str, dict[str, Any]]]:
    translator = StreamTranslator("tag", **{"wants_thinking": False, **options})
    raw = b"".join(translator.feed(c) for c in chunks) + translator.finish()
    events = []
    for block in raw.decode().strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        events.append((name_line[7:], orjson.loads(data_line[6:])))
    return events


def sdk_message(events: list[tuple[str, dict[str, Any]]]) -> Any:
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for _, data in events:
        if data["type"] == "ping":
            continue
        snapshot = accumulate_event(event=EVENT.validate_python(data), current_snapshot=snapshot, json_bufs=json_bufs)
    return snapshot


def test_text_stream_is_the_full_anthropic_sequence() -> None:
    events = run([PROGRESS, delta(role="assistant", content=None), delta(content="Hel"), delta(content="lo"), finish("stop"), USAGE])
    assert [n for n, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["usage"] == {"input_tokens": 20, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 10}
    assert start["model"] == "tag" and start["id"].startswith("msg_")
    message = sdk_message(events)
    assert message.content[0].text == "Hello" and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 5 and message.usage.input_tokens == 20


def test_later_progress_chunks_are_pings_at_most_once_an_interval() -> None:
    events = run([PROGRESS, PROGRESS, PROGRESS, delta(content="x"), finish("stop")], ping_interval=0)
    assert [n for n, _ in events][:3] == ["message_start", "ping", "ping"]
    events = run([PROGRESS, PROGRESS, PROGRESS, delta(content="x"), finish("stop")], ping_interval=60)
    assert [n for n, _ in events][:2] == ["message_start", "content_block_start"]


@pytest.mark.parametrize("text", ['say "hi"', "back\\slash", "new\nline", "tab\tand\u0001ctl", "é 中文 🐉", "</script>"])
def test_pre_encoded_text_delta_equals_the_obvious_encoding(text: str) -> None:
    translator = StreamTranslator("tag", wants_thinking=False)
    translator.feed(PROGRESS)
    out = translator.feed(delta(content="a"))  # opens the block
    fast = translator.feed(delta(content=text))
    slow = b"event: content_block_delta\ndata: " + orjson.dumps(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    ) + b"\n\n"
    assert out.endswith(b"\n\n") and fast == slow


def test_thinking_then_text_with_a_signature_when_asked() -> None:
    chunks = [PROGRESS, delta(reasoning_content="step 1. "), delta(reasoning_content="step 2."), delta(content="42"), finish("stop")]
    events = run(chunks, wants_thinking=True)
    kinds = [(n, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type")) for n, d in events]
    assert kinds[1:8] == [
        ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"), ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None), ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"),
    ]
    message = sdk_message(events)
    assert message.content[0].thinking == "step 1. step 2." and message.content[0].signature
    assert message.content[1].text == "42"


def test_reasoning_not_asked_for_is_dropped_with_pings() -> None:
    events = run([PROGRESS, delta(reasoning_content="secret"), delta(content="answer"), finish("stop")], wants_thinking=False)
    assert "secret" not in orjson.dumps(events).decode()
    assert [n for n, _ in events][1] == "ping"
    assert sdk_message(events).content[0].text == "answer"


def tool_chunks() -> list[dict[str, Any]]:
    return [
        PROGRESS,
        delta(content="Let me look."),
        delta(tool_calls=[{"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}]),
        delta(tool_calls=[{"index": 1, "id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}}]),
        finish("tool_calls"),
        USAGE,
    ]


def test_several_tool_calls_are_blocks_in_order_that_the_sdk_parses() -> None:
    events = run(tool_chunks(), wants_thinking=False)
    starts = [d for n, d in events if n == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use", "tool_use"]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "weather", "input": {}}
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert stops == [0, 1, 2]
    message = sdk_message(events)
    assert [(b.type, getattr(b, "input", None)) for b in message.content] == [
        ("text", None), ("tool_use", {"city": "Oslo"}), ("tool_use", {})]
    assert message.stop_reason == "tool_use"


def test_single_tool_use_cuts_at_the_second_call() -> None:
    translator = StreamTranslator("tag", wants_thinking=False, single_tool_use=True)
    for chunk in tool_chunks()[:5]:
        translator.feed(chunk)
    assert not translator.cut
    assert translator.feed(tool_chunks()[5]) == b"" and translator.cut
    assert b'"stop_reason":"tool_use"' in translator.finish()


def test_max_tokens_and_stop_sequence_stop_reasons() -> None:
    assert run([PROGRESS, delta(content="a"), finish("length")])[-2][1]["delta"]["stop_reason"] == "max_tokens"
    stopped = {**finish("stop"), "__verbose": {"stop_type": "word", "stopping_word": "END"}}
    assert run([PROGRESS, delta(content="a"), stopped])[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    eos = {**finish("stop"), "__verbose": {"stop_type": "eos", "stopping_word": ""}}
    assert run([PROGRESS, delta(content="a"), eos])[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


def test_accumulated_chunks_make_the_same_message_as_the_stream() -> None:
    accumulator = CompletionAccumulator()
    for chunk in tool_chunks():
        accumulator.feed(chunk)
    message = to_message(accumulator.completion(), "tag", wants_thinking=False)
    streamed = sdk_message(run(tool_chunks(), wants_thinking=False))
    assert message["content"] == [b.model_dump(exclude_none=True) for b in streamed.content]
    assert message["stop_reason"] == streamed.stop_reason == "tool_use"
    assert message["usage"] == {"input_tokens": 20, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 10}


def test_whole_completion_mapping() -> None:
    completion = {
        "choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": "hi", "reasoning_content": "r",
                                                            "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a": [1]}'}}]}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}},
    }
    message = to_message(completion, "tag", wants_thinking=True)
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use"]
    assert message["content"][2] == {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": [1]}}
    assert message["stop_reason"] == "tool_use" and message["model"] == "tag"
    assert message["usage"]["input_tokens"] == 5 and message["usage"]["cache_read_input_tokens"] == 4
    assert [b["type"] for b in to_message(completion, "tag", wants_thinking=False)["content"]] == ["text", "tool_use"]

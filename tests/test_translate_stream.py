"""StreamTranslator and the whole message built from its events, without sockets.

The final events are fed to the official SDK's own accumulator, so what a client builds
from them is checked too; MessageAccumulator (the non-streamed answer) must build the same.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from casedesk.translate.response import MessageAccumulator
from casedesk.translate.stream import StreamTranslator

EVENT = TypeAdapter(RawMessageStreamEvent)


def delta(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "finish_reason": None, "delta": fields}]}


def finish(reason: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "finish_reason": reason, "delta": {}}]}


USAGE = {
    "choices": [],
    "usage": {"prompt_tokens": 30, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 10}},
}
PROGRESS = {
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}],
    "prompt_progress": {"total": 30, "cache": 10, "processed": 20, "time_ms": 3},
}


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
    events = run(
        [
            PROGRESS,
            delta(role="assistant", content=None),
            delta(content="Hel"),
            delta(content="lo"),
            finish("stop"),
            USAGE,
        ]
    )
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["usage"] == {
        "input_tokens": 20,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 10,
    }
    assert start["model"] == "tag" and start["id"].startswith("msg_")
    message = sdk_message(events)
    assert message.content[0].text == "Hello" and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 5 and message.usage.input_tokens == 20


def test_progress_chunks_say_nothing_until_the_answer_begins() -> None:
    translator = StreamTranslator("tag", wants_thinking=False)
    assert translator.feed(PROGRESS) == b"" and translator.feed(PROGRESS) == b"" and not translator.started
    out = translator.feed(delta(role="assistant", content=None))
    assert out.startswith(b"event: message_start\n") and translator.started and not translator.has_content
    assert b'"input_tokens":20' in out and b'"cache_read_input_tokens":10' in out


@pytest.mark.parametrize(
    "text", ['say "hi"', "back\\slash", "new\nline", "tab\tand\u0001ctl", "é 中文 🐉", "</script>"]
)
def test_pre_encoded_text_delta_equals_the_obvious_encoding(text: str) -> None:
    translator = StreamTranslator("tag", wants_thinking=False)
    translator.feed(PROGRESS)
    out = translator.feed(delta(content="a"))  # opens the block
    fast = translator.feed(delta(content=text))
    slow = (
        b"event: content_block_delta\ndata: "
        + orjson.dumps({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
        + b"\n\n"
    )
    assert out.endswith(b"\n\n") and fast == slow


def test_thinking_then_text_with_a_signature_when_asked() -> None:
    chunks = [
        PROGRESS,
        delta(reasoning_content="step 1. "),
        delta(reasoning_content="step 2."),
        delta(content="42"),
        finish("stop"),
    ]
    events = run(chunks, wants_thinking=True)
    kinds = [(n, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type")) for n, d in events]
    assert kinds[1:8] == [
        ("content_block_start", 0, "thinking"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"),
        ("content_block_delta", 1, "text_delta"),
    ]
    message = sdk_message(events)
    assert message.content[0].thinking == "step 1. step 2." and message.content[0].signature
    assert message.content[1].text == "42"


def test_reasoning_not_asked_for_is_dropped() -> None:
    events = run(
        [PROGRESS, delta(reasoning_content="secret"), delta(content="answer"), finish("stop")], wants_thinking=False
    )
    assert "secret" not in orjson.dumps(events).decode()
    assert [n for n, _ in events][:2] == ["message_start", "content_block_start"]
    assert sdk_message(events).content[0].text == "answer"


def tool_chunks() -> list[dict[str, Any]]:
    return [
        PROGRESS,
        delta(content="Let me look."),
        delta(
            tool_calls=[
                {"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}
            ]
        ),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}]),
        delta(
            tool_calls=[
                {"index": 1, "id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}}
            ]
        ),
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
        ("text", None),
        ("tool_use", {"city": "Oslo"}),
        ("tool_use", {}),
    ]
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
    assert run([PROGRESS, delta(content="a"), stopped])[-2][1]["delta"] == {
        "stop_reason": "stop_sequence",
        "stop_sequence": "END",
    }
    eos = {**finish("stop"), "__verbose": {"stop_type": "eos", "stopping_word": ""}}
    assert run([PROGRESS, delta(content="a"), eos])[-2][1]["delta"] == {
        "stop_reason": "end_turn",
        "stop_sequence": None,
    }


def whole(chunks: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """The non-streamed answer: the translator's events accumulated."""
    translator = StreamTranslator("tag", **{"wants_thinking": False, **options})
    accumulator = MessageAccumulator()
    for chunk in chunks:
        accumulator.feed(translator.feed(chunk))
        if translator.cut:
            break
    accumulator.feed(translator.finish())
    return accumulator.message


@pytest.mark.parametrize("wants_thinking", [False, True])
@pytest.mark.parametrize(
    "chunks",
    [
        tool_chunks(),
        [
            PROGRESS,
            delta(reasoning_content="r1 "),
            delta(reasoning_content="r2"),
            delta(content="hi"),
            finish("length"),
            USAGE,
        ],
        [
            PROGRESS,
            delta(content="a"),
            {**finish("stop"), "__verbose": {"stop_type": "word", "stopping_word": "END"}},
            USAGE,
        ],
        [PROGRESS, delta(content="cut short, no usage")],
    ],
)
def test_the_whole_message_is_what_the_sdk_builds_from_the_stream(
    chunks: list[dict[str, Any]], wants_thinking: bool
) -> None:
    message = whole(chunks, wants_thinking=wants_thinking, message_id="msg_x")
    streamed = sdk_message(run(chunks, wants_thinking=wants_thinking, message_id="msg_x"))
    assert message == streamed.model_dump(exclude_none=True) | {"stop_sequence": streamed.stop_sequence}


def test_whole_message_fields() -> None:
    message = whole(tool_chunks())
    assert [b["type"] for b in message["content"]] == ["text", "tool_use", "tool_use"]
    assert message["content"][1] == {"type": "tool_use", "id": "call_a", "name": "weather", "input": {"city": "Oslo"}}
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None and message["model"] == "tag"
    assert message["usage"] == {
        "input_tokens": 20,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 10,
    }
    thinking = [PROGRESS, delta(reasoning_content="r"), delta(content="hi"), finish("stop")]
    shown = whole(thinking, wants_thinking=True)["content"]
    assert [b["type"] for b in shown] == ["thinking", "text"] and shown[0]["thinking"] == "r" and shown[0]["signature"]
    assert whole(thinking)["content"] == [{"type": "text", "text": "hi"}]
    stopped = whole(
        [PROGRESS, delta(content="a"), {**finish("stop"), "__verbose": {"stop_type": "word", "stopping_word": "END"}}]
    )
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "END")


def test_whole_message_single_tool_cut_and_bad_arguments() -> None:
    cut = whole(tool_chunks(), single_tool_use=True)
    assert [b["type"] for b in cut["content"]] == ["text", "tool_use"] and cut["stop_reason"] == "tool_use"
    assert cut["usage"]["output_tokens"] == 5  # cut before the usage chunk: the delta chunks seen
    bad = [
        PROGRESS,
        delta(tool_calls=[{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{not json"}}]),
        finish("tool_calls"),
    ]
    assert whole(bad)["content"][0]["input"] == {"_raw_arguments": "{not json"}

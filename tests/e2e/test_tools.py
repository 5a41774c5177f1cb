"""Tool use through the official Python SDK on the real model.

A 270M model does not call tools on its own; shown one earlier call in the conversation
(which itself exercises tool_use and tool_result round-tripping into the chat template), it
calls the tool again, and with tool_choice "tool" llama-server's grammar holds it to the
tool's schema.
"""

from __future__ import annotations

import anthropic
import pytest

from tests.e2e.conftest import MODEL

T0 = {"temperature": 0}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
EARLIER_CALL_ID = "toolu_earlier_paris"
HISTORY = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": EARLIER_CALL_ID, "name": "get_weather", "input": {"city": "Paris"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": EARLIER_CALL_ID, "content": "Sunny, 21 C"},
        ],
    },
    {"role": "assistant", "content": "It is sunny in Paris."},
    {"role": "user", "content": "What is the weather in Rome?"},
]


def ask(client: anthropic.Anthropic, stream: bool, messages: list, **extra: object) -> anthropic.types.Message:
    kwargs = dict(model=MODEL, max_tokens=80, extra_body=T0, tools=[WEATHER_TOOL], messages=messages, **extra)
    if stream:
        with client.messages.stream(**kwargs) as s:  # type: ignore[arg-type]
            return s.get_final_message()
    return client.messages.create(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_block_with_parsed_input_and_stop_reason(client: anthropic.Anthropic, stream: bool) -> None:
    message = ask(
        client,
        stream,
        HISTORY,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )
    calls = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use"
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert calls[0].input == {"city": "Rome"}
    assert calls[0].id and calls[0].id != EARLIER_CALL_ID


def test_tool_use_id_round_trips_into_the_next_turn(client: anthropic.Anthropic) -> None:
    first = ask(client, False, HISTORY, tool_choice={"type": "any", "disable_parallel_tool_use": True})
    call = next(block for block in first.content if block.type == "tool_use")
    follow = ask(
        client,
        False,
        [
            *HISTORY,
            {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "Rainy, 14 C"},
                    {"type": "text", "text": "Answer in one sentence."},
                ],
            },
        ],
        tool_choice={"type": "none"},
    )
    assert follow.stop_reason in ("end_turn", "max_tokens")
    assert not [block for block in follow.content if block.type == "tool_use"]
    assert follow.usage.output_tokens > 0


def test_streamed_tool_use_matches_the_non_streamed_one(client: anthropic.Anthropic) -> None:
    choice = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    plain = ask(client, False, HISTORY, tool_choice=choice)
    streamed = ask(client, True, HISTORY, tool_choice=choice)
    strip = lambda m: [(b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in m.content]  # noqa: E731
    assert strip(streamed) == strip(plain)

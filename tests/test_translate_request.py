"""Anthropic request → llama-server chat request: each mapping of shared/protocol.md §3."""

from __future__ import annotations

from typing import Any

import orjson

from casedesk.anthropic.schema import parse_messages_request
from casedesk.translate.request import to_chat_request


def chat(stream: bool = False, **fields: Any) -> dict[str, Any]:
    payload = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **fields}
    return to_chat_request(parse_messages_request(payload), stream=stream)


def test_system_string_and_blocks_become_the_first_system_message() -> None:
    assert chat(system="be brief")["messages"][0] == {"role": "system", "content": "be brief"}
    blocks = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert chat(system=blocks)["messages"][0] == {"role": "system", "content": "a\n\nb"}
    assert chat()["messages"][0]["role"] == "user"


def test_a_system_turn_inside_messages_stays_at_its_place() -> None:
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "system", "content": "three"},
        {"role": "user", "content": [{"type": "text", "text": "four"}, {"type": "text", "text": "five"}]},
    ]
    assert chat(messages=messages)["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "system", "content": "three"},
        {"role": "user", "content": "four\nfive"},
    ]


def test_images_become_image_url_parts() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "text", "text": "what?"},
            ],
        }
    ]
    assert chat(messages=messages)["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "what?"},
    ]


def test_plain_text_documents_become_text() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {
                    "type": "document",
                    "title": "Notes",
                    "source": {"type": "text", "media_type": "text/plain", "data": "body"},
                },
                {"type": "text", "text": "summarise"},
            ],
        }
    ]
    assert chat(messages=messages)["messages"][0]["content"] == "Notes\n\nbody\nsummarise"


def test_tool_use_and_tool_result_round_trip_in_order() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "noon"}],
                    "is_error": True,
                },
                {"type": "text", "text": "and tomorrow?"},
            ],
        },
    ]
    out = chat(messages=messages)["messages"]
    assert out[1] == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
        ],
    }
    assert out[2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: noon"},
        {"role": "user", "content": "and tomorrow?"},
    ]


def test_thinking_blocks_in_history_become_reasoning_content() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "redacted_thinking", "data": "xx"},
                {"type": "text", "text": "a"},
            ],
        },
        {"role": "user", "content": "again"},
    ]
    assert chat(messages=messages)["messages"][1] == {"role": "assistant", "content": "a", "reasoning_content": "hmm"}


def test_tools_and_tool_choice_mapping() -> None:
    tools = [
        {"name": "a", "description": "A", "input_schema": {"type": "object"}},
        {"name": "b", "input_schema": {"type": "object", "properties": {}}},
    ]
    out = chat(tools=tools)
    assert out["tools"] == [
        {"type": "function", "function": {"name": "a", "description": "A", "parameters": {"type": "object"}}},
        {
            "type": "function",
            "function": {"name": "b", "description": "", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    assert out["tool_choice"] == "auto" and out["parallel_tool_calls"] is True
    assert chat(tools=tools, tool_choice={"type": "any"})["tool_choice"] == "required"
    assert chat(tools=tools, tool_choice={"type": "none"})["tool_choice"] == "none"
    narrowed = chat(tools=tools, tool_choice={"type": "tool", "name": "b", "disable_parallel_tool_use": True})
    assert narrowed["tool_choice"] == "required" and [t["function"]["name"] for t in narrowed["tools"]] == ["b"]
    assert narrowed["parallel_tool_calls"] is False


def test_sampling_and_stop_sequences_are_forwarded() -> None:
    out = chat(temperature=0.3, top_p=0.8, top_k=20, stop_sequences=["END", "STOP"], max_tokens=77)
    assert (out["temperature"], out["top_p"], out["top_k"], out["max_tokens"]) == (0.3, 0.8, 20, 77)
    assert out["stop"] == ["END", "STOP"] and out["verbose"] is True
    assert "verbose" not in chat()  # asked for only when a stop word must be identified


def test_thinking_mapping() -> None:
    assert chat(thinking={"type": "disabled"})["chat_template_kwargs"] == {"enable_thinking": False}
    enabled = chat(thinking={"type": "enabled", "budget_tokens": 2048})
    assert enabled["chat_template_kwargs"] == {"enable_thinking": True} and enabled["reasoning_budget_tokens"] == 2048
    assert "reasoning_budget_tokens" not in chat(thinking={"type": "adaptive"})
    assert "chat_template_kwargs" not in chat()


def test_stream_asks_for_usage_and_prompt_progress() -> None:
    out = chat(stream=True)
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True} and out["return_progress"] is True
    assert chat(stream=False)["stream"] is False and "return_progress" not in chat(stream=False)


def test_the_body_is_json_serialisable_as_sent() -> None:
    assert orjson.loads(orjson.dumps(chat(stream=True)))["model"] == "m"

"""Anthropic request → llama-server chat request: each mapping of docs/anthropic-api.md §2."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from casedesk.anthropic.errors import ApiError
from casedesk.anthropic.schema import parse_messages_request, request_json
from casedesk.translate.request import to_chat_request


USER = [{"role": "user", "content": "hi"}]


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


def test_effort_becomes_reasoning_effort_and_budget_reasoning_budget_tokens() -> None:
    assert chat(output_config={"effort": "low"})["reasoning_effort"] == "low"
    assert chat(output_config={"effort": "max"})["reasoning_effort"] == "high"
    assert "reasoning_effort" not in chat()
    thinking = chat(thinking={"type": "enabled", "budget_tokens": 100})
    assert thinking["reasoning_budget_tokens"] == 100
    assert thinking["chat_template_kwargs"] == {"enable_thinking": True}


CLAUDE_CODE_TURNS = [
    {"role": "user", "content": "one"},
    {"role": "system", "content": "reminder"},
    {"role": "user", "content": [{"type": "text", "text": "two"}]},
    {"role": "assistant", "content": "three"},
    {"role": "system", "content": [{"type": "text", "text": "late"}]},
]


def test_later_system_turns_are_folded_into_the_next_user_turn_only_when_asked() -> None:
    request = parse_messages_request(
        {"model": "m", "max_tokens": 5, "system": "be brief", "messages": CLAUDE_CODE_TURNS}
    )
    assert [m["role"] for m in to_chat_request(request, stream=False)["messages"]] == [
        "system",
        "user",
        "system",
        "user",
        "assistant",
        "system",
    ]
    folded = to_chat_request(request, stream=False, fold_system=True)["messages"]
    assert folded == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "user", "content": "<system>\nreminder\n</system>\n\ntwo"},
        {"role": "assistant", "content": "three"},
        {"role": "user", "content": "<system>\nlate\n</system>"},
    ]


def test_a_leading_system_turn_stays_and_a_trailing_one_joins_the_last_user_turn() -> None:
    request = parse_messages_request(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [
                {"role": "system", "content": "first"},
                {"role": "user", "content": "q"},
                {"role": "system", "content": "after"},
            ],
        }
    )
    assert to_chat_request(request, stream=False, fold_system=True)["messages"] == [
        {"role": "system", "content": "first"},
        {"role": "user", "content": "q\n\n<system>\nafter\n</system>"},
    ]


def test_search_results_become_text_and_content_documents_join_their_blocks() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {
                    "type": "search_result",
                    "source": "https://example.invalid/a",
                    "title": "A",
                    "content": [{"type": "text", "text": "p1"}, {"type": "text", "text": "p2"}],
                },
                {
                    "type": "document",
                    "source": {"type": "content", "content": [{"type": "text", "text": "d1"}]},
                },
            ],
        }
    ]
    assert chat(messages=messages)["messages"][0]["content"] == "A\nhttps://example.invalid/a\n\np1\np2\nd1"


def test_promises_a_local_model_cannot_keep_are_refused_by_name() -> None:
    def refused(**fields: Any) -> str:
        with pytest.raises(ApiError) as caught:
            chat(**fields)
        assert caught.value.status == 400
        return caught.value.message

    def user(block: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [block]}]

    text_document = {"type": "text", "media_type": "text/plain", "data": "x"}
    assert "messages.0.content.0.citations" in refused(
        messages=user({"type": "document", "source": text_document, "citations": {"enabled": True}})
    )
    assert "messages.0.content.0.source.type: 'base64' documents (PDF)" in refused(
        messages=user({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "x"}})
    )
    assert "messages.0.content.0.source.content.0" in refused(
        messages=user({"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": 5}]}})
    )
    assert "messages.0.content.0.source: image URLs are not fetched" in refused(
        messages=user({"type": "image", "source": {"type": "url", "url": "http://169.254.169.254/"}})
    )
    assert "tools.0.type: server tool 'web_search_20250305'" in refused(
        tools=[{"type": "web_search_20250305", "name": "web_search"}]
    )
    assert "server tools" in refused(
        messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "server_tool_use"}]}]
    )
    assert "mcp_servers" in refused(mcp_servers=[{"type": "url", "url": "x", "name": "n"}])
    assert "container" in refused(container="c1")


def test_message_and_block_counts_beyond_any_window_are_refused_before_parsing() -> None:
    headers = {"anthropic-version": "2023-06-01"}
    many = b'{"model":"m","max_tokens":5,"messages":[' + b",".join([b'{"role":"user","content":"x"}'] * 100_001) + b"]}"
    with pytest.raises(ApiError, match="messages: more than 100000 messages"):
        request_json(headers, many)
    blocks = b'{"type":"text","text":""}'
    wide = (
        b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[' + b",".join([blocks] * 300_001) + b"]}]}"
    )
    with pytest.raises(ApiError, match="content blocks"):
        request_json(headers, wide)
    exact = [{"role": "user", "content": [{"type": "text", "text": ""}] * 1000}] * 201
    with pytest.raises(ApiError, match="messages: more than 200000 content blocks"):
        parse_messages_request({"model": "m", "max_tokens": 5, "messages": exact})


STRICT_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "strict": True,
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def test_a_forced_call_of_strict_tools_is_asked_as_a_grammar_held_json_answer() -> None:
    from casedesk.anthropic.json_schema import check_grammar_schema
    from casedesk.translate.request import repairable_tools

    payload = chat(system="s", tools=[STRICT_TOOL], tool_choice={"type": "tool", "name": "get_weather"})
    assert "tools" not in payload and "tool_choice" not in payload
    schema = payload["response_format"]["json_schema"]["schema"]
    assert payload["logit_bias"] == [["\n", False], ["\n\n", False]]  # no whitespace wandering
    assert schema == {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": STRICT_TOOL["input_schema"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    check_grammar_schema(schema, "s")
    system = payload["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("s\n\nCall one of these tools")
    assert '"name":"get_weather"' in system["content"]
    request = parse_messages_request(
        {"model": "m", "max_tokens": 5, "messages": USER, "tools": [STRICT_TOOL], "tool_choice": {"type": "any"}}
    )
    assert repairable_tools(request) == frozenset({"get_weather"})
    # auto, or a tool that is not strict: llama-server's own tool grammar, as before.
    loose = {**STRICT_TOOL, "strict": False}
    assert chat(tools=[STRICT_TOOL])["tool_choice"] == "auto"
    assert chat(tools=[loose], tool_choice={"type": "any"})["tool_choice"] == "required"
    auto = parse_messages_request(
        {"model": "m", "max_tokens": 5, "messages": USER, "tools": [STRICT_TOOL, {**loose, "name": "x"}]}
    )
    assert repairable_tools(auto) == frozenset({"x"})

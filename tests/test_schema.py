"""Request validation: what is refused (400, naming the field) and what is accepted."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casedesk.anthropic.errors import ApiError
from casedesk.anthropic.schema import parse_messages_request

USER = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 10, "messages": USER, **fields}


def refused(payload: Any) -> str:
    with pytest.raises(ApiError) as caught:
        parse_messages_request(payload)
    assert caught.value.status == 400 and caught.value.error_type == "invalid_request_error"
    return caught.value.message


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"max_tokens": 10, "messages": USER}, "model"),
        ({"model": "m", "messages": USER}, "max_tokens"),
        ({"model": "m", "max_tokens": 10}, "messages"),
        (body(model=5), "model"),
        (body(model=""), "model"),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens=-1), "max_tokens"),
        (body(max_tokens=1.5), "max_tokens"),
        (body(max_tokens=True), "max_tokens"),
        (body(max_tokens="10"), "max_tokens"),
        (body(messages=[]), "messages"),
        (body(messages={"role": "user"}), "messages"),
        (body(messages=["hi"]), "messages.0"),
        (body(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
        (body(messages=[{"role": "user"}]), "messages.0.content"),
        (body(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
        (body(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content.0.text"),
        (body(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages.0.content.0.type"),
        (body(messages=[{"role": "user", "content": [{"type": "video"}]}]), "messages.0.content.0.type"),
        (
            body(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "x"}}
                        ],
                    }
                ]
            ),
            "media_type",
        ),
        (body(temperature=-0.1), "temperature"),
        (body(temperature=1.1), "temperature"),
        (body(temperature="0.5"), "temperature"),
        (body(top_k=-1), "top_k"),
        (body(stop_sequences="END"), "stop_sequences"),
        (body(stop_sequences=[1]), "stop_sequences"),
        (body(stream="yes"), "stream"),
        (body(system=5), "system"),
        (body(system=[{"type": "image"}]), "system.0"),
        (body(tools=[{"name": "t"}]), "tools.0.input_schema"),
        (
            body(tools=[{"name": "t", "input_schema": {}}], tool_choice={"type": "tool", "name": "u"}),
            "tool_choice.name",
        ),
        (body(tool_choice={"type": "sometimes"}), "tool_choice.type"),
        (body(thinking={"type": "enabled"}), "thinking.budget_tokens"),
        (body(thinking={"type": "maybe"}), "thinking.type"),
        (body(metadata="x"), "metadata"),
        ([1, 2], "JSON object"),
        ("text", "JSON object"),
        (None, "JSON object"),
    ],
)
def test_malformed_requests_are_refused_naming_the_field(payload: Any, field: str) -> None:
    assert field in refused(payload)


def test_accepted_shapes_and_newer_fields() -> None:
    request = parse_messages_request(
        body(
            system=[{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}],
            messages=[
                {"role": "system", "content": "inline system turn"},
                {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "t", "signature": "s"},
                        {"type": "tool_use", "id": "i", "name": "n", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "i",
                            "content": [{"type": "text", "text": "r"}],
                            "is_error": True,
                        }
                    ],
                },
            ],
            metadata={"user_id": "u"},
            thinking={"type": "adaptive"},
            service_tier="auto",
            context_management={"edits": []},
            output_config={"effort": "low"},
            container=None,
            mcp_servers=[],
            temperature=0,
            top_p=1,
            top_k=0,
            stop_sequences=["END"],
            stream=True,
        )
    )
    assert request.system == [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]
    assert request.wants_thinking and request.thinking_budget is None
    assert request.stream and request.stop_sequences == ("END",)


def test_structured_outputs_with_callable_tools_are_refused_naming_the_field() -> None:
    tools = [{"name": "t", "input_schema": {"type": "object"}}]
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    fmt = {"format": {"type": "json_schema", "schema": schema}}
    for choice in (None, {"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "t"}):
        extra = {"tool_choice": choice} if choice else {}
        message = refused(body(tools=tools, output_config=fmt, **extra))
        assert message.startswith("output_config.format: structured outputs and tools"), message
    beta = refused(body(tools=tools, output_format={"type": "json_schema", "schema": schema}))
    assert beta.startswith("output_format: ")
    # Tools that may not be called leave the schema's promise intact: accepted.
    parsed = parse_messages_request(body(tools=tools, tool_choice={"type": "none"}, output_config=fmt))
    assert parsed.output_schema == schema


def test_count_tokens_shape_needs_no_max_tokens() -> None:
    request = parse_messages_request({"model": "m", "messages": USER, "stream": True}, count_only=True)
    assert request.stream is False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
FIELDS = [
    "model",
    "max_tokens",
    "messages",
    "system",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "stream",
    "tools",
    "tool_choice",
    "thinking",
    "metadata",
]


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8))
def test_fuzzed_bodies_either_parse_or_are_a_400(payload: dict[str, Any]) -> None:
    try:
        parse_messages_request(payload)
    except ApiError as error:
        assert error.status == 400


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["role", "content", "type", "text"]), json_values, max_size=4),
        min_size=1,
        max_size=3,
    )
)
def test_fuzzed_messages_either_parse_or_are_a_400(messages: list[dict[str, Any]]) -> None:
    try:
        parse_messages_request(body(messages=messages))
    except ApiError as error:
        assert error.status == 400

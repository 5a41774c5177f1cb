"""Tool calls written as JSON text become tool_use blocks; nothing else does. And the stop
reason says whose limit ended an answer: the client's (max_tokens) or the window's."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from casedesk.translate.repair import looks_like_json_start, tool_call_in_text
from casedesk.translate.response import MessageAccumulator
from casedesk.translate.stream import StreamTranslator
from tests.test_translate_stream import USAGE, delta, finish, sdk_message

OFFERED = frozenset({"get_weather"})

# The shapes small models write a call in when their template has no tool syntax (the
# generic format llama-server itself uses, OpenAI's, Hermes' JSON without its tags).
RECORDED_CALLS = [
    '{"name": "get_weather", "arguments": {"city": "Rome"}}',
    '```json\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n```',
    '\n{"tool_call": {"name": "get_weather", "arguments": {"city": "Rome"}}}\n',
    '{"name": "get_weather", "parameters": {"city": "Rome"}}',
    '{"function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}}',
]
# Recorded: Gemma 3 270M on the real llama-server (ChatML template, which drops `tools`),
# asked to answer get_weather calls as JSON, temperature 1, max_tokens 40: none was a call.
RECORDED_GEMMA = [
    'You can call the tool "get_weather". To call it, answer with only JSON like {"name": "get_weather", '
    '"arguments": {"city": "..."}}.\n<|im',
    'The name is the same as the name of the person.\nThe person has no name. The weather is "rainy" in that '
    "city.\n<|im_start|>user\nThe",
    'You can call the assistant with a different city name and a different name for the "arguments" '
    '{ "city": "..." }\n\n<|im_end|>user\nYou can call the user',
    # Recorded: the same model with examples/gemma3-tools.jinja, shown one or two earlier
    # turns that answered with a JSON call (24 tries, temperature 0 and 1, max_tokens 40):
    # it writes the call and then never ends its turn. A call followed by more text is not
    # the whole text: it stays text (the rest is not ours to drop).
    '{"name": "get_weather", "arguments": {"city": "Rome"}}\u3001$\n$$\n$$\n$$\n$$\n$$\n$$\n$$\n$$\n$$\n$$\n$$',
    '{"name": "get_weather", "arguments": {"city": "Rome"}}</thead>\n</caption>\n<table>\n<thead>\n<thead>\n<thead>',
    '{"name": "get_weather", "arguments": {"city": "Rome"}} ))}model\nWeatherData in Beijing?WeatherDatamodel\n"})',
    '{"name": "get_weather", "parameters": {"city": "Rome"}}orestation\nWEATHER IN PARIS?\u306b\u901a\u3044\n'
    'paymentservice\n{"name": "get_weather", "parameters":',
]
NOT_CALLS = [
    *RECORDED_GEMMA,
    "The weather in Rome is sunny.",
    '{"name": "get_time", "arguments": {}}',  # a tool that was not offered
    '{"name": "get_weather", "arguments": {"city": "Rome"}} and more',  # not the whole text
    '{"name": "get_weather", "arguments": ["Rome"]}',  # arguments not an object
    '{"name": "get_weather", "arguments": {"city": "Rome"}, "why": "x"}',  # other keys
    '{"name": "get_weather", "arguments": {"city": "Ro',  # cut short
    "Here it is: ```json\n{}\n```",
    '```python\n{"name": "get_weather", "arguments": {}}\n```',
    "",
]


@pytest.mark.parametrize("text", RECORDED_CALLS)
def test_a_whole_text_tool_call_is_read(text: str) -> None:
    assert tool_call_in_text(text, OFFERED) == ("get_weather", '{"city":"Rome"}')


@pytest.mark.parametrize("text", NOT_CALLS)
def test_anything_else_stays_text(text: str) -> None:
    assert tool_call_in_text(text, OFFERED) is None


def test_text_is_held_only_while_it_may_be_a_call() -> None:
    for prefix in ("", "  ", "{", '{"na', "`", "``", "```", "```js", "```json", "```json\n", "```json\n  {"):
        assert looks_like_json_start(prefix), prefix
    for prefix in ("The", "  x", "```python", "```json\nHello", "`x"):
        assert not looks_like_json_start(prefix), prefix


def translate(pieces: list[str], reason: str = "stop", **options: Any) -> tuple[list[dict[str, Any]], StreamTranslator]:
    translator = StreamTranslator("tag", wants_thinking=False, **options)
    chunks = [delta(role="assistant", content=None)] + [delta(content=p) for p in pieces] + [finish(reason), USAGE]
    raw = b"".join(translator.feed(c) for c in chunks) + translator.finish()
    events = [orjson.loads(b[b.index(b"\ndata: ") + 7 :]) for b in raw.strip().split(b"\n\n")]
    return events, translator


def pieces_of(text: str) -> list[str]:
    return [text[i : i + 3] for i in range(0, len(text), 3)]


@pytest.mark.parametrize("text", RECORDED_CALLS)
def test_a_streamed_json_call_becomes_one_tool_use_block(text: str) -> None:
    events, translator = translate(pieces_of(text), repair_tools=OFFERED)
    message = sdk_message([("", e) for e in events])
    assert [(b.type, b.name, b.input) for b in message.content] == [("tool_use", "get_weather", {"city": "Rome"})]
    assert message.stop_reason == "tool_use" and translator.repaired
    accumulator = MessageAccumulator()
    accumulator.feed(b"".join(b"event: x\ndata: " + orjson.dumps(e) + b"\n\n" for e in events))
    assert accumulator.message["content"][0]["input"] == {"city": "Rome"}


@pytest.mark.parametrize("text", NOT_CALLS[:-1])
def test_other_answers_stream_as_the_same_text(text: str) -> None:
    events, translator = translate(pieces_of(text), repair_tools=OFFERED)
    message = sdk_message([("", e) for e in events])
    assert [(b.type, b.text) for b in message.content] == [("text", text)]
    assert message.stop_reason == "end_turn" and not translator.repaired


def test_prose_is_not_held_back() -> None:
    translator = StreamTranslator("tag", wants_thinking=False, repair_tools=OFFERED)
    translator.feed(delta(role="assistant", content=None))
    assert b"text_delta" in translator.feed(delta(content="The weather"))


def test_without_tools_a_json_text_is_text() -> None:
    text = RECORDED_CALLS[0]
    events, translator = translate(pieces_of(text))
    assert sdk_message([("", e) for e in events]).content[0].text == text and not translator.repaired


def test_a_length_finish_before_max_tokens_is_the_context_window() -> None:
    events, _ = translate(["a"], reason="length", max_tokens=32000)
    assert events[-2]["delta"]["stop_reason"] == "model_context_window_exceeded"
    events, _ = translate(["a"], reason="length", max_tokens=5)  # USAGE: 5 completion tokens
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    events, _ = translate(["a"], reason="stop", max_tokens=32000)
    assert events[-2]["delta"]["stop_reason"] == "end_turn"

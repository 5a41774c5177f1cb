"""The official Python SDK against CaseDesk in front of the real llama-server and model."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import anthropic
import pytest

from tests.e2e.conftest import MODEL, SLOT_CONTEXT, Rig

# SDK 2.x no longer types sampling parameters; they still go in the body.
T0 = {"temperature": 0}
PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]
ECHO_SYSTEM = "You repeat the user's text exactly, nothing else."
ECHO_PROMPT = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog near the river bank."}]


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_create_returns_a_real_completion(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=24, extra_body=T0, messages=PROMPT)
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert message.model == MODEL
    assert text_of(message).strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 5
    assert 0 < message.usage.output_tokens <= 24


def test_max_tokens_is_reported_as_the_stop_reason(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=3,
        extra_body=T0,
        messages=[{"role": "user", "content": "Write a long essay about the sea."}],
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


def test_streamed_text_equals_non_streamed_text_at_temperature_zero(client: anthropic.Anthropic) -> None:
    # Both answers must be computed alike: llama-server reuses a cached prompt, and logits from a
    # cached prefix can differ in the last bits from a fresh prefill (on some CPUs enough to flip a
    # near tie at temperature 0). So the prompt is cached first, and both answers reuse it.
    client.messages.create(model=MODEL, max_tokens=1, extra_body=T0, system=ECHO_SYSTEM, messages=ECHO_PROMPT)
    plain = client.messages.create(model=MODEL, max_tokens=40, extra_body=T0, system=ECHO_SYSTEM, messages=ECHO_PROMPT)
    with client.messages.stream(
        model=MODEL, max_tokens=40, extra_body=T0, system=ECHO_SYSTEM, messages=ECHO_PROMPT
    ) as stream:
        pieces = [text for text in stream.text_stream]
        final = stream.get_final_message()
    assert len(pieces) > 3  # token by token, not one lump
    assert "".join(pieces) == text_of(final) == text_of(plain)
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.model == MODEL and final.id.startswith("msg_")


def test_stream_events_arrive_in_the_anthropic_order(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=10, extra_body=T0, messages=PROMPT) as stream:
        kinds = [event.type for event in stream]
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert kinds[-2:] == ["message_delta", "message_stop"] and kinds.count("message_delta") == 1


def test_message_start_already_carries_the_input_tokens(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=5, extra_body=T0, messages=PROMPT) as stream:
        first = next(iter(stream))
        final = stream.get_final_message()
    assert first.type == "message_start"
    start_usage = first.message.usage
    assert start_usage.input_tokens + (start_usage.cache_read_input_tokens or 0) == (
        final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    )


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_reports_the_matched_string_and_the_text_before_it(
    client: anthropic.Anthropic, stream: bool
) -> None:
    free = text_of(
        client.messages.create(model=MODEL, max_tokens=40, extra_body=T0, system=ECHO_SYSTEM, messages=ECHO_PROMPT)
    )
    words = free.split()
    assert len(words) >= 4, free
    stop = " " + words[3]  # a stop sequence the model is known to produce at temperature 0
    expected = free[: free.index(stop)]
    kwargs = dict(
        model=MODEL,
        max_tokens=40,
        extra_body=T0,
        system=ECHO_SYSTEM,
        messages=ECHO_PROMPT,
        stop_sequences=["never-produced-xyz", stop],
    )
    if stream:
        with client.messages.stream(**kwargs) as s:  # type: ignore[arg-type]
            message = s.get_final_message()
    else:
        message = client.messages.create(**kwargs)  # type: ignore[arg-type]
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == stop
    assert text_of(message) == expected


def test_count_tokens_equals_the_usage_of_the_same_request(client: anthropic.Anthropic) -> None:
    system = "You are terse."
    messages = [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]},
    ]
    counted = client.messages.count_tokens(model=MODEL, system=system, messages=messages)
    used = client.messages.create(model=MODEL, max_tokens=4, extra_body=T0, system=system, messages=messages)
    assert counted.input_tokens == used.usage.input_tokens + (used.usage.cache_read_input_tokens or 0)


def test_models_list_shows_the_deployment_tags(client: anthropic.Anthropic) -> None:
    models = list(client.models.list())
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_unknown_model_is_a_404_listing_the_tags(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="llama3.1:8b", max_tokens=5, messages=PROMPT)
    assert MODEL in str(caught.value)


def test_bad_temperature_is_a_400_naming_the_field(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=5, extra_body={"temperature": 1.5}, messages=PROMPT)
    assert "temperature" in str(caught.value)


def test_a_prompt_longer_than_the_context_is_a_clear_400(client: anthropic.Anthropic) -> None:
    huge = "word " * (SLOT_CONTEXT + 2000)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": huge}])
    # The exact text Claude Code matches to compact its conversation (docs/anthropic-api.md §3).
    found = re.search(r"prompt is too long: (\d+) tokens > (\d+) maximum", str(caught.value))
    assert found, str(caught.value)
    assert int(found[1]) > SLOT_CONTEXT and int(found[2]) == SLOT_CONTEXT


def test_curl_style_request_without_version_header_is_refused(rig: Rig) -> None:
    request = urllib.request.Request(
        f"{rig.base_url}/v1/messages",
        data=json.dumps({"model": MODEL, "max_tokens": 5, "messages": PROMPT}).encode(),
        headers={"content-type": "application/json", "x-api-key": "k"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    body = json.loads(caught.value.read())
    assert caught.value.code == 400
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "anthropic-version" in body["error"]["message"]
    assert caught.value.headers.get("access-control-allow-origin") is None


# A 1x1 PNG.
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgAAIAAAUAAWJ9bC4AAAAASUVORK5CYII="


def test_an_image_for_a_model_without_vision_is_a_clear_400(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=MODEL,
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
                        {"type": "text", "text": "What is this?"},
                    ],
                }
            ],
        )
    assert "cannot take images" in str(caught.value)


def test_newer_fields_and_headers_are_accepted(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=5,
        messages=PROMPT,
        metadata={"user_id": "u-1"},
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        thinking={"type": "adaptive"},
        extra_body={"context_management": {"edits": []}, "output_config": {}, "service_tier": "auto"},
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14,context-management-2025-06-27"},
    )
    assert message.stop_reason in ("end_turn", "max_tokens")

"""The relay's per-token fast path gives the client exactly the bytes the full parse gives.

`upstream/relay.py` hands a plain text-delta chunk to `StreamTranslator.feed_text` (its text
cut out by translate/fast_delta.py) instead of `orjson.loads` + `feed`, or a read's run of them
to `feed_texts` at once. These paths are driven
here over the same payloads (the real llama-server's recorded chunks, the fake's stream, and
generated texts) in every translator mode that treats text specially (tool-call repair holds
text back, max_tokens reads the delta count, thinking, one tool call only), and their bytes are
compared exactly, chunk by chunk and at the end; then through a running gateway.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from casedesk.translate.fast_delta import text_delta
from casedesk.translate.stream import StreamTranslator
from tests.conftest import GatewayFactory, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wire import ASK, MESSAGES, http_post
from tests.test_fast_delta import REAL, dechunk, llama_chunk, nlohmann_string

CALL = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "thinking": {"wants_thinking": True},
    "repair": {"repair_tools": frozenset({"get_weather"})},
    "max_tokens": {"max_tokens": 5},
    "single_tool_use": {"single_tool_use": True},
}
ROLE = (
    b'{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"created":1,'
    b'"id":"x","model":"m","system_fingerprint":"f","object":"chat.completion.chunk"}'
)
FINISH = (
    b'{"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1,"id":"x","model":"m",'
    b'"system_fingerprint":"f","object":"chat.completion.chunk"}'
)


def same_ids(events: bytes) -> bytes:
    """A repaired tool call's id is random (translate/response.py new_tool_use_id)."""
    return re.sub(rb'"toolu_[0-9a-f]{24}"', b'"toolu_X"', events)


def translator(**options: Any) -> StreamTranslator:
    return StreamTranslator("m", **{"wants_thinking": False, "message_id": "msg_fixed", **options})


def full_path(payloads: list[bytes], **options: Any) -> tuple[list[bytes], bytes, StreamTranslator]:
    """What the relay did before the fast path: every chunk parsed in full."""
    t = translator(**options)
    out = [t.feed(orjson.loads(p)) for p in payloads if p != b"[DONE]"]
    return out, t.finish(), t


def fast_path(payloads: list[bytes], **options: Any) -> tuple[list[bytes], bytes, StreamTranslator]:
    """What the relay does now (`_Attempt.on_data`): plain text deltas by `feed_text`."""
    t = translator(**options)
    out = []
    for p in payloads:
        if p == b"[DONE]":
            continue
        text = text_delta(p)
        out.append(t.feed_text(text) if text is not None else t.feed(orjson.loads(p)))
    return out, t.finish(), t


def batched_path(payloads: list[bytes], run: int, **options: Any) -> tuple[bytes, bytes, StreamTranslator]:
    """What the relay does with a read of many text chunks (`_Attempt.take_raw`): up to `run`
    plain text deltas at a time by `feed_texts`, anything else in full."""
    t = translator(**options)
    out, texts = [], []
    for p in payloads:
        if p == b"[DONE]":
            continue
        text = text_delta(p)
        if text is not None:
            texts.append(text)
            if len(texts) < run:
                continue
        if texts:
            out.append(t.feed_texts(texts))
            texts = []
        if text is None:
            out.append(t.feed(orjson.loads(p)))
    if texts:
        out.append(t.feed_texts(texts))
    return b"".join(out), t.finish(), t


def assert_same_bytes(payloads: list[bytes], **options: Any) -> int:
    """Both paths agree on every chunk's bytes, the end and what the caller reads after; the
    number of chunks the fast path took."""
    full_out, full_end, full = full_path(payloads, **options)
    fast_out, fast_end, fast = fast_path(payloads, **options)
    assert fast_out == full_out
    assert same_ids(fast_end) == same_ids(full_end)
    assert (fast.generated, fast.final_usage, fast.repaired, fast.has_tool_use, fast.cut) == (
        full.generated,
        full.final_usage,
        full.repaired,
        full.has_tool_use,
        full.cut,
    )
    for run in (2, 3, len(payloads)):
        batched_out, batched_end, batched = batched_path(payloads, run, **options)
        assert batched_out == b"".join(full_out)
        assert same_ids(batched_end) == same_ids(full_end)
        assert (batched.generated, batched.final_usage, batched.repaired, batched.cut) == (
            full.generated,
            full.final_usage,
            full.repaired,
            full.cut,
        )
    return sum(text_delta(p) is not None for p in payloads)


@pytest.mark.parametrize("mode", MODES)
def test_recorded_llama_server_chunks_give_the_same_bytes(mode: str) -> None:
    assert assert_same_bytes(REAL, **MODES[mode]) > 40


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "pieces",
    [
        [CALL[i : i + 4] for i in range(0, len(CALL), 4)],  # held, then a repaired tool_use
        ["{", '"name"', ": 1", "}", " and more"],  # held, then released as text
        ["  ", "", "\n", "```", "json\n", "{}", "\n```"],
        ["Hello", "", " world"],  # an empty delta still counts as a token
    ],
)
def test_text_that_may_be_a_tool_call_gives_the_same_bytes(mode: str, pieces: list[str]) -> None:
    payloads = [ROLE] + [llama_chunk(orjson.dumps(p)) for p in pieces] + [FINISH, b"[DONE]"]
    assert assert_same_bytes(payloads, **MODES[mode]) == len(pieces)


@given(st.lists(st.sampled_from(["{", "}", '"name"', " ", "```", "\n", "a", '"', "\\", "é"]) | st.text(), max_size=12))
@example(['{"name": "get_weather", ', '"arguments": {}}'])
@example([",", "", ",", '","', '"', "a\\"])  # empty deltas among others; texts like the join's seams
def test_any_texts_give_the_same_bytes_in_every_mode(pieces: list[str]) -> None:
    payloads = [ROLE] + [llama_chunk(nlohmann_string(p)) for p in pieces] + [FINISH]
    for options in MODES.values():
        assert assert_same_bytes(payloads, **options) == len(pieces)


async def test_the_fakes_stream_gives_the_same_bytes_in_every_mode(fake: FakeLlamaServer) -> None:
    tokens = [" plain", ' "quoted"', " back\\slash", "\ttab\n", " é", " 🦀", ""]
    fake.replies.append(Reply(tokens=tokens, progress_steps=2))
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    payloads = await stream_payloads(fake, {**body, "stream_options": {"include_usage": True}, "return_progress": True})
    for options in MODES.values():
        assert assert_same_bytes(payloads, **options) == len(tokens)


@pytest.mark.parametrize(
    ("tokens", "request_extra"),
    [
        ([" plain", ' "quoted"', " back\\slash", "\ttab\n", " é", " 🦀", ""], {}),
        (
            [CALL[i : i + 5] for i in range(0, len(CALL), 5)],
            {"tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]},
        ),
        (["{", " not", " a call"], {"tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}),
    ],
)
async def test_the_gateway_streams_what_the_full_parse_makes(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, tokens: list[str], request_extra: dict[str, Any]
) -> None:
    """Through a running gateway: the client's bytes are those the full parse makes of the very
    chunks the fake sends for the request CaseDesk made."""
    gateway = await start_gateway(gateway_config([fake.url]))
    fake.replies.extend([Reply(tokens=tokens), Reply(tokens=tokens)])
    status, _headers, got = await http_post(
        gateway.port, MESSAGES, {"model": "m", "max_tokens": 100, "messages": ASK, "stream": True, **request_extra}
    )
    assert status == 200, got
    got = got.replace(b": keep-alive\n\n", b"")  # only if the machine stalls before the first token
    start = orjson.loads(got.split(b"\n\n", 1)[0].split(b"data: ", 1)[1])
    payloads = await stream_payloads(fake, fake.chat_requests()[-1].body)  # the request CaseDesk sent
    t = StreamTranslator(
        "m",
        wants_thinking=False,
        message_id=start["message"]["id"],
        max_tokens=100,
        repair_tools=frozenset({"get_weather"}) if request_extra else frozenset(),
    )
    want = b"".join(t.feed(orjson.loads(p)) for p in payloads if p != b"[DONE]") + t.finish()
    assert same_ids(got) == same_ids(want)
    assert t.repaired == (tokens[0] == CALL[:5])


async def stream_payloads(fake: FakeLlamaServer, body: dict[str, Any]) -> list[bytes]:
    """The `data:` payloads of the fake's streamed answer to `body`, off a raw socket."""
    raw_body = orjson.dumps(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(raw_body), raw_body)
    )
    raw = await asyncio.wait_for(reader.read(-1), 10)  # the fake, like llama-server, closes after a stream
    writer.close()
    _head, _, chunked = raw.partition(b"\r\n\r\n")
    events = dechunk(chunked).split(b"\n\n")
    return [e[6:] for e in events if e.startswith(b"data: ")]

"""The per-token fast path (casedesk/translate/fast_delta.py) against the full parse it stands in for.

The fast path may decline anything (None: the caller parses in full); what it must never do
is return a text the full parse would not give, or miss the plain text chunks llama-server
actually sends. Checked over chunks recorded from the real llama-server and from
tests/fake_llama.py, over every text either encodes, and over arbitrary edits of them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from hypothesis import example, given
from hypothesis import strategies as st

from casedesk.translate.fast_delta import text_delta
from tests.fake_llama import FakeLlamaServer, Reply

ENVELOPE_KEYS = {"choices", "created", "id", "model", "system_fingerprint", "object"}


def full_parse_text(payload: bytes) -> str | None:
    """What the full parse makes of a payload: its text if it is a plain text delta and nothing
    else the translator would act on (no progress, finish, usage, verbose, error, other delta)."""
    try:
        chunk: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(chunk, dict) or set(chunk) != ENVELOPE_KEYS:
        return None
    choices = chunk["choices"]
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if set(choice) != {"finish_reason", "index", "delta"} or choice["finish_reason"] is not None:
        return None
    if type(choice["index"]) is not int or choice["index"] != 0:
        return None
    delta = choice["delta"]
    if not isinstance(delta, dict) or set(delta) != {"content"} or not isinstance(delta["content"], str):
        return None
    return delta["content"]


def recorded_chunks() -> list[bytes]:
    """The real llama-server's payloads (quotes, backslashes, a tab, a newline, accents; role,
    progress, finish, usage and [DONE]): see the file's header."""
    lines = (Path(__file__).parent / "llama_server_chunks.txt").read_bytes().splitlines()
    return [line for line in lines if line and not line.startswith(b"#")]


REAL = recorded_chunks()
REAL_TEXT_CHUNKS = [p for p in REAL if full_parse_text(p) is not None]
REAL_OTHER_CHUNKS = [p for p in REAL if full_parse_text(p) is None]


def nlohmann_string(text: str) -> bytes:
    """A string as llama-server writes it (nlohmann::json dump, ensure_ascii off): `"` `\\` and
    control characters escaped (\\b \\f \\n \\r \\t, else \\u00xx), everything else raw UTF-8."""
    short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    out = []
    for ch in text:
        if ch in short:
            out.append(short[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return ('"' + "".join(out) + '"').encode()


def llama_chunk(literal: bytes, envelope: bytes = b"") -> bytes:
    envelope = envelope or (
        b',"created":1795555235,"id":"chatcmpl-dSJzq0","model":"/tmp/rs/gemma.gguf",'
        b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}'
    )
    return b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":' + literal + b"}}]" + envelope


def test_real_text_chunks_take_the_fast_path() -> None:
    assert len(REAL_TEXT_CHUNKS) > 40 and {"\n", "\t", ' "', ":\\", " café"} <= set(map(full_parse_text, REAL))
    for payload in REAL_TEXT_CHUNKS:
        text = full_parse_text(payload)
        assert text is not None
        assert text_delta(payload) == text


def test_real_other_chunks_are_left_to_the_full_parse() -> None:
    assert len(REAL_OTHER_CHUNKS) >= 5  # role, progress, finish, usage, [DONE]
    for payload in REAL_OTHER_CHUNKS:
        assert full_parse_text(payload) is None
        assert text_delta(payload) is None


async def test_fake_text_chunks_take_the_fast_path_and_the_rest_do_not() -> None:
    tokens = [" plain", ' "quoted"', " back\\slash", "\ttab\n", " é", " 🦀", ""]
    async with FakeLlamaServer(Reply(tokens=tokens)) as fake:
        payloads = await fake_stream_payloads(fake)
    texts = [p for p in payloads if full_parse_text(p) is not None]
    assert [text_delta(p) for p in texts] == tokens
    for payload in payloads:
        text = full_parse_text(payload)
        assert text_delta(payload) == text


@given(st.text())
@example("")
@example('"}}],"created":1,"x":"')
@example("\\")
@example("\u2028\x7f\x1f")
def test_every_text_llama_server_can_send_is_cut_out_exactly(text: str) -> None:
    for literal in (nlohmann_string(text), orjson.dumps(text)):  # the real server's, the fake's
        payload = llama_chunk(literal)
        assert full_parse_text(payload) == text
        assert text_delta(payload) == text


CORPUS = st.sampled_from(
    REAL
    + [
        llama_chunk(b'" a"'),
        llama_chunk(b'"a\\"b"'),
        llama_chunk(b'"\\u00e9\\n"'),
        llama_chunk(b'"caf\xc3\xa9"'),
        b'{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"created":1,'
        b'"id":"x","model":"m","system_fingerprint":"f","object":"chat.completion.chunk"}',
        b'{"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1,"id":"x","model":"m",'
        b'"system_fingerprint":"f","object":"chat.completion.chunk"}',
    ]
)


@st.composite
def edited(draw: st.DrawFn) -> bytes:
    """A recorded chunk with a few bytes replaced, inserted or deleted anywhere."""
    payload = bytearray(draw(CORPUS))
    # Half the edits land in or next to the text, where the fast path does its own checking.
    text_start = payload.find(b'"content":') + 10
    text_end = payload.find(b'}}],"created"')
    near = st.integers(max(0, text_start - 2), text_end + 3) if 10 <= text_start < text_end else st.nothing()
    for _ in range(draw(st.integers(1, 4))):
        at = min(draw(near | st.integers(0, len(payload))), len(payload))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.sampled_from(b'"\\{}[],:0 \x00\x1f\x80\xc3\xffanul') | st.integers(0, 255))
        if op == "insert":
            payload.insert(at, byte)
        elif at < len(payload):
            if op == "replace":
                payload[at] = byte
            else:
                del payload[at]
    return bytes(payload)


@given(edited())
@example(llama_chunk(b'"a"b"'))
@example(llama_chunk(b'"a\\"'))
@example(llama_chunk(b'"a\x01"'))
@example(llama_chunk(b'"\xc3"'))
@example(
    llama_chunk(
        b'" a"',
        b',"created":1,"id":"x","model":"m","system_fingerprint":"f","object":"chat.completion.chunk","usage":{}}',
    )
)
def test_the_fast_path_never_disagrees_with_the_full_parse(payload: bytes) -> None:
    fast = text_delta(payload)
    if fast is not None:
        assert full_parse_text(payload) == fast


async def fake_stream_payloads(fake: FakeLlamaServer) -> list[bytes]:
    """The `data:` payloads of one streamed answer from the fake, read off a raw socket."""
    body = orjson.dumps(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_progress": True,
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    raw = await reader.read(-1)  # the fake, like llama-server, closes after a stream
    writer.close()
    _head, _, chunked = raw.partition(b"\r\n\r\n")
    events = dechunk(chunked).split(b"\n\n")
    return [e[6:] for e in events if e.startswith(b"data: ") and e != b"data: [DONE]"]


def dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2

"""The relay's wire path (translate/fast_delta.py `WireTexts` and `wire_events`, taken
by upstream/relay.py `_Attempt.take_raw` before the chunked and SSE decoders) against the
decoders it stands in for.

It may decline anything (None: the decoders take the bytes); it must never take bytes the
decoders would read otherwise, and a streamed answer must reach the client exactly as the
decoders alone would relay it, however llama-server's bytes are split across reads.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from casedesk.http.chunked import ChunkedDecoder, ChunkedError
from casedesk.translate import fast_delta
from casedesk.http.sse import SseDecoder
from casedesk.translate.fast_delta import WireTexts, text_delta, wire_events, wire_text_delta
from casedesk.upstream import relay
from tests.support.gateway import GatewayFactory, gateway_config
from tests.support.wire import raw_events

LINES = (Path(__file__).parent / "llama_server_chunks.txt").read_bytes().splitlines()
PAYLOADS = [line for line in LINES if line and not line.startswith(b"#")]  # in stream order
TEXTS = [p for p in PAYLOADS if text_delta(p) is not None]


def framed(payload: bytes) -> bytes:
    """One SSE event in one HTTP chunk, as llama-server writes each."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(event), event)


def decoded_event(wire: bytes) -> bytes | None:
    """What the chunked decoder makes of `wire` when it is exactly one chunk holding exactly
    one single-line `data:` event: that event's payload; else None."""
    decoder = ChunkedDecoder()
    try:
        body = decoder.feed(wire)
    except ChunkedError:
        return None
    if not decoder.between_chunks or not body.startswith(b"data: ") or not body.endswith(b"\n\n"):
        return None
    payload = body[6:-2]
    return payload if b"\n" not in payload and b"\r" not in payload else None


def test_every_recorded_text_chunk_is_taken_with_its_text() -> None:
    wire = b"".join(framed(p) for p in TEXTS)
    pos, texts = 0, []
    while (found := wire_text_delta(wire, pos)) is not None:
        text, pos = found
        texts.append(text)
    assert pos == len(wire)
    assert texts == [text_delta(p) for p in TEXTS] and len(texts) > 40


def test_a_read_of_many_is_taken_in_one_call_up_to_the_first_chunk_of_another_shape() -> None:
    """`WireTexts.take` (the relay's one call per read) takes what `wire_text_delta` would
    take one by one, and stops where it would stop: at a chunk of another shape, or a part."""
    other = framed(PAYLOADS[-2]) if text_delta(PAYLOADS[-2]) is None else framed(PAYLOADS[1])
    head, tail = b"".join(framed(p) for p in TEXTS[:5]), b"".join(framed(p) for p in TEXTS[5:8])
    wire = head + other + tail
    texts: list[str] = []
    assert WireTexts().take(wire, 0, texts) == len(head)
    assert texts == [text_delta(p) for p in TEXTS[:5]]
    texts.clear()
    assert WireTexts().take(wire, len(head) + len(other), texts) == len(wire)
    assert texts == [text_delta(p) for p in TEXTS[5:8]]
    texts.clear()
    assert WireTexts().take(head + tail[:-1], 0, texts, most=2) == len(framed(TEXTS[0]) + framed(TEXTS[1]))
    assert len(texts) == 2
    texts.clear()
    assert WireTexts().take(tail[:-1], 0, texts) == len(framed(TEXTS[5]) + framed(TEXTS[6]))  # the last is cut
    assert len(texts) == 2


def test_other_chunks_and_other_framings_are_declined() -> None:
    for payload in PAYLOADS:
        if text_delta(payload) is None:  # role, progress, finish, usage, [DONE]
            assert wire_text_delta(framed(payload), 0) is None
    chunk = framed(TEXTS[0])
    size, _, rest = chunk.partition(b"\r\n")
    for other in (
        size.upper() if size.upper() != size else b"0" + size,  # another spelling of the size
        b"0" + size,
        b"0x" + size,
        size + b";ext=1",
        size + b" ",
        b"%x" % (int(size, 16) + 1),
        b"%x" % (int(size, 16) - 1),
    ):
        assert wire_text_delta(other + b"\r\n" + rest, 0) is None
    assert wire_text_delta(chunk.replace(b"\n\n\r\n", b"\r\n\r\n"), 0) is None  # CRLF event end
    for cut in range(len(chunk)):  # a chunk not yet whole is left to the decoder
        assert wire_text_delta(chunk[:cut], 0) is None
    assert wire_text_delta(b"0\r\n\r\n", 0) is None  # the body's end is never taken


def edit(wire: bytearray, at: int, data: st.DataObject) -> None:
    """One byte replaced, inserted or deleted at `at`, of the kinds that break or fake a framing."""
    action = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    byte = data.draw(st.sampled_from(b'0aF9 \r\n\\"{}:,;x\x00\xc3'))
    if action == "replace":
        wire[at] = byte
    elif action == "insert":
        wire.insert(at, byte)
    elif len(wire) > 1:
        del wire[at]


@given(st.sampled_from(TEXTS), st.data())
def test_anything_taken_is_what_the_decoders_read(payload: bytes, data: st.DataObject) -> None:
    """Arbitrary edits of a real chunk: whatever is taken, the chunked decoder reads as one
    whole chunk of one event, whose payload the full fast path gives the same text."""
    wire = bytearray(framed(payload))
    for _ in range(data.draw(st.integers(0, 3))):
        edit(wire, data.draw(st.integers(0, len(wire) - 1)), data)
    wire_bytes = bytes(wire) + data.draw(st.sampled_from([b"", b"0\r\n\r\n", framed(TEXTS[1])]))
    found = wire_text_delta(wire_bytes, 0)
    if found is None:
        return
    text, end = found
    event = decoded_event(wire_bytes[:end])
    assert event is not None and text_delta(event) == text


def one_envelope(payload: bytes, like: bytes) -> bytes:
    """`payload`'s text in `like`'s envelope: a stream's chunks share theirs (created, id, model)."""
    cut, keep = payload.find(fast_delta._END), like.find(fast_delta._END)
    return payload[:cut] + like[keep:]


@given(st.lists(st.sampled_from(TEXTS), min_size=2, max_size=6), st.data())
def test_a_read_of_many_takes_what_one_chunk_at_a_time_takes(payloads: list[bytes], data: st.DataObject) -> None:
    """A read's chunks in one envelope, one of them edited anywhere (its envelope most of all:
    the batched call compares a chunk's envelope with the last one checked, where it lies):
    the one call takes exactly the texts and bytes that chunk-by-chunk calls take."""
    chunks = [bytearray(framed(one_envelope(p, payloads[0]))) for p in payloads]
    target = chunks[data.draw(st.integers(0, len(chunks) - 1))]
    envelope_at = bytes(target).find(fast_delta._END)
    for _ in range(data.draw(st.integers(1, 3))):
        edit(target, data.draw(st.integers(envelope_at, len(target) - 1) | st.integers(0, len(target) - 1)), data)
    wire = b"".join(bytes(c) for c in chunks)
    one_at_a_time: list[str] = []
    pos = 0
    while (found := wire_text_delta(wire, pos)) is not None:
        one_at_a_time.append(found[0])
        pos = found[1]
    texts: list[str] = []
    assert WireTexts().take(wire, 0, texts) == pos
    assert texts == one_at_a_time


def test_a_chunk_in_another_envelope_is_checked_afresh() -> None:
    """The envelope compared where it lies: a second chunk whose envelope differs (a new
    second in `created`, or one no plain chunk has) is checked, taken or declined, on its own."""
    first = framed(one_envelope(TEXTS[0], TEXTS[0]))
    later = one_envelope(TEXTS[1], TEXTS[0])
    next_second = later.replace(b'"created":%d' % orjson.loads(TEXTS[0])["created"], b'"created":1999999999')
    assert next_second != later
    escaped_model = later.replace(b'"model":"', b'"model":"\\u0041')
    for second, taken in ((later, True), (next_second, True), (escaped_model, False)):
        texts: list[str] = []
        end = WireTexts().take(first + framed(second) + framed(TEXTS[2]), 0, texts)
        if taken:
            assert len(texts) == 3 and end == len(first) + len(framed(second)) + len(framed(TEXTS[2]))
        else:
            assert len(texts) == 1 and end == len(first)  # declined: the decoders take it


def test_the_envelope_is_remembered_from_read_to_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """One token a read (a model's pace): a stream's WireTexts checks its envelope once, not once
    a read; a later read in another envelope (a new second in `created`) is checked afresh,
    and one no plain chunk has is declined, as on the first read."""
    reads = [framed(one_envelope(text, TEXTS[0])) for text in TEXTS[:4]]
    later = one_envelope(TEXTS[4], TEXTS[0])
    next_second = later.replace(b'"created":%d' % orjson.loads(TEXTS[0])["created"], b'"created":1999999999')
    expected = [[text_delta(text)] for text in [*TEXTS[:4], next_second]]
    checked: list[bytes] = []
    plain = fast_delta._plain_envelope

    def counted(tail: bytes) -> bool:
        checked.append(tail)
        return plain(tail)

    monkeypatch.setattr(fast_delta, "_plain_envelope", counted)
    stream = fast_delta.WireTexts()
    for read, want in zip(reads, expected, strict=False):
        texts: list[str] = []
        assert stream.take(read, 0, texts) == len(read)
        assert texts == want
    assert len(checked) == 1  # the first read's envelope, and no other
    texts = []
    assert stream.take(framed(next_second), 0, texts) == len(framed(next_second))
    assert texts == expected[4] and len(checked) == 2
    escaped_model = next_second.replace(b'"model":"', b'"model":"\\u0041')
    texts = []
    assert stream.take(framed(escaped_model), 0, texts) == 0 and texts == []  # the decoders take it
    texts = []
    assert stream.take(framed(next_second), 0, texts) == len(framed(next_second))  # (still known)
    assert len(checked) == 3


@given(st.text(max_size=40))
def test_any_text_llama_server_could_send_is_taken_whole(text: str) -> None:
    payload = TEXTS[0].replace(b'"content":"Repeat"', b'"content":' + orjson.dumps(text))
    assert payload != TEXTS[0] or text == "Repeat"
    assert wire_text_delta(framed(payload), 0) == (text, len(framed(payload)))


# -- through the gateway: the same events, however the upstream's bytes are split ----------------

HEAD = (
    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nContent-Type: text/event-stream\r\n"
    b"Server: llama.cpp\r\nTransfer-Encoding: chunked\r\nAccess-Control-Allow-Origin: \r\n\r\n"
)
WIRE = b"".join(framed(p) for p in PAYLOADS[1:]) + b"0\r\n\r\n"  # role, texts, finish, usage, [DONE]


def splits() -> Iterator[tuple[str, list[int]]]:
    """Cut points in WIRE: none, at every chunk, inside size lines and texts, and at random."""
    yield "whole", []
    starts, pos = [], 0
    while pos < len(WIRE):
        starts.append(pos)
        pos = WIRE.index(b"\r\n", pos)
        pos += 2 + int(WIRE[starts[-1] : pos], 16) + 2 if WIRE[starts[-1] : pos] != b"0" else len(WIRE) - pos
    yield "every chunk", starts[1:]
    yield "the role alone, then the rest", starts[1:2]  # (a prefill's progress comes before the text)
    yield "inside size lines", [s + 1 for s in starts[1:]]
    yield "inside the texts", [s + 80 for s in starts[1:]]
    for seed in range(4):
        chooser = random.Random(seed)
        yield f"random {seed}", sorted(chooser.sample(range(1, len(WIRE)), 30))


class SplitUpstream:
    """A llama-server that answers /health, and a streamed chat with WIRE cut at `cuts`, each
    piece its own write with a pause between (so that the gateway reads them apart)."""

    def __init__(self, cuts: list[int], wire: bytes = WIRE) -> None:
        self.cuts = cuts
        self.wire = wire
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if not head.startswith(b"POST /v1/chat/completions"):
                    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"status":"ok"}')
                    continue
                writer.write(HEAD)
                for a, b in zip([0, *self.cuts], [*self.cuts, len(self.wire)], strict=True):
                    writer.write(self.wire[a:b])
                    await writer.drain()
                    await asyncio.sleep(0.002)
                break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def relayed(start_gateway: GatewayFactory, cuts: list[int], wire: bytes = WIRE) -> list[tuple[str, Any]]:
    async with SplitUpstream(cuts, wire) as url:
        gateway = await start_gateway(gateway_config([url]))
        events = await raw_events(gateway, {})
        await gateway.shutdown()
    for name, data in events:
        if name == "message_start":
            data["message"]["id"] = "msg"  # (each answer has its own)
    return events


@pytest.mark.parametrize(("name", "cuts"), list(splits()))
async def test_the_client_gets_what_the_decoders_alone_would_relay(
    name: str, cuts: list[int], start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = 0

    take = fast_delta.WireTexts.take

    def counted(self: fast_delta.WireTexts, wire: bytes, pos: int, texts: list[str], most: int = -1) -> int:
        nonlocal taken
        before = len(texts)
        end = take(self, wire, pos, texts, most)
        taken += len(texts) - before
        return end

    monkeypatch.setattr(fast_delta.WireTexts, "take", counted)
    fast = await relayed(start_gateway, cuts)
    decoders_only(monkeypatch)
    slow = await relayed(start_gateway, cuts)
    assert fast == slow
    texts = "".join(d["delta"]["text"] for n, d in fast if n == "content_block_delta")
    # (the recorded texts include a chat template's end marker, where the translator ends the answer)
    assert len(texts) > 40 and "".join(text_delta(p) or "" for p in TEXTS).startswith(texts)
    assert fast[-1][0] == "message_stop"
    if name == "every chunk":  # (read whole, the first token leaves alone and the rest with it)
        assert taken >= 10  # the fast path did the work (all but the first token, up to the end)
    if name in ("whole", "the role alone, then the rest"):  # the read with the first token: its
        assert taken >= 10  # events up to it one by one (wire_events), the texts after it in one go


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


START = framed(PAYLOADS[1]) + framed(TEXTS[0]) + framed(TEXTS[1])  # role, then the first tokens
END = b"".join(framed(p) for p in PAYLOADS if text_delta(p) is None and b"role" not in p) + b"0\r\n\r\n"
# An event that spans two chunks: its first line in one, a whole text event in the next. SSE
# makes one event of both (a payload of two lines, not JSON): the text must not be taken alone.
SPANNING = START + chunk(b'data: {"x":1}\n') + framed(TEXTS[2]) + framed(TEXTS[3]) + END
# A chunk whose data holds, after a whole event, what looks like a whole text chunk: a read that
# begins inside that chunk (between its events) must not be taken as chunks of its own.
HIDDEN = framed(TEXTS[3])
NESTED = START + chunk(b"data: " + TEXTS[2] + b"\n\n" + HIDDEN) + framed(TEXTS[4]) + END


@pytest.mark.parametrize(
    ("wire", "cuts"),
    [
        (SPANNING, [len(START), len(START) + len(chunk(b'data: {"x":1}\n'))]),
        (NESTED, [len(START), NESTED.index(HIDDEN)]),
    ],
    ids=["event spanning chunks", "chunk inside a chunk"],
)
async def test_reads_that_do_not_begin_an_event_are_left_to_the_decoders(
    wire: bytes, cuts: list[int], start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = await relayed(start_gateway, cuts, wire)
    decoders_only(monkeypatch)
    assert fast == await relayed(start_gateway, cuts, wire)


def decoders_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay without its wire path: every byte through the chunked and SSE decoders."""
    monkeypatch.setattr(fast_delta.WireTexts, "take", lambda self, wire, pos, texts, most=-1: pos)
    monkeypatch.setattr(relay, "wire_events", lambda wire, pos: None)


# llama-server's own framing (docs/llama-server-facts.md §4): the role delta and the first token
# in one chunk, the finish and the usage in another.
ROLE = PAYLOADS[1]
FINISH = next(p for p in PAYLOADS if b'"finish_reason":"' in p)
USAGE = next(p for p in PAYLOADS if p.startswith(b'{"choices":[],'))
PAIRS = [[ROLE, TEXTS[0]], [FINISH, USAGE], [b"[DONE]"], [ROLE]]


def events_chunk(payloads: list[bytes]) -> bytes:
    return chunk(b"".join(b"data: " + p + b"\n\n" for p in payloads))


def decoded_events(wire: bytes) -> list[bytes] | None:
    """What the chunked and SSE decoders make of `wire` when it is exactly one chunk of whole
    `data:` events and nothing else: their payloads; else None."""
    decoder = ChunkedDecoder()
    try:
        body = decoder.feed(wire)
    except ChunkedError:
        return None
    payloads: list[bytes] = []
    errors: list[bytes] = []
    sse = SseDecoder(payloads.append, errors.append)
    sse.feed(body)
    whole = decoder.between_chunks and sse.idle and not errors and body.endswith(b"\n\n")
    return payloads if whole and payloads and body.count(b"data: ") == len(payloads) else None


def test_llama_servers_chunks_of_events_are_taken_as_the_decoders_read_them() -> None:
    for payloads in PAIRS:
        wire = events_chunk(payloads) + framed(TEXTS[1])
        assert wire_events(wire, 0) == (payloads, len(events_chunk(payloads)))
        assert decoded_events(events_chunk(payloads)) == payloads
    assert wire_events(b"0\r\n\r\n", 0) is None  # the body's end is the decoder's
    role = events_chunk([ROLE])
    for other in (
        chunk(b"error: " + ROLE + b"\n\n"),  # llama-server's error event
        chunk(b": comment\n\n"),
        chunk(b"data:" + ROLE + b"\n\n"),  # no space: the same event, left to the decoder
        chunk(b"data: " + ROLE + b"\r\n\r\n"),  # CRLF line ends
        chunk(b"data: " + ROLE + b"\ndata: 2\n\n"),  # one event of two lines
        chunk(b"data: " + ROLE + b"\n\nevent: x\n\n"),
        b"0" + role,  # the size line spelt otherwise (a leading zero)
        role[: len(role) - 1],  # not yet whole
    ):
        assert wire_events(other, 0) is None


@given(st.sampled_from(PAIRS), st.data())
def test_any_chunk_of_events_taken_is_what_the_decoders_read(payloads: list[bytes], data: st.DataObject) -> None:
    """Arbitrary edits of llama-server's chunks of events: whatever is taken, the decoders read
    as one whole chunk of exactly those events."""
    wire = bytearray(events_chunk(payloads))
    for _ in range(data.draw(st.integers(0, 3))):
        edit(wire, data.draw(st.integers(0, len(wire) - 1)), data)
    wire_bytes = bytes(wire) + data.draw(st.sampled_from([b"", b"0\r\n\r\n", framed(TEXTS[1])]))
    found = wire_events(wire_bytes, 0)
    if found is None:
        return
    taken, end = found
    assert decoded_events(wire_bytes[:end]) == taken


async def test_llama_servers_own_framing_reaches_the_client_as_the_decoders_make_it(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = b"".join(framed(p) for p in TEXTS[1:30])
    wire = events_chunk([ROLE, TEXTS[0]]) + texts + events_chunk([FINISH, USAGE]) + framed(b"[DONE]") + b"0\r\n\r\n"
    for cuts in ([], [len(events_chunk([ROLE, TEXTS[0]]))], sorted(random.Random(7).sample(range(1, len(wire)), 12))):
        fast = await relayed(start_gateway, cuts, wire)
        with monkeypatch.context() as patched:
            decoders_only(patched)
            assert fast == await relayed(start_gateway, cuts, wire)
        assert fast[-1][0] == "message_stop" and sum(n == "content_block_delta" for n, _ in fast) == 30

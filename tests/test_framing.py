"""The hand-written per-token parsers against the slow, obvious path: h11 for chunked
framing, a plain split for SSE; every split point of the same bytes must agree."""

from __future__ import annotations

import random

import h11
import pytest

from casedesk.http.chunked import ChunkedDecoder, ChunkedError
from casedesk.http.server import frame_chunk
from casedesk.http.sse import SseDecoder

BODY_PIECES = [b'data: {"a":1}\n\n', b"x", b"", b"\r\n\r\n0\r\n", bytes(range(256)), "é🐉".encode() * 50]
WIRE = b"".join(frame_chunk(p) for p in BODY_PIECES if p) + b"0\r\n\r\n"


def h11_body(wire: bytes) -> bytes:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + wire)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return body


def decode(parts: list[bytes]) -> tuple[bytes, bool]:
    decoder = ChunkedDecoder()
    return b"".join(decoder.feed(p) for p in parts), decoder.done


def test_whole_wire_matches_h11() -> None:
    # The writer's hand framing (frame_chunk) reads back through h11 as the same body, and
    # the hand de-framing reads it as h11 does.
    assert h11_body(WIRE) == b"".join(BODY_PIECES)
    assert decode([WIRE]) == (h11_body(WIRE), True)


def test_every_split_point_matches_h11() -> None:
    expected = h11_body(WIRE)
    for cut in range(len(WIRE) + 1):
        assert decode([WIRE[:cut], WIRE[cut:]]) == (expected, True), cut


def test_random_splits_and_byte_by_byte_match_h11() -> None:
    expected = h11_body(WIRE)
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(WIRE)), 5))
        parts = [WIRE[a:b] for a, b in zip([0, *cuts], [*cuts, len(WIRE)], strict=True)]
        assert decode(parts) == (expected, True)
    assert decode([bytes([b]) for b in WIRE]) == (expected, True)


def test_extensions_trailers_and_uppercase_hex() -> None:
    wire = b"A;name=value\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n"
    assert decode([wire]) == (h11_body(wire), True) == (b"0123456789", True)


@pytest.mark.parametrize(
    "wire",
    [b"zz\r\nab\r\n", b"2\r\nabc\r\n", b"1\r\na\r\n0\r\n\r\nextra", b"-1\r\n", b"1" * 5000],
)
def test_broken_framing_is_an_error(wire: bytes) -> None:
    with pytest.raises(ChunkedError):
        decode([wire])


EVENTS = b'data: {"n":1}\n\n: comment\n\ndata: line1\ndata: line2\n\nerror: {"e":1}\n\ndata: [DONE]\n\n'


def sse(parts: list[bytes]) -> list[tuple[str, bytes]]:
    seen: list[tuple[str, bytes]] = []
    decoder = SseDecoder(lambda p: seen.append(("data", p)), lambda p: seen.append(("error", p)))
    for part in parts:
        decoder.feed(part)
    return seen


def test_sse_events_at_every_split_point() -> None:
    expected = [("data", b'{"n":1}'), ("data", b"line1\nline2"), ("error", b'{"e":1}'), ("data", b"[DONE]")]
    assert sse([EVENTS]) == expected
    for cut in range(len(EVENTS) + 1):
        assert sse([EVENTS[:cut], EVENTS[cut:]]) == expected, cut


def test_sse_one_event_per_feed_fast_path_and_multi_line_data() -> None:
    assert sse([b'data: {"x":1}\n\n', b'data: {"x":2}\n\n']) == [("data", b'{"x":1}'), ("data", b'{"x":2}')]
    assert sse([b"data: a\ndata: b\n\n"]) == [("data", b"a\nb")]
    # Bytes after the blank line are not part of the event (the fast path must not take it).
    assert sse([b"data: a\n\nda", b"ta: b\n\n"]) == [("data", b"a"), ("data", b"b")]
    assert sse([b"data: a\nX"]) == []


# The SSE spec's line endings: CRLF, LF or CR, in any mix; events end at a blank line.
LINE_ENDINGS = {
    "crlf": EVENTS.replace(b"\n", b"\r\n"),
    "cr": EVENTS.replace(b"\n", b"\r"),
    "mixed": b'data: {"n":1}\r\n\r: comment\n\ndata: line1\rdata: line2\r\n\nerror: {"e":1}\r\rdata: [DONE]\n\r\n',
}


@pytest.mark.parametrize("name", sorted(LINE_ENDINGS))
def test_sse_events_with_every_line_ending_at_every_split_point(name: str) -> None:
    wire = LINE_ENDINGS[name]
    expected = [("data", b'{"n":1}'), ("data", b"line1\nline2"), ("error", b'{"e":1}'), ("data", b"[DONE]")]
    assert sse([wire]) == expected
    for cut in range(len(wire) + 1):
        assert sse([wire[:cut], wire[cut:]]) == expected, cut
    assert sse([bytes([b]) for b in wire]) == expected


def test_sse_a_cr_lf_split_across_feeds_is_one_line_ending() -> None:
    # "data: a\r" then "\n": the \n completes the line ending; it is not a blank line.
    assert sse([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [("data", b"a\nb")]
    assert sse([b"data: a\r\r", b"\ndata: b\r\r"]) == [("data", b"a"), ("data", b"b")]


def test_sse_an_event_past_the_bound_fails_once_with_a_clear_message() -> None:
    seen: list[tuple[str, bytes]] = []
    decoder = SseDecoder(lambda p: seen.append(("data", p)), lambda p: seen.append(("error", p)), max_event_bytes=1000)
    decoder.feed(b"data: ok\n\n")
    for _ in range(5):
        decoder.feed(b"data: " + b"x" * 400)  # no line ending: one event that never ends
    decoder.feed(b"\n\ndata: later\n\n")
    assert seen[0] == ("data", b"ok")
    assert [kind for kind, _ in seen[1:]] == ["error"]  # reported once; nothing after it
    assert b"larger than 1000 bytes" in seen[1][1]


def test_sse_buffer_is_bounded_by_default() -> None:
    seen: list[tuple[str, bytes]] = []
    decoder = SseDecoder(lambda p: seen.append(("data", p)), lambda p: seen.append(("error", p)))
    for _ in range(20):
        decoder.feed(b"data: " + b"x" * 100_000)
    assert [kind for kind, _ in seen] == ["error"]

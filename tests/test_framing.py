"""The hand-written parsers and writers against the slow, obvious path: h11 for chunked
framing, for the upstream side's request bytes, response heads and body ends, and for the
client side's answers (heads, chunks, keep-alive); a plain split for SSE; every split point of
the same bytes must agree."""

from __future__ import annotations

import asyncio
import http
import random
import re
from typing import cast

import h11
import pytest

from casedesk.http.chunked import ChunkedDecoder, ChunkedError
from casedesk.http.headers import join_headers
from casedesk.http.limits import ServerLimits
from casedesk.http.request_head import RequestHead
from casedesk.http.response_head import CONTINUE, NO_REQUEST, HeadError, response_head
from casedesk.http.server import (
    ConnectionTracker,
    ErrorResponse,
    HttpProtocol,
    Request,
    ResponseWriter,
    asker_of_head,
    frame_chunk,
    start_server,
)
from casedesk.http.sse import SseDecoder
from casedesk.upstream.framing import (
    MAX_HEAD_BYTES,
    FramingError,
    HeadParser,
    LengthDecoder,
    UntilCloseDecoder,
    body_decoder,
    parse_head,
    request_bytes,
)

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


# -- the upstream side's hand framing (upstream/framing.py) against h11 --------------------------

LLAMA_HEAD = b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
SSE_CHUNKS = [
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
    b'"object":"chat.completion.chunk","prompt_progress":{"total":107,"cache":0,"processed":0}}\n\n',
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" a"}}],'
    b'"object":"chat.completion.chunk"}\n\n',
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}]}\n\ndata: {"choices":[],"usage":{}}\n\n',
    b"data: [DONE]\n\n",
]
SSE_BODY = b"".join(frame_chunk(c) for c in SSE_CHUNKS) + b"0\r\n\r\n"
JSON_BODY = b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","content":"<|im"}}]}'
ERROR_BODY = b'{"error":{"code":500,"message":"the model crashed","type":"server_error"}}'
KEEP = b"Keep-Alive: timeout=5, max=100\r\n"
JSON_TYPE = b"Content-Type: application/json; charset=utf-8\r\n"

# Real-shaped llama-server answers (docs/llama-server-facts.md §4–5) and the other framings.
ANSWERS = {
    "sse stream, keep-alive": LLAMA_HEAD
    + b"X-Accel-Buffering: no\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    + KEEP
    + b"\r\n"
    + SSE_BODY,
    "sse stream, close": LLAMA_HEAD
    + b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    + SSE_BODY,
    "content-length json": LLAMA_HEAD
    + JSON_TYPE
    + b"Content-Length: %d\r\n" % len(JSON_BODY)
    + KEEP
    + b"\r\n"
    + JSON_BODY,
    "500 json, close": b"HTTP/1.1 500 Internal Server Error\r\nServer: llama.cpp\r\n"
    + JSON_TYPE
    + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(ERROR_BODY)
    + ERROR_BODY,
    "http/1.0 content-length": b"HTTP/1.0 200 OK\r\nContent-Length: 15\r\n\r\n" + b'{"status":"ok"}',
    "close-delimited": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + JSON_BODY,
    "http/1.0 close-delimited": b"HTTP/1.0 404 Not Found\r\n\r\nnothing here",
    "100 continue first": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + KEEP + b"\r\n{}",
    "204, no body": b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n" + KEEP + b"\r\n",
    "bare LF, no reason": b"HTTP/1.1 200\nContent-Length: 2\nConnection: keep-alive, Close\n\n{}",
    "repeated fields, equal lengths": b"HTTP/1.1 200 OK\r\nVary: a\r\nvary:  b \r\nContent-Length: 2, 2\r\n"
    b"content-length: 2\r\nX-Empty:\r\n\r\n{}",
}


def h11_answer(pieces: list[bytes]) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, the socket could carry another request) as h11 reads it."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/v1/chat/completions", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    status, headers, body, reusable = 0, {}, b"", False
    for piece in [*filter(None, pieces), b""]:  # b"": the server closes after its last byte
        client.receive_data(piece)
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Response):
                status, headers = event.status_code, join_headers(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                # Reusable: the body ended before the close, and h11 would start a next cycle.
                reusable = bool(piece) and client.their_state is h11.DONE
                return status, headers, body, reusable
    raise AssertionError("h11 saw no end")


def hand_answer(pieces: list[bytes]) -> tuple[int, dict[str, str], bytes, bool]:
    """The same, read by HeadParser and body_decoder as the pool reads it."""
    parser = HeadParser()
    parsed = None
    rest = iter([*filter(None, pieces), b""])  # b"": the close
    for piece in rest:
        parsed = parser.feed(piece)
        if parsed is not None:
            break
    assert parsed is not None
    head, leftover = parsed
    decoder = body_decoder(head, "POST")
    body = decoder.feed(leftover) if leftover else b""
    for piece in rest:
        if decoder.done:
            break
        if piece:
            body += decoder.feed(piece)
        else:  # the close
            assert isinstance(decoder, UntilCloseDecoder)
            decoder.close()
    assert decoder.done
    ends_by_itself = not isinstance(decoder, UntilCloseDecoder)
    return head.status, head.headers, body, head.keep_alive and ends_by_itself


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_upstream_answers_read_as_h11_reads_them_at_every_split_point(name: str) -> None:
    wire = ANSWERS[name]
    whole = h11_answer([wire])
    assert whole[0] >= 200 and (whole[2] or whole[0] == 204)
    assert hand_answer([wire]) == whole
    for cut in range(len(wire) + 1):
        pieces = [wire[:cut], wire[cut:]]
        assert hand_answer(pieces) == h11_answer(pieces) == whole, cut
    one_by_one = [bytes([b]) for b in wire]
    assert hand_answer(one_by_one) == h11_answer(one_by_one) == whole


def test_the_answers_say_what_the_pool_needs() -> None:
    # Spot checks that the comparison above compares something: the framings differ.
    assert hand_answer([ANSWERS["sse stream, keep-alive"]])[2] == b"".join(SSE_CHUNKS)
    assert hand_answer([ANSWERS["content-length json"]])[3] is True
    assert hand_answer([ANSWERS["500 json, close"]])[:1] == (500,)
    assert hand_answer([ANSWERS["close-delimited"]])[2:] == (JSON_BODY, False)
    assert hand_answer([ANSWERS["bare LF, no reason"]])[3] is False  # `Close` is a token, any case
    headers = hand_answer([ANSWERS["repeated fields, equal lengths"]])[1]
    assert headers == {"vary": "a, b", "content-length": "2", "x-empty": ""}


MALFORMED = {
    "obs-fold at the first field": b"HTTP/1.1 200 OK\r\n folded\r\nContent-Length: 0\r\n\r\n",
    "space before the colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "no colon": b"HTTP/1.1 200 OK\r\nContent-Length 0\r\n\r\n",
    "bad name": b"HTTP/1.1 200 OK\r\nBad[name]: x\r\nContent-Length: 0\r\n\r\n",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "two-digit status": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "four-digit status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "two spaces": b"HTTP/1.1  200 OK\r\nContent-Length: 0\r\n\r\n",
    "not HTTP": b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "no version dot": b"HTTP/11 200 OK\r\nContent-Length: 0\r\n\r\n",
    "lower-case name": b"http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "empty line first": b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "non-numeric Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    "negative Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "empty Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
    "21-digit Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 21 + b"\r\n\r\n",
    "conflicting Content-Length in one field": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
    "conflicting Content-Length fields": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    "gzip, chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "two Transfer-Encoding fields": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    "101 nobody asked for": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
}


def h11_refuses(pieces: list[bytes]) -> bool:
    try:
        h11_answer(pieces)
    except h11.RemoteProtocolError:
        return True
    return False


def hand_refuses(pieces: list[bytes]) -> bool:
    parser = HeadParser()
    try:
        for piece in pieces:
            if parser.feed(piece) is not None:
                return False
    except FramingError:
        return True
    return False


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_heads_are_refused_by_h11_and_by_hand(name: str) -> None:
    wire = MALFORMED[name]
    assert h11_refuses([wire])
    for cut in range(len(wire) + 1):
        assert hand_refuses([wire[:cut], wire[cut:]]), cut


def test_an_over_long_head_is_refused_by_both() -> None:
    wire = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"x" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n"
    pieces = [wire[i : i + 1024] for i in range(0, len(wire), 1024)]
    assert h11_refuses(pieces) and hand_refuses(pieces) and hand_refuses([wire])
    # Just under the bound is a head.
    fits = b"HTTP/1.1 200 OK\r\nX: " + b"x" * (MAX_HEAD_BYTES - 30) + b"\r\n\r\n"
    assert len(fits) <= MAX_HEAD_BYTES and not hand_refuses([fits])


def test_where_the_hand_parser_is_stricter_than_h11() -> None:
    # h11 unfolds an obs-fold after the first field and speaks any HTTP/d.d; RFC 9112 §5.2 lets
    # a gateway refuse the fold, and llama-server speaks HTTP/1.1 only.
    for wire in (
        b"HTTP/1.1 200 OK\r\nX: a\r\n\tb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ):
        assert not h11_refuses([wire]) and hand_refuses([wire])


def test_bytes_past_a_content_length_body_are_not_body_and_spend_the_socket() -> None:
    head, rest = HeadParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200") or (None, b"")
    assert head is not None
    decoder = body_decoder(head, "GET")
    assert isinstance(decoder, LengthDecoder)
    assert decoder.feed(rest) == b"{}" and decoder.done and decoder.overrun


def test_no_body_after_204_304_or_a_head_request() -> None:
    for status, method in ((204, "GET"), (304, "GET"), (200, "HEAD")):
        head = parse_head(b"HTTP/1.1 %d X\r\nContent-Length: 9" % status)
        assert head is not None and body_decoder(head, method).done


@pytest.mark.parametrize(
    ("method", "target", "body", "content_type"),
    [
        ("POST", "/v1/chat/completions", b'{"messages":[]}', "application/json"),
        ("GET", "/health", None, "application/json"),
        ("POST", "/slots/0?action=save", b"", "application/json"),
        ("POST", "/tokenize", "é".encode() * 10, "text/plain; charset=utf-8"),
    ],
)
def test_request_bytes_are_the_bytes_h11_wrote(method: str, target: str, body: bytes | None, content_type: str) -> None:
    headers = [("host", "127.0.0.1:8080"), ("accept", "*/*")]
    if body is not None:
        headers += [("content-type", content_type), ("content-length", str(len(body)))]
    client = h11.Connection(h11.CLIENT)
    expected = client.send(h11.Request(method=method, target=target, headers=headers))
    if body:
        expected += client.send(h11.Data(data=body))
    expected += client.send(h11.EndOfMessage())
    assert request_bytes(method, target, "127.0.0.1:8080", body, content_type) == expected


@pytest.mark.parametrize(
    ("method", "target", "host"),
    [("GET", "/a b", "h"), ("GET", "/a\r\nX: 1", "h"), ("GET", "/", "h\r\nX: 1"), ("G T", "/", "h"), ("GET", "", "h")],
)
def test_request_bytes_refuse_what_would_break_the_framing(method: str, target: str, host: str) -> None:
    with pytest.raises(ValueError):
        request_bytes(method, target, host, None)


# The client side's answers: what ResponseWriter writes (heads by http/response_head.py,
# chunks by frame_chunk) against what h11 wrote for the same events, as ResponseWriter sent
# them through h11 before, after h11 received the same request.

REQUEST_LINES = [
    (method, version, connection)
    for method in (b"GET", b"POST", b"HEAD")
    for version in (b"1.0", b"1.1")
    for connection in (None, b"close", b"keep-alive", b"Keep-Alive, Close")
]
WHOLE_STATUSES = (200, 204, 304, 400, 404, 413, 429, 500, 529)
EXTRA_HEADERS: list[tuple[tuple[str, str], ...]] = [
    (),
    (("retry-after", "3"), ("anthropic-ratelimit-requests-remaining", "41"), ("x-note", "a  b\tc")),
    (("connection", "keep-alive"),),
]
CHUNKS = [b"event: a\ndata: {}\n\n", b": keep-alive\n\n", b"x" * 300]


def request_bytes_of(method: bytes, version: bytes, connection: bytes | None, expect: bool = False) -> bytes:
    head = b"%s /p HTTP/%s\r\nhost: x\r\n" % (method, version)
    if connection is not None:
        head += b"connection: " + connection + b"\r\n"
    if method == b"POST":
        head += b"content-length: 2\r\n" + (b"expect: 100-continue\r\n" if expect else b"")
    return head + b"\r\n" + (b"{}" if method == b"POST" else b"")


def h11_server_after(request: bytes) -> tuple[h11.Connection, h11.Request, bytes]:
    """An h11 server that has read `request` whole (and said 100 Continue if asked)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request)
    head = conn.next_event()
    assert isinstance(head, h11.Request)
    said = b""
    if conn.they_are_waiting_for_100_continue:
        said = conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass
    return conn, head, said


def h11_reason(status: int) -> bytes:
    return b"Overloaded" if status == 529 else http.HTTPStatus(status).phrase.encode()


def h11_whole(
    conn: h11.Connection, head_only: bool, status: int, body: bytes, extra: Headers, close: bool, draining: bool
) -> bytes:
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), *extra]
    if close:
        headers.append(("connection", "close"))
    headers.append(("request-id", "req_1"))
    if draining and ("connection", "close") not in headers:
        headers.append(("connection", "close"))
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=h11_reason(status)))
    if body and not head_only:
        out += conn.send(h11.Data(data=body))
    return out + conn.send(h11.EndOfMessage())


def h11_stream(conn: h11.Connection, head: h11.Request, status: int, extra: Headers, draining: bool) -> bytes:
    headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache"), *extra, ("request-id", "req_1")]
    if draining:
        headers.append(("connection", "close"))
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=h11_reason(status)))
    if head.method != b"HEAD" and status not in (204, 304):  # h11 refuses a body there
        for chunk in CHUNKS:
            out += conn.send(h11.Data(data=chunk))
    return out + conn.send(h11.EndOfMessage())


class Recorder:
    """What ResponseWriter needs of its HttpProtocol: somewhere to write."""

    def __init__(self, draining: bool) -> None:
        self.tracker = ConnectionTracker()
        self.tracker.draining = draining
        self.wire = b""
        self.bytes_written = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.wire += data
        self.bytes_written += len(data)


def hand_writer(head: h11.Request, draining: bool) -> tuple[ResponseWriter, Recorder]:
    recorder = Recorder(draining)
    parsed = RequestHead(head.method, head.target, head.http_version, tuple(head.headers), False)
    return ResponseWriter(cast(HttpProtocol, recorder), "req_1", asker_of_head(parsed)), recorder


Headers = tuple[tuple[str, str], ...]


def test_whole_answers_are_the_bytes_h11_wrote_and_keep_alive_as_h11_decided() -> None:
    cases = 0
    for method, version, connection in REQUEST_LINES:
        request = request_bytes_of(method, version, connection)
        for status in WHOLE_STATUSES:
            body = b"" if status in (204, 304) else b'{"type":"error"}'
            for extra in EXTRA_HEADERS:
                for close in (False, True):
                    for draining in (False, True):
                        conn, head, _ = h11_server_after(request)
                        expected = h11_whole(conn, method == b"HEAD", status, body, extra, close, draining)
                        writer, recorder = hand_writer(head, draining)
                        writer.send(status, body, headers=extra, close=close)
                        case = (method, version, connection, status, extra, close, draining)
                        assert recorder.wire == expected, case
                        assert writer.finished and writer.keep_alive == (conn.our_state is h11.DONE), case
                        assert conn.our_state in (h11.DONE, h11.MUST_CLOSE)
                        cases += 1
    assert cases == len(REQUEST_LINES) * len(WHOLE_STATUSES) * len(EXTRA_HEADERS) * 4


def test_streamed_answers_are_the_bytes_h11_wrote_and_keep_alive_as_h11_decided() -> None:
    for method, version, connection in REQUEST_LINES:
        request = request_bytes_of(method, version, connection)
        for status in (200, 204, 304, 529):
            for extra in [*EXTRA_HEADERS, (("transfer-encoding", "chunked"), ("content-length", "9"))]:
                for draining in (False, True):
                    conn, head, _ = h11_server_after(request)
                    expected = h11_stream(conn, head, status, extra, draining)
                    writer, recorder = hand_writer(head, draining)
                    writer.start_stream(status, headers=extra)
                    for chunk in CHUNKS:  # given even where no body may follow: none is written
                        writer.write(chunk)
                    writer.end()
                    case = (method, version, connection, status, extra, draining)
                    assert recorder.wire == expected, case
                    assert writer.keep_alive == (conn.our_state is h11.DONE), case


def test_a_head_prepared_while_the_upstream_works_is_the_head_start_stream_renders() -> None:
    """prepare_stream (called while llama-server reads the prompt) changes no byte: the same
    wire as an unprepared stream for every request line and status, and a head prepared with
    other headers, or before shutdown began, is rendered afresh (shutdown adds its close)."""
    for method, version, connection in REQUEST_LINES:
        request = request_bytes_of(method, version, connection)
        for status in (200, 204, 529):
            for extra in EXTRA_HEADERS:
                for prepared_with, draining_after in ((extra, False), ((("x-other", "1"),), False), (extra, True)):
                    conn, head, _ = h11_server_after(request)
                    expected = h11_stream(conn, head, status, extra, draining_after)
                    writer, recorder = hand_writer(head, draining=False)
                    writer.prepare_stream(status, headers=prepared_with)
                    assert recorder.wire == b"" and not writer.started  # nothing sent, nothing begun
                    recorder.tracker.draining = draining_after
                    writer.start_stream(status, headers=extra)
                    for chunk in CHUNKS:
                        writer.write(chunk)
                    writer.end()
                    case = (method, version, connection, status, extra, prepared_with, draining_after)
                    assert recorder.wire == expected, case
                    assert writer.keep_alive == (conn.our_state is h11.DONE), case


def test_an_http_1_1_stream_reads_back_through_h11_at_every_split_point() -> None:
    conn, head, _ = h11_server_after(request_bytes_of(b"GET", b"1.1", None))
    writer, recorder = hand_writer(head, draining=False)
    writer.start_stream(headers=(("x-accel-buffering", "no"),))
    for chunk in CHUNKS:
        writer.write(chunk)
    writer.end()
    wire = recorder.wire
    for cut in range(len(wire) + 1):
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/p", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        body, done = b"", False
        for part in [p for p in (wire[:cut], wire[cut:]) if p]:  # b"" would say "closed"
            client.receive_data(part)
            while (event := client.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Response):
                    assert event.status_code == 200 and (b"x-accel-buffering", b"no") in list(event.headers)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    done = True
                    break
        assert (body, done, client.their_state) == (b"".join(CHUNKS), True, h11.DONE), cut


def test_100_continue_is_the_bytes_h11_wrote() -> None:
    _, _, said = h11_server_after(request_bytes_of(b"POST", b"1.1", None, expect=True))
    assert said == CONTINUE == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert h11_server_after(request_bytes_of(b"POST", b"1.0", None, expect=True))[2] == b""  # 1.0 ignores Expect


def test_an_error_before_any_request_head_is_what_h11_wrote_then() -> None:
    # A head too large or malformed: h11 knows no request, and assumes the worst of the client.
    for draining in (False, True):
        conn = h11.Connection(h11.SERVER)
        expected = h11_whole(conn, False, 431, b"{}", (), True, draining)
        recorder = Recorder(draining)
        writer = ResponseWriter(cast(HttpProtocol, recorder), "req_1", NO_REQUEST)
        writer.send(431, b"{}", close=True)
        assert recorder.wire == expected and not writer.keep_alive and conn.our_state is h11.MUST_CLOSE


@pytest.mark.parametrize(
    "headers",
    [
        [("x-bad", "a\r\nx-injected: 1")],
        [("x-bad", "a\nb")],
        [("x-bad", " leading")],
        [("bad name", "v")],
        [("x-bad", "é")],
        [("content-length", "1"), ("content-length", "2")],
        [("transfer-encoding", "gzip")],
    ],
)
def test_heads_h11_refused_are_refused(headers: list[tuple[str, str]]) -> None:
    with pytest.raises((h11.LocalProtocolError, UnicodeEncodeError)):
        h11.Connection(h11.SERVER).send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
    with pytest.raises(HeadError):
        response_head(200, headers, NO_REQUEST)


def test_a_body_on_a_204_is_refused_as_h11_refused_it() -> None:
    conn, head, _ = h11_server_after(request_bytes_of(b"GET", b"1.1", None))
    conn.send(h11.Response(status_code=204, headers=[("content-length", "2")], reason=b"No Content"))
    with pytest.raises(h11.LocalProtocolError):
        conn.send(h11.Data(data=b"{}"))
    writer, recorder = hand_writer(head, draining=False)
    with pytest.raises(HeadError):
        writer.send(204, b"{}")
    assert recorder.wire == b""


async def test_one_connection_end_to_end_writes_what_one_h11_connection_wrote() -> None:
    # A real HttpProtocol over a socket: pipelined requests (a whole answer, 100-continue, a
    # HEAD, a stream), then an HTTP/1.0 stream that closes; the bytes are h11's for the same
    # requests and answers on one h11 connection, cycle after cycle.
    async def handler(request: Request, writer: ResponseWriter) -> None:
        if request.path == "/stream":
            writer.start_stream(headers=(("x-accel-buffering", "no"),))
            for chunk in CHUNKS:
                writer.write(chunk)
            writer.end()
        else:
            writer.send(200, b'{"ok":' + request.body + b"}", headers=(("x-path", request.path),))

    server = await start_server(
        handler, ServerLimits(), ConnectionTracker(), lambda s, m: ErrorResponse(s, b"{}"), host="127.0.0.1"
    )
    requests = [
        b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST /posted HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n{}",
        b"HEAD /whole HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST /posted HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1\r\n[\r\n1\r\n]\r\n0\r\n\r\n",
        b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /stream HTTP/1.0\r\n\r\n",
    ]
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(requests))
        wire = await asyncio.wait_for(reader.read(-1), 10)  # the HTTP/1.0 stream ends at the close
        writer.close()
    finally:
        server.close()
    ids = re.findall(rb"request-id: (req_[0-9a-f]+)", wire)
    assert len(ids) == len(requests)

    conn = h11.Connection(h11.SERVER)
    expected = b""
    for request, request_id in zip(requests, ids, strict=True):
        conn.receive_data(request)
        head = conn.next_event()
        assert isinstance(head, h11.Request)
        if conn.they_are_waiting_for_100_continue:
            expected += conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        body = b""
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data)
            body += event.data
        path = head.target.decode()
        if path == "/stream":
            headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
            headers += [("x-accel-buffering", "no"), ("request-id", request_id.decode())]
            expected += conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
            expected += b"".join(conn.send(h11.Data(data=chunk)) for chunk in CHUNKS)
        else:
            answer = b'{"ok":' + body + b"}"
            headers = [("content-type", "application/json"), ("content-length", str(len(answer)))]
            headers += [("x-path", path), ("request-id", request_id.decode())]
            expected += conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
            if head.method != b"HEAD":
                expected += conn.send(h11.Data(data=answer))
        expected += conn.send(h11.EndOfMessage())
        if conn.our_state is h11.DONE:
            conn.start_next_cycle()
    assert conn.our_state is h11.MUST_CLOSE  # the HTTP/1.0 stream: close-delimited
    assert wire == expected


def test_a_head_seen_before_reads_the_same_and_a_refused_one_is_refused_again() -> None:
    """Heads are remembered (llama-server's repeat byte for byte): the same bytes give an equal
    head, and a refusal is never remembered as an answer."""
    block = b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nTransfer-Encoding: chunked\r\nConnection: close"
    first, again = parse_head(block), parse_head(block)
    assert first == again and first is not None and first.chunked and not first.keep_alive
    for _ in range(2):
        with pytest.raises(FramingError):
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2")

"""The request head parser against plain h11 on the same bytes: generated heads that mix valid
pieces with near-misses must give h11's fields, or h11's error (the same status hint); the
heads the official SDKs and curl send must take the fast path, and so must the common shapes
(else the fast path could silently always fall back and these tests would still pass)."""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from casedesk.http.request_head import RequestHead, fast_request_head, parse_request_head
from casedesk.http.server import _HEAD_END

Outcome = tuple[str, object]


def by_h11(data: bytes) -> Outcome:
    """Plain h11, as http/server.py used it: a fresh server connection given one head."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return ("error", exc.error_status_hint)
    assert isinstance(event, h11.Request), event
    headers = tuple((bytes(name), bytes(value)) for name, value in event.headers)
    fields = (event.method, event.target, event.http_version, headers, conn.they_are_waiting_for_100_continue)
    return ("ok", fields)


def by_us(data: bytes) -> Outcome:
    try:
        head = parse_request_head(data, 64 * 1024)
    except h11.RemoteProtocolError as exc:
        return ("error", exc.error_status_hint)
    return ("ok", fields_of(head))


def fields_of(head: RequestHead) -> tuple[object, ...]:
    for field in (head.method, head.target, head.http_version, *(b for pair in head.headers for b in pair)):
        assert type(field) is bytes
    return (head.method, head.target, head.http_version, head.headers, head.expects_continue)


def one_head(wire: bytes) -> bytes | None:
    """What http/server.py hands the parser: the bytes through the first blank line."""
    found = _HEAD_END.search(wire)
    return None if found is None else wire[: found.end()]


def check(data: bytes) -> None:
    expected = by_h11(data)
    assert by_us(data) == expected
    fast = fast_request_head(data)
    if fast is not None:  # the fast path never accepts what h11 refuses, nor differs from it
        assert ("ok", fields_of(fast)) == expected


# -- the grammar: valid pieces and near-misses ----------------------------------------------

METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"CONNECT", b"M-SEARCH", b"get", b"X!#$%&'*+.^_`|~9"]
BAD_METHODS = [b"", b"PO ST", b"PO\x00ST", b"POST\t", b"P\xc3\xa9", b"(x)", b"PO:ST", b"GET\r"]
TARGETS = [b"/v1/messages", b"/", b"*", b"http://h:1/x?y=1&z=%20", b"127.0.0.1:8080", b"/p?q=\x7e!"]
BAD_TARGETS = [b"", b"/a b", b"/\x01", b"/\x7f", b"/caf\xc3\xa9", b"/\t", b"/a\rb", b"/\x00"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0"]
ODD_VERSIONS = [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/9.9", b"http/1.1", b"HTTP/11", b"HTTP/1.1 ", b"HTTP/1.x"]
NAMES = [
    b"Host",
    b"host",
    b"HOST",
    b"Content-Length",
    b"content-length",
    b"Transfer-Encoding",
    b"Expect",
    b"EXPECT",
    b"Connection",
    b"Upgrade",
    b"Origin",
    b"x-api-key",
    b"X-Stainless-Lang",
    b"!#$%&'*+-.^_`|~09az",
]
BAD_NAMES = [b"", b"bad name", b"x-a ", b" x-a", b"\tx", b"na\x00me", b"n\xe9", b"x@y", b"x(y)", b"a\x7f"]
VALUES = [
    b"",
    b"x",
    b"127.0.0.1:8080",
    b"100-continue",
    b"100-Continue",
    b"100-CONTINUE, foo",
    b" , 100-continue ,",
    b"100-continuex",
    b"0",
    b"5",
    b"073",
    b"5, 5",
    b"5,6",
    b"-1",
    b"+5",
    b"5 ",
    b"1" * 20,
    b"1" * 21,
    b"\xd9\xa5",  # an Arabic-Indic digit: not 0-9
    b"chunked",
    b"Chunked",
    b"gzip, chunked",
    b"identity",
    b"close",
    b"keep-alive",
    b"Keep-Alive, Upgrade",
    b"h2c",
    b"a b\tc",
    b"a\x01b",
    b"a\x7f",
    b"caf\xc3\xa9",
    b"application/json",
]
BAD_VALUES = [b"a\x00b", b"a\x0bb", b"a\x0cb", b"a\rb", b"\x00"]


def pick(good: list[bytes], bad: list[bytes]) -> st.SearchStrategy[bytes]:
    """Mostly a valid piece, sometimes a near-miss, now and then any bytes: so that most heads
    are one or two mistakes away from valid, and many are valid."""
    return st.sampled_from(range(100)).flatmap(
        lambda n: st.sampled_from(good) if n < 96 else st.sampled_from(bad) if n < 99 else st.binary(max_size=6)
    )


SPACE = pick([b"", b"", b" ", b"  ", b"\t", b" \t "], [b"\x0b", b"\x0c", b"\r"])
EOL = pick([b"\r\n"], [b"\n", b"\r", b"\r\r\n", b"\n\r"])


@st.composite
def header_lines(draw: st.DrawFn) -> bytes:
    name = draw(pick(NAMES, BAD_NAMES))
    colon = draw(pick([b":"], [b" :", b"", b"::", b"\t:"]))
    value = draw(pick(VALUES, BAD_VALUES))
    line = name + colon + draw(SPACE) + value + draw(SPACE) + draw(EOL)
    if draw(st.integers(0, 15)) == 0:  # obs-fold: a continuation line
        line += draw(st.sampled_from([b" ", b"\t", b"  \t"])) + draw(st.sampled_from(VALUES)) + draw(EOL)
    return line


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    method = draw(pick(METHODS, BAD_METHODS))
    target = draw(pick(TARGETS, BAD_TARGETS))
    version = draw(pick(VERSIONS, ODD_VERSIONS))
    sp1, sp2 = (draw(pick([b" "], [b"  ", b"\t", b""])) for _ in range(2))
    lines = draw(st.lists(header_lines(), max_size=8))
    if draw(st.integers(0, 4)):  # most requests do carry a Host
        lines.insert(draw(st.integers(0, len(lines))), b"Host: h" + draw(EOL))
    prefix = draw(pick([b""], [b"\r\n", b"\n", b" "]))
    return prefix + method + sp1 + target + sp2 + version + draw(EOL) + b"".join(lines) + draw(EOL)


@st.composite
def common_heads(draw: st.DrawFn) -> bytes:
    """The shapes the fast path must take itself (h11 accepts every one of them)."""
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from(VERSIONS))
    names = [n for n in NAMES if n.lower() not in (b"host", b"content-length", b"transfer-encoding")]
    values = st.sampled_from([v for v in VALUES if v.strip(b" \t") == v])
    lines = [
        name + b":" + draw(st.sampled_from([b"", b" ", b"\t", b"  "])) + value + draw(st.sampled_from([b"", b" \t"]))
        for name, value in draw(st.lists(st.tuples(st.sampled_from(names), values), max_size=20))
    ]
    if version == b"HTTP/1.1" or draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(NAMES[:3])) + b": 127.0.0.1:4000")
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from([b"Content-Length", b"content-length"])) + b": 73")
    return method + b" " + target + b" " + version + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads())
@example(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
@example(b"GET / HTTP/1.1\n\n")  # bare LF, no Host: h11's 400
@example(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n")  # h11's 501
@example(b"POST / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n")  # obs-fold
def test_the_parser_agrees_with_h11_on_generated_heads(wire: bytes) -> None:
    data = one_head(wire)
    if data is not None:
        check(data)


@settings(max_examples=1000, deadline=None)
@given(common_heads())
def test_the_common_shapes_take_the_fast_path_and_agree_with_h11(data: bytes) -> None:
    fast = fast_request_head(data)
    assert fast is not None, data
    assert ("ok", fields_of(fast)) == by_h11(data)


# -- what the official clients send ---------------------------------------------------------

# Captured from the Python SDK 2.16.0 (messages.create), curl 7.88.1 and the TypeScript SDK
# 1.13.0, each pointed at a socket that recorded its head.
PYTHON_SDK = (
    b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:43943\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\nx-stainless-timeout: 600\r\nx-stainless-retry-count: 0\r\n"
    b"x-stainless-read-timeout: 600\r\nAccept: application/json\r\nContent-Type: application/json\r\n"
    b"User-Agent: Anthropic/Python 2.16.0\r\nX-Stainless-Lang: python\r\nX-Stainless-Package-Version: 2.16.0\r\n"
    b"X-Stainless-OS: Linux\r\nX-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\n"
    b"X-Stainless-Runtime-Version: 3.11.7\r\nAuthorization: Bearer sk-ant-test\r\nX-Stainless-Async: false\r\n"
    b"anthropic-version: 2026-10-21\r\nContent-Length: 73\r\n\r\n"
)
CURL = (
    b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:43943\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n"
    b"x-api-key: sk-ant-test\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
    b"Content-Length: 73\r\n\r\n"
)
TYPESCRIPT_SDK = (
    b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1:43943\r\nconnection: keep-alive\r\nAccept: application/json\r\n"
    b"User-Agent: Anthropic/JS 1.13.0\r\nX-Stainless-Retry-Count: 0\r\nX-Stainless-Timeout: 600\r\n"
    b"X-Stainless-Lang: js\r\nX-Stainless-Package-Version: 1.13.0\r\nX-Stainless-OS: Linux\r\n"
    b"X-Stainless-Arch: x64\r\nX-Stainless-Runtime: node\r\nX-Stainless-Runtime-Version: v20.20.2\r\n"
    b"anthropic-version: 2026-10-21\r\nauthorization: Bearer sk-ant-test\r\ncontent-type: application/json\r\n"
    b"accept-language: *\r\nsec-fetch-mode: cors\r\naccept-encoding: gzip, deflate\r\ncontent-length: 73\r\n\r\n"
)
CLIENT_HEADS = {
    "python sdk": PYTHON_SDK,
    "python sdk, x-api-key": PYTHON_SDK.replace(b"Authorization: Bearer", b"X-Api-Key:"),
    "python sdk, streaming": PYTHON_SDK.replace(b"Accept: application/json", b"Accept: text/event-stream").replace(
        b"X-Stainless-Async: false\r\n", b"X-Stainless-Async: false\r\nx-stainless-helper-method: stream\r\n"
    ),
    "curl": CURL,
    "curl, a large body": CURL.replace(
        b"Content-Length: 73\r\n", b"Content-Length: 2000000\r\nExpect: 100-continue\r\n"
    ),
    "typescript sdk": TYPESCRIPT_SDK,
}


@pytest.mark.parametrize("data", CLIENT_HEADS.values(), ids=CLIENT_HEADS.keys())
def test_what_the_official_clients_send_takes_the_fast_path(data: bytes) -> None:
    fast = fast_request_head(data)
    assert fast is not None
    assert ("ok", fields_of(fast)) == by_h11(data)
    assert fast.method == b"POST" and fast.http_version == b"1.1"
    assert fast.expects_continue == (b"Expect: 100-continue" in data)


# -- what h11 accepts and the fast path leaves to it ----------------------------------------

LEFT_TO_H11 = {
    "bare LF": b"GET / HTTP/1.1\nHost: h\n\n",
    "a bare LF ends one line": b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n",
    "HTTP/2.0 (then a 505)": b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
    "HTTP/0.9 (then a 505)": b"GET / HTTP/0.9\r\n\r\n",
    "a list Content-Length": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n",
    "a repeated Content-Length": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    "Transfer-Encoding: chunked": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n",
}


@pytest.mark.parametrize("data", LEFT_TO_H11.values(), ids=LEFT_TO_H11.keys())
def test_what_the_fast_path_leaves_to_h11_is_parsed_by_h11(data: bytes) -> None:
    assert fast_request_head(data) is None
    expected = by_h11(data)
    assert expected[0] == "ok"
    assert by_us(data) == expected


REFUSED = {
    "no Host on HTTP/1.1": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two Hosts": (b"GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n", 400),
    "conflicting lengths": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    "a length too long": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: " + b"1" * 21 + b"\r\n\r\n", 400),
    "a transfer coding h11 does not know": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "two Transfer-Encodings": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        501,
    ),
    "a space before the colon": (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    "a NUL in a value": (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
    "a fold first": (b"GET / HTTP/1.1\r\n x\r\nHost: h\r\n\r\n", 400),
    "a space in the target": (b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
}


@pytest.mark.parametrize(("data", "status"), REFUSED.values(), ids=REFUSED.keys())
def test_what_h11_refuses_is_refused_with_its_status(data: bytes, status: int) -> None:
    assert fast_request_head(data) is None
    with pytest.raises(h11.RemoteProtocolError) as refused:
        parse_request_head(data)
    assert refused.value.error_status_hint == status
    assert by_h11(data) == ("error", status)


def test_expect_100_continue_as_h11_reads_it() -> None:
    base = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
    for expect, waits in [
        (b"Expect: 100-continue\r\n", True),
        (b"expect: 100-CONTINUE\r\n", True),
        (b"Expect: foo, 100-continue\r\n", True),
        (b"Expect: foo\r\nExpect: 100-continue\r\n", True),
        (b"Expect: 100-continue-ish\r\n", False),
        (b"Expect:\r\n", False),
        (b"", False),
    ]:
        for data in (base + expect + b"\r\n", base.replace(b"1.1", b"1.0") + expect + b"\r\n"):
            head = fast_request_head(data)
            assert head is not None
            assert head.expects_continue == (waits and b"1.1" in data)
            check(data)


@pytest.mark.parametrize(
    "template",
    [
        b"G?T / HTTP/1.1\r\nHost: h\r\n\r\n",  # a method byte
        b"GET /? HTTP/1.1\r\nHost: h\r\n\r\n",  # a target byte
        b"GET / HTTP/1.1\r\nHost: h\r\nX-?: a\r\n\r\n",  # a name byte
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a?b\r\n\r\n",  # inside a value
        b"GET / HTTP/1.1\r\nHost: h\r\nX: ?\r\n\r\n",  # a value's only byte
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a?\r\n\r\n",  # a value's last byte
        b"GET / HTTP/1.1\r\nHost: h\r\nX:?a\r\n\r\n",  # a value's first byte
        b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1?\r\n\r\n",  # in a length
    ],
)
def test_every_byte_in_every_place_is_judged_as_h11_judges_it(template: bytes) -> None:
    """Pins the character classes written out from h11's _abnf.py: all 256 bytes, each place."""
    accepted = 0
    for byte in range(256):
        data = one_head(template.replace(b"?", bytes([byte])))
        if data is not None:
            check(data)
            accepted += fast_request_head(data) is not None
    assert accepted >= 10  # the fast path took the plain bytes itself

"""The client side's request heads: a hand-written fast path for the common shape, h11 for the rest.

Why by hand: every request's head is parsed, once per request, on the path to its first
token; h11 spent about 50-60 µs of CPU on it (a ReceiveBuffer, a regex per line,
normalize_and_validate, its state machine) of the ~790 µs a streamed request costs (issue 23),
where this takes about 10 µs for the Python SDK's head (timeit). It accepts only the plain
shape the SDKs and curl send (CRLF lines; `TOKEN SP target SP HTTP/1.1` or `HTTP/1.0`;
`name: value` lines, no obs-fold; at most one all-digits Content-Length; no
Transfer-Encoding; one Host, which HTTP/1.1 requires) and gives exactly the fields h11 gives
for it. Anything else goes to h11, which remains the authority: it parses the head and
raises `h11.RemoteProtocolError` for one it refuses, as it always did.
The two are compared on generated heads and near-misses in tests/test_request_head.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import h11

# h11 0.16's grammar (_abnf.py), written out: `token` for the method and the field names,
# `vchar` for the target; `request_line` narrowed to the two versions served (h11 takes any
# HTTP/d.d). A field value (`field_value`, OWS stripped) may hold any byte but NUL, CR, LF,
# VT and FF (`[^\x00\s]` at its ends, SP and HTAB inside): NUL, VT and FF are looked for in
# the whole head at once, CR and LF only as the line ends, so the value pattern is `[^\r]*`.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/(1\.[01])\r\n")
# One header line, from a line's start (^ in MULTILINE: after a LF, every LF ends a CRLF)
# to its CRLF; the value keeps its trailing OWS (stripped after).
_HEADER_LINE = re.compile(rb"^(" + _TOKEN + rb"):[ \t]*([^\r]*)\r\n", re.MULTILINE)
_DIGITS_MAX = 20  # h11's CONTENT_LENGTH_MAX_DIGITS
_MAX_HEAD = 16 * 1024  # h11's DEFAULT_MAX_INCOMPLETE_EVENT_SIZE (not exported)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head as h11 gives it (`h11.Request` and `they_are_waiting_for_100_continue`)."""

    method: bytes
    target: bytes
    http_version: bytes  # b"1.1", b"1.0", or (from h11 only) another HTTP/d.d
    headers: tuple[tuple[bytes, bytes], ...]  # (lower-cased name, value), in order
    expects_continue: bool  # h11 would say the client waits for `100 Continue`


def parse_request_head(data: bytes, max_incomplete_event_size: int = _MAX_HEAD) -> RequestHead:
    """One whole request head (through its blank line, nothing after it): the fast path,
    else h11. Raises `h11.RemoteProtocolError` (its error_status_hint) for a head h11 refuses."""
    head = fast_request_head(data)
    if head is not None:
        return head
    return h11_request_head(data, max_incomplete_event_size)


def fast_request_head(data: bytes) -> RequestHead | None:
    """The head if it has the common shape and h11 would accept it; None sends it to h11."""
    # NUL, VT, FF looked for by value: `b"\x00" in data` first tries its operand as an int and
    # raises (and formats) a TypeError inside, ~1.8 k instructions a test.
    if not data.endswith(b"\r\n\r\n") or 0 in data or 11 in data or 12 in data:
        return None
    lines = data.count(b"\r\n")  # the request line, the header lines, the blank line
    if data.count(b"\n") != lines:
        return None  # a bare LF (a bare CR fails the patterns: no field or target holds one)
    request_line = _REQUEST_LINE.match(data)
    if request_line is None:
        return None
    # Each match is one whole line, at its start: as many matches as lines, every line matched
    # (a line that is not `name: value`, obs-fold included, starts no match and is missed).
    pairs = _HEADER_LINE.findall(data, request_line.end())
    if len(pairs) != lines - 2:
        return None
    method, target, version = request_line.groups()
    headers = tuple([(name.lower(), value.rstrip(b" \t")) for name, value in pairs])
    names = [name for name, _ in headers]
    hosts = names.count(b"host")
    if hosts != 1 and (hosts or version == b"1.1"):
        return None  # h11 refuses two Host headers, and none on HTTP/1.1
    if b"transfer-encoding" in names:
        return None  # h11 checks it is chunked (or answers 501), once
    if b"content-length" in names:
        # h11 also takes "5, 5" and a repeated equal length (keeping one): not here.
        if names.count(b"content-length") > 1:
            return None
        length = headers[names.index(b"content-length")][1]
        if not length.isdigit() or len(length) > _DIGITS_MAX:  # bytes.isdigit: ASCII 0-9 only
            return None
    expects_continue = False
    if version == b"1.1" and b"expect" in names:  # h11's has_expect_100_continue: 1.1 and later
        for name, value in headers:
            if name == b"expect" and b"100-continue" in [item.strip() for item in value.lower().split(b",")]:
                expects_continue = True
                break
    return RequestHead(method, target, version, headers, expects_continue)


def h11_request_head(data: bytes, max_incomplete_event_size: int = _MAX_HEAD) -> RequestHead:
    """The head as h11 parses it: a fresh connection, one head, its Request event."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
    conn.receive_data(data)
    event = conn.next_event()
    if not isinstance(event, h11.Request):  # cannot happen for a whole head
        raise h11.RemoteProtocolError("incomplete request head")
    return RequestHead(
        bytes(event.method),
        bytes(event.target),
        bytes(event.http_version),
        tuple((bytes(name), bytes(value)) for name, value in event.headers),
        conn.they_are_waiting_for_100_continue,
    )

"""The client side's response heads, framed by hand: the bytes h11 wrote for them, without h11.

Why by hand: h11 re-validated and rebuilt every header of every answer (normalize_and_validate,
a regex per name and value, its state machine per event), a good part of the gateway's CPU per
request. h11 parses only the request heads http/request_head.py leaves to it; what it did with our answers
is written out here, rule for rule (h11 0.16 `_clean_up_response_headers_for_sending`,
`_body_framing`, `_keep_alive`): names are written as given and the framing headers h11 adds
are title-cased as it writes them; `content-length` frames a whole body, `Transfer-Encoding:
chunked` a stream to an HTTP/1.1 client, nothing (the connection closes at the end) a stream
to an HTTP/1.0 one; HEAD, 204 and 304 get the head a GET would have had and no body; every
answer on a connection that will not be reused says `Connection: close`. A name or value
h11 refused (CR, LF, a bad length) is refused here too: it is a bug of ours, not a client's.
Compared with h11 byte for byte in tests/test_framing.py.
"""

from __future__ import annotations

import enum
import functools
import http
import re
from dataclasses import dataclass

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"

# h11's grammar for a header line (RFC 9110 §5.1, §5.5): a token name, a value of visible
# characters (and obs-text) separated by spaces or tabs; one line per header.
_TOKEN = r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VCHAR = r"[^\x00 \t\n\r\f\v]"
_HEADER_LINES = re.compile(rf"(?:{_TOKEN}: (?:{_VCHAR}+(?:[ \t]+{_VCHAR}+)*)?\r\n)*")
_DIGITS = re.compile(r"[0-9]+")


class HeadError(ValueError):
    """A response head h11 would have refused to send (the answer is not written)."""


class Body(enum.Enum):
    """How the body after a head is framed."""

    LENGTH = "length"  # exactly Content-Length bytes follow
    CHUNKED = "chunked"  # chunks, then CHUNKED_END
    UNTIL_CLOSE = "until close"  # the bytes as they are; the connection's close ends them
    NONE = "none"  # no body at all: HEAD, 204, 304


@dataclass(frozen=True, slots=True)
class Asker:
    """What a request says about its answer's framing: h11's view of the client."""

    http_version: bytes | None  # None: no request head was read (an error answer)
    method: bytes
    keep_alive: bool  # HTTP/1.1 or later, and no `close` in its Connection header


NO_REQUEST = Asker(None, b"", True)


def asker_of(http_version: bytes, method: bytes, connection: list[bytes]) -> Asker:
    """The Asker of a parsed request head (`connection`: its Connection header values)."""
    keep_alive = http_version >= b"1.1" and b"close" not in _tokens(connection)
    return Asker(http_version, method, keep_alive)


@dataclass(frozen=True, slots=True)
class Head:
    """A response head ready to write: its bytes, its body's framing, and whether the
    connection may carry another request once the answer is complete."""

    data: bytes
    body: Body
    keep_alive: bool


@functools.lru_cache(maxsize=64)
def status_line(status: int) -> bytes:
    """The status line with the reason phrase CaseDesk has always given h11."""
    if not 200 <= status < 1000:
        raise HeadError(f"a final response's status is 200 to 999, not {status}")
    if status == 529:
        reason = b"Overloaded"  # Anthropic's own status; not in the IANA registry
    else:
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def response_head(status: int, headers: list[tuple[str, str]], asker: Asker) -> Head:
    """The head of a response to `asker` (h11's rules, in its order)."""
    line = status_line(status)
    connection: list[str] = []
    lengths: list[str] = []
    chunked = False
    out: list[tuple[str, str]] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == "connection":
            connection.append(value)
        elif lowered == "content-length":
            value = _length(value, lengths)
            if value == "":
                continue  # the same length again: h11 keeps the first
        elif lowered == "transfer-encoding":
            if chunked or value.lower() != "chunked":
                raise HeadError(f"h11 sends only one Transfer-Encoding: chunked, not {value!r}")
            chunked = True
            value = "chunked"
        out.append((name, value))
    method = b"GET" if asker.method == b"HEAD" else asker.method  # HEAD: the headers of a GET
    bodiless = status in (204, 304) or (method == b"CONNECT" and status < 300)
    need_close = False
    if not bodiless and (chunked or not lengths):  # a body of unknown length
        out = [(n, v) for n, v in out if n.lower() not in ("content-length", "transfer-encoding")]
        if asker.http_version is None or asker.http_version < b"1.1":
            need_close = asker.method != b"HEAD"  # close-delimited; HTTP/1.0 has no chunks
            chunked = False
        else:
            out.append(("Transfer-Encoding", "chunked"))
            chunked = True
        lengths = []
    if not asker.keep_alive or need_close:
        tokens = {token.decode() for token in _tokens([v.encode() for v in connection])}
        tokens.discard("keep-alive")
        tokens.add("close")
        out = [(n, v) for n, v in out if n.lower() != "connection"]
        out.extend(("Connection", token) for token in sorted(tokens))
        connection = ["close"]
    block = "".join([f"{name}: {value}\r\n" for name, value in out])
    if _HEADER_LINES.fullmatch(block) is None or block.count("\n") != len(out):
        raise HeadError(f"a response header h11 would refuse to send: {out!r}")
    try:
        data = line + block.encode("ascii") + b"\r\n"
    except UnicodeEncodeError as exc:
        raise HeadError(f"a response header that is not ASCII: {out!r}") from exc
    if asker.method == b"HEAD" or bodiless:
        body = Body.NONE
    elif chunked:
        body = Body.CHUNKED
    elif lengths:
        body = Body.LENGTH
    else:
        body = Body.UNTIL_CLOSE
    keep_alive = asker.keep_alive and not (connection and b"close" in _tokens([v.encode() for v in connection]))
    return Head(data, body, keep_alive)


@functools.lru_cache(maxsize=256)
def response_head_of(status: int, headers: tuple[tuple[str, str], ...], asker: Asker) -> Head:
    """`response_head` remembered: a gateway sends the same few heads again and again (a
    stream's ~40 k instructions of checks and rendering, each time); a HeadError is not kept."""
    return response_head(status, list(headers), asker)


def _length(value: str, seen: list[str]) -> str:
    """A Content-Length value as h11 writes it ("" for a repeat of the first one)."""
    if value.isascii() and value.isdigit():
        length = value  # ours, always: str(len(body))
    else:
        values = {part.strip() for part in value.split(",")}
        length = values.pop() if len(values) == 1 else ""
    if _DIGITS.fullmatch(length) is None or len(length) > 20:  # h11's CONTENT_LENGTH_MAX_DIGITS
        raise HeadError(f"a bad Content-Length: {value!r}")
    if seen:
        if seen[0] != length:
            raise HeadError("conflicting Content-Length headers")
        return ""
    seen.append(length)
    return length


def _tokens(values: list[bytes]) -> list[bytes]:
    """A comma-separated header's tokens, lower-cased (h11's get_comma_header)."""
    return [token for value in values for part in value.lower().split(b",") if (token := part.strip())]

"""HTTP/1.1 client framing by hand: the request's bytes, the response's head, its body's end.

Why by hand: h11 spent about 74 µs of CPU per upstream request building the request and
parsing the response head, where these take a few µs, and its state machine adds nothing the
pool does not already track (`ConnectionState`). As strict as h11 on what it accepts, with its
grammar (RFC 9112: token names, no whitespace before the colon, bare LF line ends accepted, one
valid Content-Length, only `chunked` as a transfer coding), and stricter in two places: obs-fold
is refused (RFC 9112 §5.2 lets a gateway refuse it) and only HTTP/1.0 and 1.1 are spoken.
Compared with h11 on the same bytes, split at every point, in tests/test_framing.py.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from casedesk.http.chunked import ChunkedDecoder
from casedesk.http.headers import join_headers

MAX_HEAD_BYTES = 64 * 1024  # llama-server's heads are ~250 bytes

_TOKEN = r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_CONTENT = r"[^\x00\s]+(?:[ \t]+[^\x00\s]+)*"  # VCHAR / obs-text, inner SP / HTAB runs
_BLANK_LINE = re.compile(rb"\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: [^\x00\n\r\x0b\x0c]*)?")
_FIELD_LINE = re.compile(f"({_TOKEN}):[ \\t]*({_FIELD_CONTENT})?[ \\t]*".encode())
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,20}")
_METHOD = re.compile(_TOKEN)
_TARGET = re.compile(r"[\x21-\x7e]+")
_FIELD_VALUE = re.compile(f"(?:{_FIELD_CONTENT})?", re.ASCII)


class FramingError(Exception):
    """The upstream broke HTTP/1.1 framing: its answer cannot be read, its socket not reused."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A final (non-1xx) response head; `headers` as join_headers makes them."""

    status: int
    headers: Mapping[str, str]  # (shared by every answer with the same head: read only)
    keep_alive: bool  # HTTP/1.1 and no `Connection: close`
    chunked: bool  # Transfer-Encoding: chunked
    content_length: int | None = None  # the one valid Content-Length, if sent


def request_bytes(
    method: str, target: str, host: str, body: bytes | None, content_type: str = "application/json"
) -> bytes:
    """One request, whole: host and accept, and content-type and content-length with a body.

    The same bytes h11 wrote for it; a value that would break the framing (CR, LF) is a bug
    of ours, refused as h11 refused it.
    """
    if not _frames(method, target, host, content_type if body is not None else "*/*"):
        if not (_METHOD.fullmatch(method) and _TARGET.fullmatch(target) and _FIELD_VALUE.fullmatch(host)):
            raise ValueError(f"cannot frame request {method!r} {target!r} for host {host!r}")
        raise ValueError(f"cannot frame content-type {content_type!r}")
    if body is None:
        return f"{method} {target} HTTP/1.1\r\nhost: {host}\r\naccept: */*\r\n\r\n".encode("ascii")
    head = (
        f"{method} {target} HTTP/1.1\r\nhost: {host}\r\naccept: */*\r\n"
        f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode("ascii")
    return head + body


@functools.lru_cache(maxsize=64)
def _frames(method: str, target: str, host: str, content_type: str) -> bool:
    """These values cannot break a request's framing. A gateway sends a handful of distinct
    requests (chat, tokenize, health…) to a handful of hosts: checked once each, not per call."""
    return bool(
        _METHOD.fullmatch(method)
        and _TARGET.fullmatch(target)
        and _FIELD_VALUE.fullmatch(host)
        and _FIELD_VALUE.fullmatch(content_type)
    )


class HeadParser:
    """Feed the bytes of one response; get its final head and the bytes after it.

    1xx interim heads (100 Continue, 103 Early Hints) are read and dropped, as the pool
    always ignored them; a 101 is an error, since no request of ours asks to switch.
    """

    __slots__ = ("_buf", "_scan_from")

    def __init__(self) -> None:
        self._buf = b""
        self._scan_from = 0

    def feed(self, data: bytes) -> tuple[ResponseHead, bytes] | None:
        """(head, the bytes after it) once the final head is complete; None: need more.
        Raise FramingError."""
        buf = self._buf + data if self._buf else data
        while True:
            if buf[:1] == b"\n" or buf[:2] == b"\r\n":
                raise FramingError("no status line before the empty line")
            match = _BLANK_LINE.search(buf, self._scan_from)
            if match is None:
                if len(buf) >= MAX_HEAD_BYTES:
                    raise FramingError(f"response head larger than {MAX_HEAD_BYTES} bytes")
                self._buf = buf
                self._scan_from = max(0, len(buf) - 2)  # a blank line may end across reads
                return None
            end = match.end()
            if end > MAX_HEAD_BYTES:
                raise FramingError(f"response head larger than {MAX_HEAD_BYTES} bytes")
            head = parse_head(buf[: match.start()])
            buf = buf[end:]
            self._scan_from = 0
            if head is not None:
                self._buf = b""
                return head, buf
            if not buf:  # an interim head alone: the final one is still to come
                self._buf = b""
                return None


@functools.lru_cache(maxsize=32)
def parse_head(block: bytes) -> ResponseHead | None:
    """A head's lines (the status line and fields, without the empty line); None for 1xx.

    llama-server's heads carry no date and no id: its answers' heads repeat byte for byte
    (docs/llama-server-facts.md §4), so each is parsed once (7 µs) and looked up after. A
    refused head raises, and is never remembered."""
    lines = block.split(b"\n")
    status_line = lines[0]
    if status_line[-1:] == b"\r":
        status_line = status_line[:-1]
    status_match = _STATUS_LINE.fullmatch(status_line)
    if status_match is None:
        raise FramingError(f"bad status line {status_line[:80]!r}")
    status = int(status_match[2])
    fields: list[tuple[bytes, bytes]] = []
    content_length: bytes | None = None
    chunked = False
    for line in lines[1:]:
        if line[-1:] == b"\r":
            line = line[:-1]
        field = _FIELD_LINE.fullmatch(line)
        if field is None:
            if line[:1] in (b" ", b"\t"):
                raise FramingError("obsolete line folding in the response head")
            raise FramingError(f"bad header line {line[:80]!r}")
        name = field[1].lower()
        value = field[2] or b""
        if name == b"content-length":
            # RFC 9112 §6.3: several equal values (in one field or many) are one length.
            lengths = {part.strip() for part in value.split(b",")}
            length = lengths.pop()
            if lengths or (content_length is not None and length != content_length):
                raise FramingError("conflicting Content-Length values")
            if not _CONTENT_LENGTH.fullmatch(length):
                raise FramingError(f"bad Content-Length {value[:40]!r}")
            if content_length is not None:
                continue
            content_length = value = length
        elif name == b"transfer-encoding":
            value = value.lower()
            if chunked or value != b"chunked":
                raise FramingError(f"unsupported Transfer-Encoding {value[:40]!r} (only chunked is)")
            chunked = True
        fields.append((name, value))
    if status < 200:
        if status == 101:
            raise FramingError("101 Switching Protocols to a request that asked for no switch")
        return None
    headers = join_headers(fields)
    keep_alive = status_match[1] == b"1.1"
    if keep_alive and "connection" in headers:
        keep_alive = "close" not in [token.strip() for token in headers["connection"].lower().split(",")]
    return ResponseHead(
        status=status,
        headers=headers,
        keep_alive=keep_alive,
        chunked=chunked,
        content_length=None if content_length is None else int(content_length),
    )


class BodyDecoder(Protocol):
    """Raw bytes after the head in, body bytes out; `done` once the body has ended."""

    done: bool

    def feed(self, data: bytes) -> bytes: ...


class LengthDecoder:
    """A Content-Length body. Bytes past its end are not body; `overrun` says some came (the
    connection is then out of step with its requests and must not be reused)."""

    __slots__ = ("_remaining", "done", "overrun")

    def __init__(self, length: int) -> None:
        self._remaining = length
        self.done = length == 0
        self.overrun = False

    def feed(self, data: bytes) -> bytes:
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            return data
        self._remaining = 0
        self.done = True
        if len(data) > remaining:
            self.overrun = True
            return data[:remaining]
        return data


class UntilCloseDecoder:
    """A body with neither length nor chunks (RFC 9112 §6.3 rule 8): it ends with the
    connection, which `close()` says."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes) -> bytes:
        return data

    def close(self) -> None:
        self.done = True


def body_decoder(head: ResponseHead, method: str) -> BodyDecoder:
    """How this response's body ends (RFC 9112 §6.3, in h11's order)."""
    if head.status in (204, 304) or method == "HEAD":
        return LengthDecoder(0)
    if head.chunked:
        return ChunkedDecoder()
    if head.content_length is not None:
        return LengthDecoder(head.content_length)
    return UntilCloseDecoder()

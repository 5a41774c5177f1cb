"""Hand de-framing of a chunked HTTP/1.1 body (RFC 9112 §7.1), strict.

Why by hand: llama-server sends one SSE event per chunk, so this runs once per streamed token,
and h11 spends about 11 µs per chunk where this spends about 1 µs (bench/). The head before
it is upstream/framing.py's. Compared with h11 on the same bytes, split at every possible
point, in tests/test_framing.py.
"""

from __future__ import annotations

import re

_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_MAX_LINE = 4096
_HEX_DIGITS = b"0123456789abcdefABCDEF"
# Every canonical size line (lower-case hex, no extension, no leading zero, its CRLF) up to
# 2 KiB, with its size: one lookup stands for int(line, 16) and the check that the line is
# spelled as llama-server spells it (~200 KB). An answer's opening chunks are stepped through
# with it (upstream/connection.py); translate/fast_delta.py keys its own table the same way. A
# larger chunk (a text delta is ~300 bytes) is left to ChunkedDecoder.
CHUNK_SIZES = {b"%x\r\n" % size: size for size in range(1, 2049)}


class ChunkedError(Exception):
    """The peer broke chunked framing: the connection cannot be trusted or reused."""


class ChunkedDecoder:
    """Feed raw bytes, get body bytes; `done` once the last chunk and trailers are read."""

    __slots__ = ("_buf", "_remaining", "_state", "done")

    # states
    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._buf = b""
        self._remaining = 0
        self._state = self._SIZE
        self.done = False

    @property
    def between_chunks(self) -> bool:
        """The next byte fed starts a chunk's size line (nothing held, the body not over)."""
        return not self._buf and self._state == self._SIZE and not self.done

    def feed(self, data: bytes) -> bytes:
        """Return the body bytes contained in `data` (possibly b""). Raise ChunkedError."""
        if self.done:
            if data:
                raise ChunkedError("bytes after the end of the chunked body")
            return b""
        if not self._buf and self._state == self._SIZE:
            # Fast path: `data` is exactly one whole chunk, as llama-server writes them.
            end = data.find(b"\r\n", 0, _MAX_LINE)
            if end > 0:
                size = _size(data[:end])
                start = end + 2
                if size and len(data) == start + size + 2 and data.endswith(b"\r\n"):
                    return data[start : start + size]
        return self._feed_slow(data)

    def _feed_slow(self, data: bytes) -> bytes:
        # Several chunks in one read (a fast model, or a reader that fell behind: hundreds),
        # or a chunk split across reads. A chunk that is here whole, with its CRLF, is taken in
        # one step; the states are for the pieces that are not.
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while pos < n:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if n - pos > _MAX_LINE:
                    raise ChunkedError("chunk line too long")
                break
            line = buf[pos:end]
            pos = end + 2
            if state == self._SIZE:
                size = _size(line)
                if size == 0:
                    self._state = self._TRAILER
                    continue
                stop = pos + size
                if stop + 2 <= n:  # the whole chunk is here
                    if buf[stop : stop + 2] != b"\r\n":
                        raise ChunkedError("chunk data longer than its declared size")
                    out.append(buf[pos:stop])
                    pos = stop + 2
                    continue
                self._remaining = size
                self._state = self._DATA
            elif state == self._DATA_END:
                if line:
                    raise ChunkedError("chunk data longer than its declared size")
                self._state = self._SIZE
            else:  # trailers end with an empty line
                if not line:
                    self.done = True
                    if pos != n:
                        raise ChunkedError("bytes after the end of the chunked body")
                    break
        self._buf = buf[pos:] if pos < n else b""
        if len(out) == 1:
            return out[0]
        return b"".join(out)


def _size(line: bytes) -> int:
    if 0 < len(line) <= 16 and not line.strip(_HEX_DIGITS):
        return int(line, 16)  # hex digits only, as every server writes it: no regex needed
    match = _SIZE_LINE.fullmatch(line)
    if match is None:
        raise ChunkedError(f"bad chunk size line {line[:40]!r}")
    return int(match.group(1), 16)

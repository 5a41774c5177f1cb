"""A client's chunked request body (RFC 9112 §7.1), read into one buffer in bounded steps.

h11 makes one `Data` event per chunk: a body of two million 1-byte chunks became two million
objects held until the body ended (about 50 bytes of memory per body byte) and seconds of
the event loop spent on them. This reader appends every chunk's bytes to one bytearray,
keeps no per-chunk object, and parses at most `budget` chunk lines per call, so the
connection can give the loop back between steps. Only the client side uses it: the
upstream side (http/chunked.py) is tuned for one whole chunk per read instead.
"""

from __future__ import annotations

import enum
import re

_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_MAX_LINE = 4096  # a chunk-size line, extensions included
_MAX_TRAILERS = 64 * 1024
_HEX_DIGITS = b"0123456789abcdefABCDEF"


class BodyError(Exception):
    """The body cannot be read: `status` is the answer (400 malformed, 413 too large)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Progress(enum.Enum):
    NEED_DATA = "need data"  # everything given was read; the body goes on
    BUDGET_SPENT = "budget spent"  # stopped early: call step() again (after yielding)
    DONE = "done"  # the last chunk and the trailers were read; `leftover()` follows them


class _State(enum.Enum):
    SIZE = 1
    DATA = 2
    DATA_END = 3
    TRAILERS = 4
    DONE = 5


class ChunkedBodyReader:
    """Feed wire bytes with `feed`, run `step` until DONE; the body is in `body`."""

    __slots__ = ("body", "_wire", "_pos", "_remaining", "_state", "_limit", "_trailer_bytes")

    def __init__(self, limit: int) -> None:
        self.body = bytearray()
        self._wire = bytearray()
        self._pos = 0
        self._remaining = 0
        self._state = _State.SIZE
        self._limit = limit
        self._trailer_bytes = 0

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos and self._pos * 2 >= len(self._wire):
            del self._wire[: self._pos]  # compact once most of the buffer is read
            self._pos = 0
        self._wire += data

    def leftover(self) -> bytes:
        """The bytes after the body (a pipelined request), once DONE."""
        rest = bytes(self._wire[self._pos :])
        self._wire = bytearray()
        self._pos = 0
        return rest

    def step(self, budget: int) -> Progress:
        """Read what was fed, parsing at most `budget` chunk-size or trailer lines. Raise BodyError."""
        if self._state is _State.DONE:
            return Progress.DONE
        wire = self._wire
        end = len(wire)
        pos = self._pos
        state: _State = self._state
        try:
            while pos < end:
                if state is _State.DATA:
                    take = min(self._remaining, end - pos)
                    self.body += wire[pos : pos + take]
                    pos += take
                    self._remaining -= take
                    if self._remaining:
                        break
                    state = _State.DATA_END
                if state is _State.DATA_END:
                    if end - pos < 2:
                        break
                    if wire[pos] != 13 or wire[pos + 1] != 10:
                        raise BodyError(400, "malformed chunked body: chunk data longer than its size")
                    pos += 2
                    state = _State.SIZE
                    continue
                if budget <= 0:
                    return Progress.BUDGET_SPENT
                budget -= 1
                eol = wire.find(b"\r\n", pos, pos + _MAX_LINE + 2)
                if eol < 0:
                    if end - pos > _MAX_LINE:
                        raise BodyError(400, "malformed chunked body: a chunk line is too long")
                    break
                line = wire[pos:eol]
                pos = eol + 2
                if state is _State.SIZE:
                    size = _chunk_size(line)
                    if size == 0:
                        state = _State.TRAILERS
                        continue
                    if len(self.body) + size > self._limit:
                        raise BodyError(413, f"request body is larger than the limit of {self._limit} bytes")
                    after = pos + size
                    if after + 2 <= end and wire[after] == 13 and wire[after + 1] == 10:
                        self.body += wire[pos:after]  # the whole chunk is here: the common case
                        pos = after + 2
                    else:
                        self._remaining = size
                        state = _State.DATA
                else:  # trailers: ignored (RFC 9110 §6.5.1 lets a recipient drop them), bounded
                    self._trailer_bytes += len(line) + 2
                    if self._trailer_bytes > _MAX_TRAILERS:
                        raise BodyError(400, "malformed chunked body: trailers too large")
                    if not line:
                        state = _State.DONE
                        return Progress.DONE
            return Progress.NEED_DATA
        finally:
            self._pos = pos
            self._state = state


def _chunk_size(line: bytearray) -> int:
    if 0 < len(line) <= 16 and not line.translate(None, _HEX_DIGITS):
        return int(line, 16)  # the common case: digits only (int() alone would allow "0x", "_", "+")
    match = _SIZE_LINE.fullmatch(line)
    if match is None:
        raise BodyError(400, f"malformed chunked body: bad chunk size line {bytes(line[:40])!r}")
    return int(match.group(1), 16)

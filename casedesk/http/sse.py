"""Server-sent events: encoding our events and splitting llama-server's stream into payloads.

Both run once per token, so both are written for the common case: llama-server puts exactly
one `data: {json}\\n\\n` event in each chunk, and we write one event (or a few joined) per
transport.write.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

MAX_EVENT_BYTES = 1024 * 1024


def encode_event(name: bytes, payload: object) -> bytes:
    """`event: NAME\\ndata: JSON\\n\\n` for an arbitrary payload (not the per-token path)."""
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _ignore(payload: bytes) -> None:
    pass


class SseDecoder:
    """Feed body bytes; calls `on_data(payload)` for each `data:` event, in order.

    `on_error(payload)` gets llama-server's `error:` events. Events may span feeds and a feed
    may hold several events. Lines may end in CRLF, LF or CR, in any mix; comments and other
    fields are skipped (the SSE spec, "Interpreting an event stream").

    An event still unfinished after `max_event_bytes` is a broken stream, not a long wait:
    `on_error` then gets a plain-text complaint, once, and the decoder ignores the rest.
    """

    __slots__ = ("_buf", "_on_data", "_on_error", "_max")

    def __init__(
        self,
        on_data: Callable[[bytes], None],
        on_error: Callable[[bytes], None],
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        # The unfinished event, its line endings made LF. A trailing CR marks a CR that ended
        # the last feed: it already counts as a line ending, so a LF next belongs to it.
        self._buf = b""
        self._on_data = on_data
        self._on_error = on_error
        self._max = max_event_bytes

    @property
    def idle(self) -> bool:
        """No event is half read: the next byte fed starts an event."""
        return not self._buf and self._on_data is not _ignore

    def feed(self, data: bytes) -> None:
        if (
            not self._buf
            and data.startswith(b"data: ")
            and data.find(b"\n", 6) == len(data) - 2
            and data[-1] == 10
            and 13 not in data  # CR, by value (a bytes operand costs an exception inside `in`)
        ):
            # Fast path: exactly one single-line event, llama-server's `data: {json}\n\n`.
            self._on_data(data[6:-2])
            return
        buf = self._buf
        if buf:
            if buf[-1] == 13:
                buf = buf[:-1]
                if data[:1] == b"\n":
                    data = data[1:]
            buf += data
        else:
            buf = data
        ends_in_cr = False
        if 13 in buf:  # CR
            ends_in_cr = buf[-1] == 13
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            if buf.startswith(b"data: ", start) and buf.find(b"\n", start, end) < 0:
                self._on_data(buf[start + 6 : end])  # a single-line data event, the usual case
            else:
                self._event(buf[start:end])
            start = end + 2
        rest = buf[start:]
        if len(rest) > self._max:
            self._overflow()
            return
        self._buf = rest + b"\r" if ends_in_cr else rest

    def _event(self, block: bytes) -> None:
        data_lines: list[bytes] = []
        field_name = b""
        for line in block.split(b"\n"):
            if not line or line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name in (b"data", b"error"):
                field_name = name
                data_lines.append(value)
        if not data_lines:
            return
        payload = b"\n".join(data_lines)
        if field_name == b"error":
            self._on_error(payload)
        else:
            self._on_data(payload)

    def close(self) -> None:
        """Let go of the callbacks (their owner usually holds this decoder: a cycle otherwise,
        and the request's objects would wait for the garbage collector); later feeds are ignored."""
        self._buf = b""
        self._on_data = self._on_error = _ignore

    def _overflow(self) -> None:
        on_error = self._on_error
        self._buf = b""
        self._on_data = self._on_error = _ignore
        on_error(b"an SSE event larger than %d bytes (no blank line ends it)" % self._max)

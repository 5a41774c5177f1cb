"""Server-sent events: encoding our events and splitting llama-server's stream into payloads.

Both run once per token, so both are written for the common case: llama-server puts exactly
one `data: {json}\\n\\n` event in each chunk, and we write one event (or a few joined) per
transport.write.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson


def encode_event(name: bytes, payload: object) -> bytes:
    """`event: NAME\\ndata: JSON\\n\\n` for an arbitrary payload (not the per-token path)."""
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class SseDecoder:
    """Feed body bytes; calls `on_data(payload)` for each `data:` event, in order.

    `on_error(payload)` gets llama-server's `error:` events. Events may span feeds and a feed
    may hold several events. Comments and other fields are skipped, as the SSE spec says.
    """

    __slots__ = ("_buf", "_on_data", "_on_error")

    def __init__(self, on_data: Callable[[bytes], None], on_error: Callable[[bytes], None]) -> None:
        self._buf = b""
        self._on_data = on_data
        self._on_error = on_error

    def feed(self, data: bytes) -> None:
        if not self._buf and data.startswith(b"data: ") and data.find(b"\n", 6) == len(data) - 2:
            # Fast path: exactly one single-line event.
            self._on_data(data[6:-2])
            return
        buf = self._buf + data if self._buf else data
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
        self._buf = buf[start:]

    def _event(self, block: bytes) -> None:
        data_lines: list[bytes] = []
        field_name = b""
        for line in block.replace(b"\r\n", b"\n").split(b"\n"):
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

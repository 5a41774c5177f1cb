"""Keep-alive bytes for a streamed response that has nothing to say yet.

Proxies and load balancers cut a connection that stays silent too long (nginx's
`proxy_read_timeout` and most cloud load balancers: 60 s), and a streamed request may wait
longer than that for its first event: in a queue, behind llama-server's busy slots (it sends
no response head at all until a slot is free: docs/llama-server-facts.md §4), during a long
prefill, while a model loads. `StreamKeepAlive` watches one response: the first time it
finds nothing written it commits the 200 `text/event-stream` head, and whenever nothing was
written since its last look it writes an SSE comment line, which every SSE parser skips
(the Anthropic SDKs' decoders drop lines that start with ":"). So a stream is never silent
for as long as two intervals, and an error that comes within the first interval is still a
real HTTP status.

It costs nothing per token: a timer compares the writer's byte count, no write is stamped.
"""

from __future__ import annotations

import asyncio

from casedesk.http.server import ResponseWriter

COMMENT = b": keep-alive\n\n"
# The head of every event stream: nginx buffers a proxied response unless told not to, and
# would hold back the very bytes that keep the connection alive (llama-server sends it too).
STREAM_HEADERS = (("x-accel-buffering", "no"),)


class StreamKeepAlive:
    __slots__ = ("_writer", "_interval", "_seen", "_loop", "_handle")

    def __init__(self, writer: ResponseWriter, interval: float) -> None:
        self._writer = writer
        self._interval = interval
        self._seen = -1
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        writer = self._writer
        if writer.finished or writer.disconnected:
            self._handle = None
            return
        if not writer.started:
            writer.start_stream(headers=STREAM_HEADERS)
            writer.write(COMMENT)
        elif writer.bytes_written == self._seen:
            writer.write(COMMENT)
        self._seen = writer.bytes_written
        self._handle = self._loop.call_later(self._interval, self._tick)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

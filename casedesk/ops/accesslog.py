"""The access log: one JSON line per request, to stdout or a file.

Never keys or message contents: only what an operator needs to follow traffic and costs.
The lines go through a LineSink (ops/logsink.py): a reader that stalls never blocks the
gateway, it loses lines instead (counted). Values a client chose (the model name, the path)
are cut and escaped (`printable`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import orjson

from casedesk.ops.logsink import LineSink, printable


@dataclass(slots=True)
class RequestRecord:
    """Filled in as a request goes; written once when it ends."""

    request_id: str
    method: str
    path: str
    client: str
    started: float  # time.monotonic()
    deployment: str = ""
    model: str = ""  # the name the client asked for
    tag: str = ""  # the deployment's model tag it resolved to ("" if none)
    stream: bool = False
    status: int = 0
    input_tokens: int = 0  # prompt tokens, the cached ones included
    cached_tokens: int = 0  # of which served from llama-server's prompt cache
    output_tokens: int = 0
    ttft: float | None = None  # seconds from the request to its first token
    upstream: str = ""
    repaired_tool_calls: int = 0  # tool calls read from JSON text (translate/repair.py; issue 19)
    tenant: str = ""  # issue 17: the tenant it was accounted to ("" anonymous)
    limit: str = ""  # issue 17: the bucket that refused it with a 429 ("requests", …)
    # A Message Batches item (issue 18): its batch and custom_id; "" for every other request.
    batch_id: str = ""
    custom_id: str = ""

    def line(self, now: float, wall: str | None = None) -> bytes:
        """The JSON line; `wall`: the time to log, RFC 3339 in UTC to the millisecond (now's by default)."""
        batch = {"batch_id": self.batch_id, "custom_id": self.custom_id} if self.batch_id else {}
        return (
            orjson.dumps(
                {
                    "time": wall or WallClock().now(),
                    "request_id": self.request_id,
                    "method": printable(self.method, 32),
                    "path": printable(self.path, 1024),
                    "deployment": printable(self.deployment),
                    "model": printable(self.model),
                    "tag": self.tag,
                    "status": self.status,
                    "stream": self.stream,
                    "input_tokens": self.input_tokens,
                    "cached_tokens": self.cached_tokens,
                    "output_tokens": self.output_tokens,
                    "ttft_ms": round(self.ttft * 1000, 2) if self.ttft is not None else None,
                    "duration_ms": round((now - self.started) * 1000, 2),
                    "upstream": self.upstream,
                    "client": printable(self.client),
                    "tenant": self.tenant,
                    **batch,
                }
            )
            + b"\n"
        )


class WallClock:
    """The time as the access log writes it (2026-12-03T08:21:16.783Z), its seconds formatted
    once a second: datetime's isoformat was ~13 k instructions a request."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"


class AccessLog:
    """Where the lines go: "-" for stdout, a path to append to, or "" for nowhere."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._clock = WallClock()
        self._fd = -1
        self._sink: LineSink | None = None
        if target == "-":
            self._fd = os.dup(_stdout_fd())  # our own descriptor: no lock shared with print()
        elif target:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if self._fd >= 0:
            self._sink = LineSink(self._fd, "access log")

    @property
    def dropped(self) -> int:
        """Lines lost to a reader that did not keep up (or a failed write)."""
        return self._sink.dropped if self._sink is not None else 0

    def write(self, record: RequestRecord) -> None:
        if self._sink is not None:
            self._sink.write(record.line(time.monotonic(), self._clock.now()))

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            os.close(self._fd)
            self._sink, self._fd = None, -1


def _stdout_fd() -> int:
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without one (a test's capture)
        return 1

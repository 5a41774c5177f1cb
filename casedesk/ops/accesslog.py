"""The access log: one JSON line per request, to stdout or a file.

Never keys or message contents: only what an operator needs to follow traffic and costs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO

import orjson


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

    def line(self, now: float) -> bytes:
        batch = {"batch_id": self.batch_id, "custom_id": self.custom_id} if self.batch_id else {}
        return (
            orjson.dumps(
                {
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "request_id": self.request_id,
                    "method": self.method,
                    "path": self.path,
                    "deployment": self.deployment,
                    "model": self.model,
                    "tag": self.tag,
                    "status": self.status,
                    "stream": self.stream,
                    "input_tokens": self.input_tokens,
                    "cached_tokens": self.cached_tokens,
                    "output_tokens": self.output_tokens,
                    "ttft_ms": round(self.ttft * 1000, 2) if self.ttft is not None else None,
                    "duration_ms": round((now - self.started) * 1000, 2),
                    "upstream": self.upstream,
                    "client": self.client,
                    "tenant": self.tenant,
                    **batch,
                }
            )
            + b"\n"
        )


class AccessLog:
    """Where the lines go: "-" for stdout, a path to append to, or "" for nowhere."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._file: IO[bytes] | None = None
        if target == "-":
            self._file = sys.stdout.buffer
        elif target:
            self._file = open(target, "ab", buffering=0)  # noqa: SIM115 (kept open for the process)

    def write(self, record: RequestRecord) -> None:
        if self._file is not None:
            self._file.write(record.line(time.monotonic()))
            if self.target == "-":
                self._file.flush()

    def close(self) -> None:
        if self._file is not None and self.target not in ("", "-"):
            self._file.close()

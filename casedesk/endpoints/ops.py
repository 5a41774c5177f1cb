"""GET /metrics (Prometheus text format) and GET /readyz (200 only when every deployment
has a healthy upstream or an on-demand model that can start, and no managed model failed to
start), for the operators of the box."""

from __future__ import annotations

from collections.abc import Callable

from casedesk.anthropic.errors import ApiError
from casedesk.http.server import Request, ResponseWriter
from casedesk.ops.accesslog import RequestRecord
from casedesk.ops.metrics import Metrics


async def handle_metrics(metrics: Metrics, request: Request, writer: ResponseWriter, record: RequestRecord) -> None:
    writer.send(200, metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")


async def handle_readyz(
    not_ready: Callable[[], str | None], request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    """`not_ready()`: why the gateway cannot serve (None: it can)."""
    problem = not_ready()
    if problem is not None:
        raise ApiError(503, f"not ready: {problem}")
    writer.send(200, b'{"status":"ready"}')

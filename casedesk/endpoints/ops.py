"""GET /metrics (Prometheus text format) and GET /readyz (200 only when every deployment
has a healthy upstream or an on-demand model that can start, and no managed model failed to
start), for the operators of the box."""

from __future__ import annotations

from typing import TYPE_CHECKING

from casedesk.anthropic.errors import ApiError
from casedesk.http.server import Request, ResponseWriter

if TYPE_CHECKING:
    from casedesk.app import Gateway


async def handle_metrics(gateway: Gateway, request: Request, writer: ResponseWriter) -> None:
    writer.send(200, gateway.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")


async def handle_readyz(gateway: Gateway, request: Request, writer: ResponseWriter) -> None:
    problem = gateway.not_ready()
    if problem is not None:
        raise ApiError(503, f"not ready: {problem}")
    writer.send(200, b'{"status":"ready"}')

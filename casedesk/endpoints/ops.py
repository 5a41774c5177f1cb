"""GET /metrics (Prometheus text format) and GET /readyz (200 only when every deployment
has a healthy upstream or an on-demand model that can start, and no managed model failed to
start), for the operators of the box.

On [server] ops_listen they show everything. Without it they are on the main listener, which
anyone who reaches the gateway can ask: there a deployment that requires a key is shown only
to a request carrying one of its keys (its id, tags and upstream addresses are for its key
holders; a Prometheus scrape can send one as a bearer token): no series of it, and /readyz
does not name it. app.py decides, per request, which deployments are hidden.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from casedesk.anthropic.errors import ApiError
from casedesk.http.server import Request, ResponseWriter
from casedesk.ops.accesslog import RequestRecord
from casedesk.ops.metrics import Metrics


async def handle_metrics(
    metrics: Metrics,
    hidden_from: Callable[[dict[str, str]], frozenset[str]],
    request: Request,
    writer: ResponseWriter,
    record: RequestRecord,
) -> None:
    """`hidden_from(headers)`: the deployments whose series this request may not see."""
    text = metrics.render()
    hidden = hidden_from(request.headers)
    if hidden:
        text = without_deployments(text, hidden)
    writer.send(200, text, content_type="text/plain; version=0.0.4; charset=utf-8")


def without_deployments(text: bytes, hidden: frozenset[str]) -> bytes:
    """The exposition minus every sample labelled with one of `hidden`'s deployments. A label
    value's quotes are always escaped, so `deployment="X"` after `{` or `,` is a label."""
    names = b"|".join(re.escape(name.encode()) for name in sorted(hidden))
    label = re.compile(rb'[{,]deployment="(?:' + names + rb')"')
    return b"\n".join(line for line in text.split(b"\n") if not label.search(line))


async def handle_readyz(
    not_ready: Callable[[dict[str, str]], str | None], request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    """`not_ready(headers)`: why the gateway cannot serve (None: it can), as far as this
    request may learn."""
    problem = not_ready(request.headers)
    if problem is not None:
        raise ApiError(503, f"not ready: {problem}")
    writer.send(200, b'{"status":"ready"}')

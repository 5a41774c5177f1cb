"""GET …/v1/models and …/v1/models/{id}: a deployment's model tags in the Anthropic shape,
so `client.models.list()` and `client.models.retrieve()` work. HEAD probes and /healthz too.

Each model carries its real limits, as Anthropic's Models API does: `max_input_tokens` is one
llama-server slot's context window and `max_tokens` the most it can generate, the same
window (answering/model_facts.py); both are left out when nothing says.
"""

from __future__ import annotations

from typing import Any

import orjson

from casedesk.answering.model_facts import context_window
from casedesk.http.server import Request, ResponseWriter
from casedesk.ops.accesslog import RequestRecord
from casedesk.serving import DeploymentState

FACTS_TIMEOUT = 5.0  # seconds for a /props answer: a listing never waits on a busy upstream long


async def _model_object(deployment: DeploymentState, tag: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "model", "id": tag, "display_name": tag, "created_at": deployment.started_at}
    window = await context_window(deployment.models[tag], min(FACTS_TIMEOUT, deployment.settings.upstream_read_timeout))
    if window is not None:
        entry["max_input_tokens"] = window
        entry["max_tokens"] = window
    return entry


async def handle_list_models(
    deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    record.tenant = deployment.authorize(request.headers, request.client)
    data = [await _model_object(deployment, tag) for tag in deployment.models]
    writer.send(
        200,
        orjson.dumps(
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        ),
    )


async def handle_get_model(
    deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord, model: str
) -> None:
    record.tenant = deployment.authorize(request.headers, request.client)
    # An alias answers with the tag it means, as Anthropic's API answers an alias with its model.
    writer.send(200, orjson.dumps(await _model_object(deployment, deployment.model(model).tag)))


async def handle_head_probe(
    deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    """Agents probe the base URL with HEAD: 200, no body, for a known deployment (and, for
    one that requires a key, only with the key: the probe must not tell that it exists)."""
    deployment.authorize(request.headers)
    writer.send(200, b"")


async def handle_healthz(request: Request, writer: ResponseWriter, record: RequestRecord) -> None:
    writer.send(200, b'{"status":"ok"}')

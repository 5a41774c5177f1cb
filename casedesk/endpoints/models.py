"""GET …/v1/models and …/v1/models/{id}: a deployment's model tags in the Anthropic shape,
so `client.models.list()` and `client.models.retrieve()` work. HEAD probes and /healthz too."""

from __future__ import annotations

from typing import Any

import orjson

from casedesk.http.server import Request, ResponseWriter
from casedesk.ops.accesslog import RequestRecord
from casedesk.serving import DeploymentState


def _model_object(deployment: DeploymentState, tag: str) -> dict[str, Any]:
    return {"type": "model", "id": tag, "display_name": tag, "created_at": deployment.started_at}


async def handle_list_models(
    deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    deployment.authorize(request.headers)
    data = [_model_object(deployment, tag) for tag in deployment.models]
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
    deployment.authorize(request.headers)
    # An alias answers with the tag it means, as Anthropic's API answers an alias with its model.
    writer.send(200, orjson.dumps(_model_object(deployment, deployment.model(model).tag)))


async def handle_head_probe(
    deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    """Agents probe the base URL with HEAD: 200, no body, for a known deployment (and, for
    one that requires a key, only with the key: the probe must not tell that it exists)."""
    deployment.authorize(request.headers)
    writer.send(200, b"")


async def handle_healthz(request: Request, writer: ResponseWriter, record: RequestRecord) -> None:
    writer.send(200, b'{"status":"ok"}')

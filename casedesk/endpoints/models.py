"""GET …/v1/models and …/v1/models/{id}: a deployment's model tags in the Anthropic shape,
so `client.models.list()` and `client.models.retrieve()` work. HEAD probes and /healthz too."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from casedesk.http.server import Request, ResponseWriter

if TYPE_CHECKING:
    from casedesk.app import Gateway


def _model_object(gateway: Gateway, tag: str) -> dict[str, Any]:
    return {"type": "model", "id": tag, "display_name": tag, "created_at": gateway.started_at}


async def handle_list_models(gateway: Gateway, request: Request, writer: ResponseWriter, deployment: str) -> None:
    route = gateway.deployment(deployment, request)
    route.authorize(request.headers)
    data = [_model_object(gateway, tag) for tag in route.models]
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
    gateway: Gateway, request: Request, writer: ResponseWriter, deployment: str, model: str
) -> None:
    route = gateway.deployment(deployment, request)
    route.authorize(request.headers)
    # An alias answers with the tag it means, as Anthropic's API answers an alias with its model.
    writer.send(200, orjson.dumps(_model_object(gateway, route.model(model).tag)))


async def handle_head_probe(gateway: Gateway, request: Request, writer: ResponseWriter, deployment: str) -> None:
    """Agents probe the base URL with HEAD: 200, no body, for a known deployment."""
    gateway.deployment(deployment, request)
    writer.send(200, b"")


async def handle_healthz(gateway: Gateway, request: Request, writer: ResponseWriter) -> None:
    writer.send(200, b'{"status":"ok"}')

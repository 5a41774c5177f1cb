"""A Messages request body → a checked MessagesRequest, with image URLs fetched when the
gateway fetches them. Large bodies are parsed as answering/work.py says (off the loop, one at
a time); counts no context window could hold are refused before parsing (anthropic/schema.py).
"""

from __future__ import annotations

from casedesk.anthropic.schema import MessagesRequest, parse_messages_request, request_json
from casedesk.answering.work import sized_work
from casedesk.endpoints.image_fetch import inline_image_urls
from casedesk.http.server import Request
from casedesk.serving import DeploymentState


async def parsed_request(deployment: DeploymentState, request: Request, *, count_only: bool = False) -> MessagesRequest:
    """The checked request (a 400 naming the field otherwise); image URLs already fetched
    when the gateway fetches them (endpoints/image_fetch.py), else refused."""
    fetch = deployment.settings.fetch_image_urls
    parsed = await sized_work(deployment, len(request.body), _parse, request, count_only, fetch)
    if fetch:
        await inline_image_urls(parsed, deployment.settings)
    return parsed


def _parse(request: Request, count_only: bool, image_urls: bool = False) -> MessagesRequest:
    body = request_json(request.headers, request.body)
    return parse_messages_request(body, count_only=count_only, image_urls=image_urls)

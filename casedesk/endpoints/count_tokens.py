"""POST …/v1/messages/count_tokens: the exact input tokens the same request would use.

llama-server renders the chat template itself (`/apply-template`, given the very body the
Messages endpoint would send) and tokenizes the result (`/tokenize`), so the count matches
`usage.input_tokens + cache_read_input_tokens` of that request on the same model
(tests/e2e/test_sdk_python.py checks this on the real server).
"""

from __future__ import annotations

from typing import Any

import orjson

from casedesk.anthropic.errors import ApiError
from casedesk.answering.model_facts import has_later_system_turn, takes_mid_system_turns
from casedesk.endpoints.request_body import parsed_request
from casedesk.http.server import Request, ResponseWriter
from casedesk.ops.accesslog import RequestRecord
from casedesk.serving import DeploymentState
from casedesk.translate.request import to_chat_request
from casedesk.upstream.connection import UpstreamError
from casedesk.upstream.relay import open_with_failover


async def handle_count_tokens(
    deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    record.tenant = deployment.authorize(request.headers, request.client)
    parsed = await parsed_request(deployment, request, count_only=True)
    model = deployment.model(parsed.model)
    record.model, record.tag = parsed.model, model.tag
    timeout = deployment.settings.upstream_read_timeout
    async with model.lease():  # a managed model is loaded if needed (README, "Models on demand")
        # The very body the Messages endpoint would send (folded system turns included).
        fold = has_later_system_turn(parsed.messages) and not await takes_mid_system_turns(model, timeout)
        chat = {**to_chat_request(parsed, stream=False, fold_system=fold), "model": model.tag}
        templated = await _call(model.balancer, "/apply-template", chat, timeout)
        prompt = templated.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(502, "upstream /apply-template answered without a prompt")
        # Tokenized the way llama-server tokenizes a templated prompt for generation: special
        # tokens added (BOS) and the template's turn markers parsed as special tokens.
        tokens = await _call(
            model.balancer, "/tokenize", {"content": prompt, "add_special": True, "parse_special": True}, timeout
        )
    if not isinstance(tokens.get("tokens"), list):
        raise ApiError(502, "upstream /tokenize answered without tokens")
    writer.send(200, orjson.dumps({"input_tokens": len(tokens["tokens"])}))


async def _call(balancer: Any, path: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    exchange = await open_with_failover(balancer, "POST", path, orjson.dumps(payload), timeout)
    try:
        result = await exchange.read_json()
    except UpstreamError as exc:  # its 200 head came, then its body failed
        raise ApiError(502, f"upstream {path} failed: {exc}") from None
    finally:
        exchange.close()
    if not isinstance(result, dict):
        raise ApiError(502, f"upstream {path} answered with an unexpected JSON shape")
    return result

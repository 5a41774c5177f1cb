"""llama-server error answers → Anthropic errors with a real status.

llama-server's error body is `{"error": {"code", "message", "type", ...}}` (docs/llama-server-facts.md
§4); a context overflow also carries `n_prompt_tokens` and `n_ctx`.
"""

from __future__ import annotations

from typing import Any

import orjson

from casedesk.anthropic.errors import ApiError


def upstream_error(status: int, body: bytes, upstream: str) -> ApiError:
    """The Anthropic error for a non-200 llama-server answer."""
    error: dict[str, Any] = {}
    try:
        parsed = orjson.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            error = parsed["error"]
    except orjson.JSONDecodeError:
        pass
    message = str(error.get("message") or body[:300].decode("utf-8", "replace") or f"HTTP {status}")
    kind = error.get("type")
    if kind == "exceed_context_size_error" and "n_prompt_tokens" in error:
        return ApiError(
            400,
            f"prompt is too long: {error['n_prompt_tokens']} tokens > {error.get('n_ctx', '?')} maximum",
        )
    lowered = message.lower()
    if "image input is not supported" in lowered or ("image" in lowered and "mmproj" in lowered):
        # llama-server answers 500 for an image sent to a model without a vision projector:
        # the request, not the server, is what is wrong.
        return ApiError(400, f"this model cannot take images (llama-server: {message})")
    if status == 400:
        return ApiError(400, message)
    if status == 503:
        return ApiError(529, f"the model is not ready yet (loading): {message}")
    if status in (408, 504):
        return ApiError(504, f"upstream {upstream} timed out: {message}")
    if status >= 500:
        return ApiError(502, f"upstream {upstream} failed (HTTP {status}): {message}")
    return ApiError(502, f"upstream {upstream} refused the request (HTTP {status}): {message}")


def stream_error_message(payload: bytes) -> str:
    """The message of an error llama-server reports inside a stream."""
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload[:300].decode("utf-8", "replace")
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(parsed)[:300]

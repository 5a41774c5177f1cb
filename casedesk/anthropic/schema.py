"""Request validation: a parsed JSON body → a typed MessagesRequest, or a clear 400.

Every message names the field by its path (`messages.2.content.0.text: ...`) the way the
Anthropic API does. Fields newer than this list (service_tier, context_management, …) are
accepted and ignored; only malformed input is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from casedesk.anthropic.errors import invalid_request

ROLES = frozenset({"user", "assistant", "system"})
TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})
THINKING_TYPES = frozenset({"enabled", "adaptive", "disabled"})
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


@dataclass(slots=True)
class MessagesRequest:
    model: str
    max_tokens: int
    messages: list[dict[str, Any]]
    system: list[dict[str, Any]]  # text blocks; a string system becomes one block
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: tuple[str, ...] = ()
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: str | None = None  # enabled / adaptive / disabled / None (not asked)
    thinking_budget: int | None = None

    @property
    def wants_thinking(self) -> bool:
        return self.thinking in ("enabled", "adaptive")

    @property
    def single_tool_use(self) -> bool:
        return bool(self.tool_choice and self.tool_choice.get("disable_parallel_tool_use"))


def request_json(headers: Mapping[str, str], body: bytes) -> Any:
    """The JSON body of an Anthropic API call, after its required header is checked."""
    if not headers.get("anthropic-version"):
        raise invalid_request("anthropic-version: header is required (e.g. anthropic-version: 2023-06-01)")
    if not body:
        raise invalid_request("request body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"request body is not valid JSON: {exc}") from None


def parse_messages_request(body: Any, *, count_only: bool = False) -> MessagesRequest:
    """Check a Messages API body. `count_only`: the count_tokens shape (no max_tokens)."""
    if not isinstance(body, dict):
        raise invalid_request(f"request body must be a JSON object, got {_kind(body)}")
    model = body.get("model")
    if model is None:
        raise invalid_request("model: Field required")
    if not isinstance(model, str) or not model:
        raise invalid_request(f"model: must be a non-empty string, got {_kind(model)}")
    max_tokens: int = 1
    if not count_only:
        raw_max = body.get("max_tokens")
        if raw_max is None:
            raise invalid_request("max_tokens: Field required")
        if not _is_int(raw_max) or raw_max < 1:
            raise invalid_request(f"max_tokens: must be an integer >= 1, got {raw_max!r}")
        max_tokens = raw_max
    messages = body.get("messages")
    if messages is None:
        raise invalid_request("messages: Field required")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("messages: must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        _check_message(message, f"messages.{i}")
    request = MessagesRequest(
        model=model,
        max_tokens=max_tokens,
        messages=messages,
        system=_system(body.get("system")),
    )
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid_request(f"stream: must be a boolean, got {_kind(stream)}")
    request.stream = bool(stream) and not count_only
    request.temperature = _number(body, "temperature", 0.0, 1.0)
    request.top_p = _number(body, "top_p", 0.0, 1.0)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise invalid_request(f"top_k: must be an integer >= 0, got {top_k!r}")
    request.top_k = top_k
    request.stop_sequences = _stop_sequences(body.get("stop_sequences"))
    request.tools = _tools(body.get("tools"))
    request.tool_choice = _tool_choice(body.get("tool_choice"), request.tools)
    request.thinking, request.thinking_budget = _thinking(body.get("thinking"))
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid_request(f"metadata: must be an object, got {_kind(metadata)}")
    return request


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid_request(f"{key}: must be a number between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _system(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "text", "text": value}] if value else []
    if not isinstance(value, list):
        raise invalid_request(f"system: must be a string or a list of text blocks, got {_kind(value)}")
    for i, block in enumerate(value):
        path = f"system.{i}"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise invalid_request(f'{path}: system blocks must be {{"type": "text", "text": ...}}')
        if not isinstance(block.get("text"), str):
            raise invalid_request(f"{path}.text: must be a string")
    return value


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise invalid_request("stop_sequences: must be a list of non-empty strings")
    return tuple(value)


def _check_message(message: Any, path: str) -> None:
    if not isinstance(message, dict):
        raise invalid_request(f"{path}: must be an object with role and content, got {_kind(message)}")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid_request(f'{path}.role: must be "user" or "assistant", got {role!r}')
    if "content" not in message:
        raise invalid_request(f"{path}.content: Field required")
    content = message["content"]
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid_request(f"{path}.content: must be a string or a list of content blocks, got {_kind(content)}")
    for j, block in enumerate(content):
        _check_block(block, f"{path}.content.{j}", role)


def _require_str(block: dict[str, Any], key: str, path: str) -> None:
    if not isinstance(block.get(key), str):
        raise invalid_request(f"{path}.{key}: must be a string, got {_kind(block.get(key))}")


def _check_block(block: Any, path: str, role: str) -> None:
    if not isinstance(block, dict):
        raise invalid_request(f"{path}: must be a content block object, got {_kind(block)}")
    kind = block.get("type")
    if kind == "text":
        _require_str(block, "text", path)
    elif kind == "image":
        _check_image_source(block.get("source"), f"{path}.source")
    elif kind == "document":
        _check_document_source(block.get("source"), f"{path}.source")
    elif kind == "tool_use":
        _require_str(block, "id", path)
        _require_str(block, "name", path)
        if not isinstance(block.get("input"), dict):
            raise invalid_request(f"{path}.input: must be an object, got {_kind(block.get('input'))}")
    elif kind == "tool_result":
        _require_str(block, "tool_use_id", path)
        content = block.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list):
                raise invalid_request(f"{path}.content: must be a string or a list of blocks")
            for k, inner in enumerate(content):
                _check_block(inner, f"{path}.content.{k}", role)
        if "is_error" in block and not isinstance(block["is_error"], bool):
            raise invalid_request(f"{path}.is_error: must be a boolean")
    elif kind == "thinking":
        _require_str(block, "thinking", path)
    elif kind == "redacted_thinking":
        _require_str(block, "data", path)
    elif kind is None:
        raise invalid_request(f"{path}.type: Field required")
    else:
        raise invalid_request(
            f"{path}.type: unsupported content block type {kind!r} "
            "(supported: text, image, document, tool_use, tool_result, thinking, redacted_thinking)"
        )


def _check_image_source(source: Any, path: str) -> None:
    if not isinstance(source, dict):
        raise invalid_request(f"{path}: Field required (an object with type base64 or url)")
    kind = source.get("type")
    if kind == "base64":
        media_type = source.get("media_type")
        if not isinstance(media_type, str) or media_type not in IMAGE_TYPES:
            raise invalid_request(f"{path}.media_type: must be one of {', '.join(sorted(IMAGE_TYPES))}")
        _require_str(source, "data", path)
    elif kind == "url":
        _require_str(source, "url", path)
    else:
        raise invalid_request(f'{path}.type: must be "base64" or "url", got {kind!r}')


def _check_document_source(source: Any, path: str) -> None:
    if not isinstance(source, dict):
        raise invalid_request(f"{path}: Field required")
    kind = source.get("type")
    if kind == "text":
        _require_str(source, "data", path)
    elif kind == "content":
        content = source.get("content")
        if not isinstance(content, (str, list)):
            raise invalid_request(f"{path}.content: must be a string or a list of text blocks")
    elif kind in ("base64", "url", "file"):
        raise invalid_request(
            f"{path}.type: {kind!r} documents (PDF) are not supported by this gateway; send the text as a text source"
        )
    else:
        raise invalid_request(f'{path}.type: must be "text" or "content", got {kind!r}')


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise invalid_request(f"tools: must be a list, got {_kind(value)}")
    for i, tool in enumerate(value):
        path = f"tools.{i}"
        if not isinstance(tool, dict):
            raise invalid_request(f"{path}: must be an object")
        if tool.get("type") not in (None, "custom"):
            raise invalid_request(f"{path}.type: server tool {tool.get('type')!r} is not available on this gateway")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise invalid_request(f"{path}.name: must be a non-empty string")
        if not isinstance(tool.get("input_schema"), dict):
            raise invalid_request(f"{path}.input_schema: Field required (a JSON Schema object)")
        if "description" in tool and not isinstance(tool["description"], str):
            raise invalid_request(f"{path}.description: must be a string")
    return value or None


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str) or value["type"] not in TOOL_CHOICES:
        raise invalid_request("tool_choice.type: must be one of auto, any, tool, none")
    if value["type"] == "tool":
        name = value.get("name")
        if not isinstance(name, str):
            raise invalid_request('tool_choice.name: Field required when type is "tool"')
        if not tools or all(t["name"] != name for t in tools):
            raise invalid_request(f"tool_choice.name: no tool named {name!r} in tools")
    if "disable_parallel_tool_use" in value and not isinstance(value["disable_parallel_tool_use"], bool):
        raise invalid_request("tool_choice.disable_parallel_tool_use: must be a boolean")
    return value


def _thinking(value: Any) -> tuple[str | None, int | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str) or value["type"] not in THINKING_TYPES:
        raise invalid_request("thinking.type: must be one of enabled, adaptive, disabled")
    if value["type"] != "enabled":
        return value["type"], None
    budget: Any = value.get("budget_tokens")
    if not _is_int(budget) or budget < 1:
        raise invalid_request(f"thinking.budget_tokens: must be an integer >= 1, got {budget!r}")
    return "enabled", int(budget)

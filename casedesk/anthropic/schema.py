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
from casedesk.anthropic.json_schema import (
    check_grammar_schema,
    check_json_depth,
    check_schema_bounds,
    without_long_repetitions,
)

ROLES = frozenset({"user", "assistant", "system"})
TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})
THINKING_TYPES = frozenset({"enabled", "adaptive", "disabled"})
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})
# No context window holds this many turns or blocks (every one costs template tokens); a body
# with more is refused before it is turned into objects (issue 22, item 3).
MAX_MESSAGES = 100_000
MAX_BLOCKS = 200_000


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
    output_schema: dict[str, Any] | None = None  # output_config.format / output_format json_schema
    effort: str | None = None  # output_config.effort

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
    _check_counts_before_parsing(body)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"request body is not valid JSON: {exc}") from None


def _check_counts_before_parsing(body: bytes) -> None:
    """Refuse a body with far more turns or blocks than any context window holds, before
    orjson builds an object for each (a 27 MB body of 1 M tiny messages costs ~400 MB as
    objects). The counts are of keys, an upper bound; the exact checks follow parsing."""
    roles = body.count(b'"role"')
    if roles > MAX_MESSAGES:
        raise invalid_request(
            f"messages: more than {MAX_MESSAGES} messages ({roles} role fields); no context window holds that many"
        )
    types = body.count(b'"type"')
    if types > MAX_BLOCKS + MAX_MESSAGES:
        raise invalid_request(
            f"messages: more than {MAX_BLOCKS} content blocks ({types} type fields); no context window holds that many"
        )


def parse_messages_request(body: Any, *, count_only: bool = False, image_urls: bool = False) -> MessagesRequest:
    """Check a Messages API body. `count_only`: the count_tokens shape (no max_tokens).
    `image_urls`: image `url` sources are allowed (the gateway fetches them; issue 22, 13)."""
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
    if len(messages) > MAX_MESSAGES:
        raise invalid_request(f"messages: more than {MAX_MESSAGES} messages; no context window holds that many")
    blocks = 0
    for i, message in enumerate(messages):
        blocks += _check_message(message, f"messages.{i}", image_urls)
        if blocks > MAX_BLOCKS:
            raise invalid_request(f"messages: more than {MAX_BLOCKS} content blocks; no context window holds that many")
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
    request.output_schema, request.effort = _output(body.get("output_config"), body.get("output_format"))
    if request.output_schema is not None and request.tools and (request.tool_choice or {}).get("type") != "none":
        # The schema's grammar holds every token of the answer, and llama-server's chat parser
        # ignores tools under a response format (docs/llama-server-facts.md §13): the model
        # could never call one. Said, not silently dropped.
        field = "output_config.format" if body.get("output_config") else "output_format"
        raise invalid_request(
            f"{field}: structured outputs and tools that may be called cannot be combined on this "
            "gateway (the schema's grammar leaves the model no way to call a tool); send one of them, "
            'or tool_choice {"type": "none"}'
        )
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid_request(f"metadata: must be an object, got {_kind(metadata)}")
    _refuse_server_side_features(body)
    return request


def _refuse_server_side_features(body: dict[str, Any]) -> None:
    """Features that run on Anthropic's side: a local model has none, so they are refused
    by name instead of being dropped (README, "What CaseDesk does with each field")."""
    if body.get("mcp_servers"):
        raise invalid_request("mcp_servers: the MCP connector runs on Anthropic's servers and is not available here")
    if body.get("container") is not None:
        raise invalid_request("container: code execution containers are not available on this gateway")


def _output(config: Any, beta_format: Any) -> tuple[dict[str, Any] | None, str | None]:
    """output_config (format, effort) and the earlier beta `output_format`."""
    effort: str | None = None
    schema: dict[str, Any] | None = None
    if config is not None:
        if not isinstance(config, dict):
            raise invalid_request(f"output_config: must be an object, got {_kind(config)}")
        raw_effort = config.get("effort")
        if raw_effort is not None:
            if not isinstance(raw_effort, str) or raw_effort not in EFFORTS:
                raise invalid_request(f"output_config.effort: must be one of {', '.join(sorted(EFFORTS))}")
            effort = raw_effort
        if config.get("format") is not None:
            schema = _output_format(config["format"], "output_config.format")
    if beta_format is not None:
        if schema is not None:
            raise invalid_request("output_format: give output_config.format or output_format, not both")
        schema = _output_format(beta_format, "output_format")
    return schema, effort


def _output_format(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") != "json_schema":
        raise invalid_request(f'{path}.type: must be "json_schema"')
    schema = value.get("schema")
    if not isinstance(schema, dict):
        raise invalid_request(f"{path}.schema: Field required (a JSON Schema object)")
    check_schema_bounds(schema, f"{path}.schema")
    check_grammar_schema(schema, f"{path}.schema")
    return schema


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


def _check_message(message: Any, path: str, image_urls: bool) -> int:
    """Checks one message; returns how many content blocks it has."""
    if not isinstance(message, dict):
        raise invalid_request(f"{path}: must be an object with role and content, got {_kind(message)}")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid_request(f'{path}.role: must be "user" or "assistant", got {role!r}')
    if "content" not in message:
        raise invalid_request(f"{path}.content: Field required")
    content = message["content"]
    if isinstance(content, str):
        return 1
    if not isinstance(content, list):
        raise invalid_request(f"{path}.content: must be a string or a list of content blocks, got {_kind(content)}")
    for j, block in enumerate(content):
        _check_block(block, f"{path}.content.{j}", role, image_urls)
    return len(content)


def _require_str(block: dict[str, Any], key: str, path: str) -> None:
    if not isinstance(block.get(key), str):
        raise invalid_request(f"{path}.{key}: must be a string, got {_kind(block.get(key))}")


def _check_block(block: Any, path: str, role: str, image_urls: bool) -> None:
    if not isinstance(block, dict):
        raise invalid_request(f"{path}: must be a content block object, got {_kind(block)}")
    kind = block.get("type")
    if kind == "text":
        _require_str(block, "text", path)
        # `citations` on a text block of an earlier answer are annotations of that text: the
        # text is kept, the citations (which a local model never produces) are not forwarded.
    elif kind == "image":
        _check_image_source(block.get("source"), f"{path}.source", image_urls)
    elif kind == "document":
        _check_document_source(block.get("source"), f"{path}.source")
        _refuse_citations(block, path)
    elif kind == "search_result":
        _check_search_result(block, path)
    elif kind == "tool_use":
        _require_str(block, "id", path)
        _require_str(block, "name", path)
        if not isinstance(block.get("input"), dict):
            raise invalid_request(f"{path}.input: must be an object, got {_kind(block.get('input'))}")
        check_json_depth(block["input"], f"{path}.input")
    elif kind == "tool_result":
        _require_str(block, "tool_use_id", path)
        content = block.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list):
                raise invalid_request(f"{path}.content: must be a string or a list of blocks")
            for k, inner in enumerate(content):
                _check_block(inner, f"{path}.content.{k}", role, image_urls)
        if "is_error" in block and not isinstance(block["is_error"], bool):
            raise invalid_request(f"{path}.is_error: must be a boolean")
    elif kind == "thinking":
        _require_str(block, "thinking", path)
    elif kind == "redacted_thinking":
        _require_str(block, "data", path)
    elif kind is None:
        raise invalid_request(f"{path}.type: Field required")
    elif kind in SERVER_TOOL_BLOCKS:
        raise invalid_request(
            f"{path}.type: {kind!r} blocks come from Anthropic's server tools, which this gateway does not run"
        )
    else:
        raise invalid_request(
            f"{path}.type: unsupported content block type {kind!r} "
            "(supported: text, image, document, search_result, tool_use, tool_result, thinking, redacted_thinking)"
        )


SERVER_TOOL_BLOCKS = frozenset(
    {
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "mcp_tool_use",
        "mcp_tool_result",
        "container_upload",
    }
)


def _refuse_citations(block: dict[str, Any], path: str) -> None:
    citations = block.get("citations")
    if isinstance(citations, dict) and citations.get("enabled"):
        raise invalid_request(
            f"{path}.citations: citations are not available on this gateway (a local model cannot cite "
            "passages); send the block without citations.enabled"
        )


def _check_search_result(block: dict[str, Any], path: str) -> None:
    _require_str(block, "source", path)
    _require_str(block, "title", path)
    content = block.get("content")
    if not isinstance(content, list):
        raise invalid_request(f"{path}.content: must be a list of text blocks")
    for k, inner in enumerate(content):
        if not isinstance(inner, dict) or inner.get("type") != "text" or not isinstance(inner.get("text"), str):
            raise invalid_request(f'{path}.content.{k}: must be a {{"type": "text", "text": ...}} block')
    _refuse_citations(block, path)


def _check_image_source(source: Any, path: str, image_urls: bool) -> None:
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
        if not image_urls:
            # llama-server would fetch the URL itself, from the inference box (issue 22, 13).
            raise invalid_request(
                f"{path}: image URLs are not fetched by this gateway; send the image as "
                '{"type": "base64", "media_type": ..., "data": ...}, or ask its operator to set '
                "[server] fetch_image_urls = true"
            )
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
        if isinstance(content, list):
            for k, inner in enumerate(content):
                if not isinstance(inner, dict) or inner.get("type") != "text" or not isinstance(inner.get("text"), str):
                    raise invalid_request(f'{path}.content.{k}: must be a {{"type": "text", "text": ...}} block')
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
    checked: list[dict[str, Any]] = []
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
        strict = tool.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid_request(f"{path}.strict: must be a boolean")
        where = f"{path}.input_schema (tool {tool['name']!r})"
        if not strict:  # its input is not promised to validate: over-long bounds are dropped
            relaxed = without_long_repetitions(tool["input_schema"])
            tool = tool if relaxed is tool["input_schema"] else {**tool, "input_schema": relaxed}
        check_schema_bounds(tool["input_schema"], where)
        if strict:
            check_grammar_schema(tool["input_schema"], where)
        checked.append(tool)
    return checked or None


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

"""Tool calls a small model wrote as JSON text instead of its template's tool syntax.

Repair, never invent: only when tools were offered and the answer's whole text (blank space
and one Markdown code fence aside) is one JSON object that names an offered tool and gives
it an object of arguments does the answer become a `tool_use` block. Anything else stays
text. The shapes accepted are the ones models write: `{"name": N, "arguments": {...}}` (or
`input` / `parameters` for the arguments), optionally wrapped as `{"tool_call": {...}}` or
`{"function": {...}}` (llama-server's generic format and OpenAI's).
"""

from __future__ import annotations

from typing import Any

import orjson

ARGUMENT_KEYS = ("arguments", "input", "parameters")
WRAPPERS = ("tool_call", "function")
FENCE = "```"


def looks_like_json_start(text: str) -> bool:
    """True while `text` may still be the start of a JSON tool call (hold it back)."""
    stripped = text.lstrip()
    if not stripped:
        return True
    if stripped.startswith("{"):
        return True
    if len(stripped) < len(FENCE):
        return FENCE.startswith(stripped)
    if stripped.startswith(FENCE):  # "```json\n{" is still possible until proven otherwise
        head, newline, rest = stripped.partition("\n")
        language = head[len(FENCE) :].strip()
        if not newline:
            return "json".startswith(language)
        return language in ("", "json") and (not rest.strip() or rest.lstrip().startswith("{"))
    return False


def tool_call_in_text(text: str, offered: frozenset[str]) -> tuple[str, str] | None:
    """(tool name, arguments as JSON text) when the whole text is one such call, else None."""
    body = _unfenced(text.strip())
    if body is None or not body.startswith("{"):
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    call = _call(value)
    if call is None:
        return None
    name, arguments = call
    if name not in offered:
        return None
    return name, orjson.dumps(arguments).decode()


def _unfenced(text: str) -> str | None:
    if not text.startswith(FENCE):
        return text
    head, newline, rest = text.partition("\n")
    if not newline or head[3:].strip() not in ("", "json") or not rest.rstrip().endswith(FENCE):
        return None
    return rest.rstrip()[: -len(FENCE)].strip()


def _call(value: Any) -> tuple[str, dict[str, Any]] | None:
    if not isinstance(value, dict):
        return None
    if len(value) == 1:
        ((key, inner),) = value.items()
        if key in WRAPPERS and isinstance(inner, dict):
            value = inner
    name = value.get("name")
    present = [key for key in ARGUMENT_KEYS if key in value]
    if not isinstance(name, str) or len(present) != 1 or set(value) - {"name", present[0]}:
        return None
    arguments = value[present[0]]
    if isinstance(arguments, str):  # OpenAI's shape: arguments as JSON text
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return None
    return (name, arguments) if isinstance(arguments, dict) else None

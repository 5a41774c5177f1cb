"""llama-server chat completion → Anthropic message (non-streamed), and the shared mappings.

Pure functions over dicts. Reasoning the request did not ask for (no `thinking` enabled) is
left out of the answer: an Anthropic client that did not enable thinking does not expect
thinking blocks. README.md ("Thinking") documents this.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from typing import Any

import orjson

log = logging.getLogger("casedesk.translate")

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def new_message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def new_tool_use_id() -> str:
    return "toolu_" + os.urandom(12).hex()


def thinking_signature(thinking: str) -> str:
    """A stable stand-in for Anthropic's signature: local reasoning is not signed, but
    clients check the field is present and send it back with the block."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def usage_of(usage: dict[str, Any] | None) -> dict[str, int]:
    """OpenAI-style usage → Anthropic usage; input_tokens excludes the cached part."""
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def stop_reason_of(finish_reason: str | None, has_tool_use: bool) -> str:
    """max_tokens wins (a tool call may be cut short); then any tool call means tool_use."""
    if finish_reason == "length":
        return "max_tokens"
    if has_tool_use:
        return "tool_use"
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


def tool_input(arguments: Any) -> dict[str, Any]:
    """The parsed `arguments` of a tool call; kept verbatim under a key if not a JSON object."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        log.warning("tool call arguments are not JSON: %.200r", arguments)
        return {"_raw_arguments": arguments}
    return parsed if isinstance(parsed, dict) else {"_value": parsed}


def matched_stop_sequence(payload: dict[str, Any]) -> str | None:
    """The stop sequence that ended the answer, from llama-server's `__verbose` object."""
    verbose = payload.get("__verbose")
    if isinstance(verbose, dict) and verbose.get("stop_type") == "word":
        word = verbose.get("stopping_word")
        if isinstance(word, str) and word:
            return word
    return None


def to_message(
    completion: dict[str, Any],
    model: str,
    *,
    wants_thinking: bool,
    single_tool_use: bool = False,
    message_id: str | None = None,
) -> dict[str, Any]:
    """The Anthropic message for a whole chat completion.

    single_tool_use: the request disabled parallel tool use; llama-server's grammar may still
    have produced several calls, and only the first is kept (that is where the answer ends).
    """
    choices = completion.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if wants_thinking and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": thinking_signature(reasoning)})
    text = message.get("content")
    if text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls") or []
    if single_tool_use and len(calls) > 1:
        calls = calls[:1]
        choice = {**choice, "finish_reason": "tool_calls"}
    for call in calls:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or new_tool_use_id(),
                "name": function.get("name", ""),
                "input": tool_input(function.get("arguments")),
            }
        )
    has_tool_use = any(block["type"] == "tool_use" for block in content)
    stop_sequence = matched_stop_sequence(completion)
    stop_reason = "stop_sequence" if stop_sequence is not None else stop_reason_of(choice.get("finish_reason"), has_tool_use)
    return {
        "id": message_id or new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_of(completion.get("usage")),
    }

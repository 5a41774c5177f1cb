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


class CompletionAccumulator:
    """Streamed chunks → the completion a non-streamed call would have returned.

    Non-streamed Anthropic requests are streamed from llama-server too: the upstream then
    never goes silent during a long generation (the stall timeout means "no bytes", not
    "no answer yet"), and one code path serves both kinds of client.
    """

    def __init__(self, *, single_tool_use: bool = False) -> None:
        # single_tool_use: see StreamTranslator; a second tool call ends the answer (`cut`).
        self.single_tool_use = single_tool_use
        self.cut = False
        self.deltas = 0
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.verbose: dict[str, Any] | None = None
        self.prompt_progress: dict[str, Any] | None = None

    def feed(self, chunk: dict[str, Any]) -> None:
        if "prompt_progress" in chunk:
            self.prompt_progress = chunk["prompt_progress"]
            return
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta:
                self.deltas += 1
            if delta.get("content"):
                self.content.append(delta["content"])
            if delta.get("reasoning_content"):
                self.reasoning.append(delta["reasoning_content"])
            for call in delta.get("tool_calls") or ():
                index = int(call.get("index") or 0)
                if self.single_tool_use and self.calls and index not in self.calls:
                    self.cut = True
                    return
                slot = self.calls.setdefault(index, {"id": None, "name": "", "arguments": []})
                function = call.get("function") or {}
                slot["id"] = slot["id"] or call.get("id")
                slot["name"] = slot["name"] or function.get("name") or ""
                if function.get("arguments"):
                    slot["arguments"].append(function["arguments"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("__verbose"), dict):
            self.verbose = chunk["__verbose"]

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": "".join(c["arguments"])},
                }
                for _, c in sorted(self.calls.items())
            ]
        usage = self.usage
        if usage is None:  # cut short before llama-server's usage chunk (see StreamTranslator)
            progress = self.prompt_progress or {}
            usage = {
                "prompt_tokens": progress.get("total", 0),
                "completion_tokens": self.deltas,
                "prompt_tokens_details": {"cached_tokens": progress.get("cache", 0)},
            }
        completion: dict[str, Any] = {
            "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls" if self.cut else self.finish_reason}
            ],
            "usage": usage,
        }
        if self.verbose is not None:
            completion["__verbose"] = self.verbose
        return completion


def to_message(
    completion: dict[str, Any],
    model: str,
    *,
    wants_thinking: bool,
    message_id: str | None = None,
) -> dict[str, Any]:
    """The Anthropic message for a whole chat completion."""
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
    for call in message.get("tool_calls") or []:
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
    stop_reason = (
        "stop_sequence" if stop_sequence is not None else stop_reason_of(choice.get("finish_reason"), has_tool_use)
    )
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

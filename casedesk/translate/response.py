"""The whole Anthropic message for a non-streamed request, and the mappings both paths share.

A non-streamed message is StreamTranslator's events accumulated (`MessageAccumulator`): one
translator, one place for stop reasons, usage, tool inputs and the single-tool cut.
Reasoning the request did not ask for (no `thinking` enabled) is left out of the answer by
the translator: README.md ("Thinking") documents this.
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


class MessageAccumulator:
    """StreamTranslator's events → the whole message a non-streamed request answers with.

    One translator serves both kinds of client: a non-streamed answer is the stream's events
    accumulated, as the SDKs' own accumulators build their final message.
    Fed our own encoding only (`event: NAME\ndata: JSON\n\n`, several per feed).
    """

    __slots__ = ("message", "_parts", "_json")

    def __init__(self) -> None:
        self.message: dict[str, Any] = {}
        self._parts: list[str] = []  # the open block's text, thinking or tool input pieces
        self._json = False  # the open block is a tool_use (its pieces are JSON)

    def feed(self, events: bytes) -> None:
        for block in events.split(b"\n\n"):
            if block:
                self._event(orjson.loads(block[block.index(b"\ndata: ") + 7 :]))

    def _event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "content_block_delta":
            delta = event["delta"]
            piece = delta.get("text", delta.get("thinking", delta.get("partial_json")))
            if piece is not None:
                self._parts.append(piece)
            elif "signature" in delta:
                self.message["content"][-1]["signature"] = delta["signature"]
        elif kind == "content_block_start":
            block = dict(event["content_block"])
            self.message["content"].append(block)
            self._parts = []
            self._json = block["type"] == "tool_use"
        elif kind == "content_block_stop":
            block = self.message["content"][-1]
            text = "".join(self._parts)
            if self._json:
                block["input"] = tool_input(text)
            else:
                block["thinking" if block["type"] == "thinking" else "text"] = text
        elif kind == "message_start":
            self.message = dict(event["message"])
            self.message["content"] = []
        elif kind == "message_delta":
            self.message.update(event["delta"])
            self.message["usage"] = {**self.message["usage"], **event["usage"]}

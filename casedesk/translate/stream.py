"""StreamTranslator: llama-server chat chunks → Anthropic server-sent events, as bytes.

A sans-I/O state machine over content blocks (text, thinking, tool_use), in the manner of
h11: `feed(chunk)` returns the bytes to write now, `finish()` the closing events. The I/O
layer calls it once per upstream chunk and writes what it returns at once.

Hot path: a text or thinking delta is the same event each time but for the text, so its
bytes are pre-encoded around one `orjson.dumps(text)` (tests compare them with the obvious
`orjson.dumps(event)` encoding).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from casedesk.http.sse import encode_event
from casedesk.translate.repair import looks_like_json_start, tool_call_in_text
from casedesk.translate.response import (
    matched_stop_sequence,
    new_message_id,
    new_tool_use_id,
    stop_reason_of,
    thinking_signature,
    usage_of,
)

log = logging.getLogger("casedesk.translate")


class StreamTranslator:
    __slots__ = (
        "model",
        "message_id",
        "wants_thinking",
        "started",
        "finished",
        "_index",
        "_block",
        "_text_prefix",
        "_thinking_prefix",
        "_thinking_text",
        "_tool_blocks",
        "_current_tool",
        "_finish_reason",
        "_usage",
        "_input_tokens",
        "_cached_tokens",
        "has_tool_use",
        "stop_sequence",
        "single_tool_use",
        "cut",
        "_deltas",
        "final_usage",
        "max_tokens",
        "repair_tools",
        "_held",
        "repaired",
    )

    def __init__(
        self,
        model: str,
        *,
        wants_thinking: bool,
        single_tool_use: bool = False,
        message_id: str | None = None,
        max_tokens: int | None = None,
        repair_tools: frozenset[str] = frozenset(),
    ) -> None:
        self.model = model
        self.message_id = message_id or new_message_id()
        self.wants_thinking = wants_thinking
        self.started = False
        self.finished = False
        self._index = -1
        self._block: str | None = None  # "text" | "thinking" | "tool_use" | None
        self._text_prefix = b""
        self._thinking_prefix = b""
        self._thinking_text: list[str] = []
        self._tool_blocks: dict[int, int] = {}  # upstream tool-call index → our block index
        self._current_tool: int | None = None
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._input_tokens = 0
        self._cached_tokens = 0
        self.has_tool_use = False
        self.stop_sequence: str | None = None
        # disable_parallel_tool_use: llama-server's grammar may still allow more calls, so a
        # second call ends the answer here (`cut`): the caller then stops the upstream.
        self.single_tool_use = single_tool_use
        self.cut = False
        self._deltas = 0  # chunks carrying a delta: the output token count if cut short
        self.final_usage: dict[str, int] = {}  # the usage message_delta reported
        # A "length" finish before max_tokens means the context window was full.
        self.max_tokens = max_tokens
        # Tools offered: an answer whose whole text is one JSON tool call becomes a tool_use
        # block (translate/repair.py). Text that may be one is held until it is clear.
        self.repair_tools = repair_tools
        self._held: list[str] | None = [] if repair_tools else None
        self.repaired = False  # the answer was such a repaired call (counted in a metric)

    # -- input ----------------------------------------------------------------------------

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The events for one upstream chunk (b"" when it changes nothing a client sees)."""
        out = b""
        progress = chunk.get("prompt_progress")
        if progress is not None:
            # The prompt's size and cached part, for message_start. That event waits for the
            # answer's first chunk: until then a failed upstream can be replaced unseen
            # (upstream/relay.py), and the keep-alive covers a long prefill.
            total = int(progress.get("total") or 0)
            self._cached_tokens = int(progress.get("cache") or 0)
            self._input_tokens = max(total - self._cached_tokens, 0)
            return b""
        if not self.started:
            out = self._message_start()
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta")
            if delta:
                self._deltas += 1
                reasoning = delta.get("reasoning_content")
                if reasoning:
                    out += self._release() + self._reasoning(reasoning)
                text = delta.get("content")
                if text:
                    out += self._maybe_held(text)
                calls = delta.get("tool_calls")
                if calls:
                    out += self._release() + self._tool_calls(calls)
            reason = choice.get("finish_reason")
            if reason:
                self._finish_reason = reason
                if "__verbose" in chunk:
                    self.stop_sequence = matched_stop_sequence(chunk)
        usage = chunk.get("usage")
        if usage:
            self._usage = usage
        return out

    def feed_text(self, text: str) -> bytes:
        """Exactly `feed(chunk)` for a chunk that is one plain text delta and nothing else
        (translate/fast_delta.py recognises those without parsing them): the relay's per-token
        path. The text goes the normal way (held while it may be a JSON tool call)."""
        out = b"" if self.started else self._message_start()
        self._deltas += 1
        if text:
            out += self._maybe_held(text)
        return out

    def feed_texts(self, texts: list[str]) -> bytes:
        """Exactly `feed_text` for each of `texts` in turn, in one call: an upstream read of
        many plain text deltas (a fast model, or a client catching up). Once the text block is
        open and nothing is held, each is one event: built here without a call per token."""
        if self._block == "text" and self.started:  # (text is never held once its block is open)
            self._deltas += len(texts)
            if "" in texts:  # (an empty delta counts as a token and makes no event)
                texts = [text for text in texts if text]
                if not texts:
                    return b""
            # The events' bytes joined in C (map, join): no Python step per token.
            prefix = self._text_prefix
            return prefix + (b"}}\n\n" + prefix).join(map(orjson.dumps, texts)) + b"}}\n\n"
        return b"".join([self.feed_text(text) for text in texts])

    def _maybe_held(self, text: str) -> bytes:
        """Text, unless it may still turn out to be a JSON tool call: then it waits."""
        held = self._held
        if held is None:
            return self._text(text)
        held.append(text)
        if looks_like_json_start("".join(held)):
            return b""
        return self._release()

    def _release(self) -> bytes:
        """Held text goes out as text; from now on text is never held again."""
        held, self._held = self._held, None
        return self._text("".join(held)) if held else b""

    def _text(self, text: str) -> bytes:
        out = b""
        if self._block != "text":
            out = self._open(b'{"type":"text","text":""}', "text")
            self._text_prefix = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                b'"delta":{"type":"text_delta","text":' % self._index
            )
        return out + self._text_prefix + orjson.dumps(text) + b"}}\n\n"

    def _reasoning(self, reasoning: str) -> bytes:
        if not self.wants_thinking:
            return b""  # the stream's keep-alive covers the silence (http/keepalive.py)
        out = b""
        if self._block != "thinking":
            out = self._open(b'{"type":"thinking","thinking":"","signature":""}', "thinking")
            self._thinking_prefix = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                b'"delta":{"type":"thinking_delta","thinking":' % self._index
            )
            self._thinking_text = []
        self._thinking_text.append(reasoning)
        return out + self._thinking_prefix + orjson.dumps(reasoning) + b"}}\n\n"

    def _tool_calls(self, calls: list[dict[str, Any]]) -> bytes:
        out = b""
        for call in calls:
            upstream_index = int(call.get("index") or 0)
            function = call.get("function") or {}
            if upstream_index not in self._tool_blocks:
                if self.single_tool_use and self._tool_blocks:
                    self.cut = True
                    return out
                block: dict[str, Any] = {
                    "type": "tool_use",
                    "id": call.get("id") or new_tool_use_id(),
                    "name": function.get("name") or "",
                    "input": {},
                }
                out += self._open(orjson.dumps(block), "tool_use")
                self._tool_blocks[upstream_index] = self._index
                self._current_tool = upstream_index
                self.has_tool_use = True
            elif upstream_index != self._current_tool:
                # Blocks are sequential; llama-server finishes one call before the next.
                log.warning("arguments for an earlier tool call (index %d) dropped", upstream_index)
                continue
            arguments = function.get("arguments")
            if arguments:
                out += encode_event(
                    b"content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": self._index,
                        "delta": {"type": "input_json_delta", "partial_json": arguments},
                    },
                )
        return out

    # -- blocks -----------------------------------------------------------------------------

    def _open(self, content_block: bytes, kind: str) -> bytes:
        out = self._close()
        self._index += 1
        self._block = kind
        return out + (
            b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,"content_block":%b}\n\n'
            % (self._index, content_block)
        )

    def _close(self) -> bytes:
        if self._block is None:
            return b""
        out = b""
        if self._block == "thinking":
            signature = thinking_signature("".join(self._thinking_text))
            out = encode_event(
                b"content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": self._index,
                    "delta": {"type": "signature_delta", "signature": signature},
                },
            )
        self._block = None
        self._current_tool = None
        return out + b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n' % self._index

    def _message_start(self) -> bytes:
        self.started = True
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self._input_tokens,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": self._cached_tokens,
            },
        }
        return encode_event(b"message_start", {"type": "message_start", "message": message})

    @property
    def prompt_usage(self) -> tuple[int, int]:
        """(uncached, cached) prompt tokens, known from message_start on (tenants' ITPM)."""
        return self._input_tokens, self._cached_tokens

    @property
    def generated(self) -> int:
        """Output tokens streamed so far (chunks with a delta): what a cut stream used."""
        return self._deltas

    @property
    def has_content(self) -> bool:
        """True once a content block (with the first token) has been emitted."""
        return self._index >= 0

    # -- the end ------------------------------------------------------------------------------

    @property
    def finish_reason(self) -> str | None:
        return self._finish_reason

    def finish(self, usage: dict[str, Any] | None = None) -> bytes:
        """Close the open block, then `message_delta` (stop reason, usage) and `message_stop`."""
        if self.finished:
            return b""
        self.finished = True
        out = b"" if self.started else self._message_start()
        held, self._held = self._held, None
        if held:
            call = tool_call_in_text("".join(held), self.repair_tools)
            if call is not None and not self.has_tool_use:
                name, arguments = call
                out += self._tool_calls([{"index": 0, "function": {"name": name, "arguments": arguments}}])
                self.repaired = True
            else:
                out += self._text("".join(held))
        out += self._close()
        final = usage_of(usage or self._usage)
        if not (usage or self._usage):
            # Cut short before llama-server's usage chunk: llama-server streams one chunk per
            # generated token that changes the answer, so the count is the chunks seen.
            final["input_tokens"] = self._input_tokens
            final["cache_read_input_tokens"] = self._cached_tokens
            final["output_tokens"] = self._deltas
        self.final_usage = final
        if self.stop_sequence is not None:
            stop_reason = "stop_sequence"
        else:
            stop_reason = stop_reason_of(self._finish_reason, self.has_tool_use)
            if (
                stop_reason == "max_tokens"
                and self.max_tokens is not None
                and final["output_tokens"] < self.max_tokens
                and not self.cut
            ):
                # llama-server ends with "length" when the slot's context is full too.
                stop_reason = "model_context_window_exceeded"
        out += encode_event(
            b"message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": self.stop_sequence},
                "usage": final,
            },
        )
        return out + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

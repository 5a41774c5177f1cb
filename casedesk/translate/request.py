"""Anthropic Messages request → llama-server `POST /v1/chat/completions` body.

Pure: dicts in, dict out, no I/O. The mapping is docs/anthropic-api.md §2; each rule is pinned
by a test in tests/test_translate_request.py.
"""

from __future__ import annotations

from typing import Any

import orjson

from casedesk.anthropic.schema import MessagesRequest


# Anthropic's effort levels → the `reasoning_effort` values chat templates know (gpt-oss:
# low, medium, high). A template without the variable ignores it.
REASONING_EFFORT = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
SYSTEM_OPEN, SYSTEM_CLOSE = "<system>\n", "\n</system>"
# llama-server's schema grammar lets a newline or two and up to 20 spaces and tabs stand between
# any two tokens of the JSON (common/json-schema-to-grammar.cpp, its `space` rule); at
# temperature 1 a small model can spend its whole max_tokens there (docs/llama-server-facts.md
# §11). A raw newline belongs nowhere inside a JSON value (strings escape it), so banning the
# newline tokens costs the answer nothing and leaves the grammar one space at most. llama-server
# tokenizes each string and bans its tokens (`false` is minus infinity).
NO_NEWLINE_TOKENS = (("\n", False), ("\n\n", False))


def to_chat_request(request: MessagesRequest, *, stream: bool, fold_system: bool = False) -> dict[str, Any]:
    """`fold_system`: the model's template refuses a system turn after the first one
    (answering/model_facts.py finds out), so such turns go into the next user turn."""
    messages = to_chat_messages(request)
    if fold_system:
        messages = fold_system_turns(messages)
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "max_tokens": request.max_tokens,
    }
    for key in ("temperature", "top_p", "top_k"):
        value = getattr(request, key)
        if value is not None:
            body[key] = value
    if request.stop_sequences:
        body["stop"] = list(request.stop_sequences)
        # The OpenAI-style answer does not say which stop word fired; with `verbose` the
        # final chunk (or answer) carries `__verbose.stop_type == "word"` and
        # `__verbose.stopping_word` (checked on llama-server 11434). Asked only when needed:
        # that object also repeats the prompt.
        body["verbose"] = True
    forced = forced_strict_tools(request)
    if forced:
        # llama-server's "required" grammar lets the model write text before its call, and a
        # template without tool syntax gets no call at all: a forced call of strict tools is
        # asked as a JSON answer instead, which the grammar holds to the tools' schemas from
        # the first token, whatever the template; the answer's text becomes the tool_use
        # block (translate/repair.py). docs/llama-server-facts.md §13.
        body["messages"] = _with_tool_instructions(body["messages"], forced)
        body["response_format"] = {"type": "json_schema", "json_schema": {"schema": forced_call_schema(forced)}}
    elif request.tools:
        body.update(_tools(request))
    if request.output_schema is not None:
        # llama-server turns the schema into a grammar (common/json-schema-to-grammar.cpp);
        # anthropic/json_schema.py refused what that grammar would not enforce.
        body["response_format"] = {"type": "json_schema", "json_schema": {"schema": request.output_schema}}
        # The grammar holds the answer to the schema; saying so (with the schema) lets a small
        # model choose values that mean something and close the JSON early, instead of
        # wandering where the grammar allows (long decimals, whitespace) until max_tokens.
        body["messages"] = _with_instruction(
            body["messages"],
            "Answer with only one compact JSON value that matches this JSON Schema:\n"
            + orjson.dumps(request.output_schema).decode(),
        )
    if "response_format" in body and not request.wants_thinking:
        # Not with thinking: its text comes before the JSON and needs its newlines.
        body["logit_bias"] = [list(ban) for ban in NO_NEWLINE_TOKENS]  # (each body its own list)
    if request.effort is not None:
        body["reasoning_effort"] = REASONING_EFFORT[request.effort]
    if request.thinking == "disabled":
        body["chat_template_kwargs"] = {"enable_thinking": False}
    elif request.wants_thinking:
        body["chat_template_kwargs"] = {"enable_thinking": True}
        if request.thinking_budget is not None:
            # llama-server's name (tools/server/server-common.cpp); it applies when the
            # model's template has thinking tags.
            body["reasoning_budget_tokens"] = request.thinking_budget
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        # prompt_progress chunks arrive while the prompt is processed: message_start then
        # carries the real input token count, and long prefills become pings.
        body["return_progress"] = True
    else:
        body["stream"] = False
    return body


def to_chat_messages(request: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation in llama-server's (OpenAI) message shape, system prompt first."""
    out: list[dict[str, Any]] = []
    if request.system:
        out.append({"role": "system", "content": "\n\n".join(b["text"] for b in request.system)})
    for message in request.messages:
        role = message["role"]
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif role == "assistant":
            out.append(_assistant(content))
        elif role == "system":
            out.append({"role": "system", "content": _joined_text(content)})
        else:
            out.extend(_user(content))
    return out


def repairable_tools(request: MessagesRequest) -> frozenset[str]:
    """The tools whose calls may be read from the answer's text (translate/repair.py): those
    of a forced strict call (the grammar held the text to their schemas), or, when tools may
    be called, the ones that are not strict (a strict tool's input must be grammar-held)."""
    forced = forced_strict_tools(request)
    if forced:
        return frozenset(t["name"] for t in forced)
    # (Structured outputs come with no callable tools: anthropic/schema.py refuses the mix.)
    if not request.tools or (request.tool_choice or {}).get("type") == "none":
        return frozenset()
    return frozenset(t["name"] for t in request.tools if not t.get("strict"))


def forced_strict_tools(request: MessagesRequest) -> list[dict[str, Any]]:
    """The tools a forced call (tool_choice any or tool) may use, when all are strict."""
    choice = request.tool_choice or {"type": "auto"}
    if not request.tools or choice["type"] not in ("any", "tool"):
        return []
    tools = request.tools if choice["type"] == "any" else [t for t in request.tools if t["name"] == choice["name"]]
    return tools if tools and all(t.get("strict") is True for t in tools) else []


def forced_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """One call of one of `tools`: `{"name": ..., "arguments": {...}}`."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t["name"]}, "arguments": t["input_schema"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _with_tool_instructions(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    listing = "\n".join(
        orjson.dumps(
            {"name": t["name"], "description": t.get("description", ""), "parameters": t["input_schema"]}
        ).decode()
        for t in tools
    )
    return _with_instruction(
        messages,
        "Call one of these tools. Answer with only a JSON object "
        '{"name": <tool name>, "arguments": <its arguments>}:\n' + listing,
    )


def _with_instruction(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` at the end of the leading system message (one is made if there is none)."""
    if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def fold_system_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every system message but a leading one, moved into the next user message as tagged
    text (or the last one, when none follows): for templates that refuse a system turn
    anywhere but first, as Gemma 3's and Qwen's do (`raise_exception`)."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            pending.append(SYSTEM_OPEN + _text_of(message["content"]) + SYSTEM_CLOSE)
            continue
        if message["role"] == "user" and pending:
            message = {**message, "content": _prefixed(message["content"], "\n\n".join(pending) + "\n\n")}
            pending = []
        out.append(message)
    if pending:
        tail = "\n\n".join(pending)
        last_user = next((j for j in range(len(out) - 1, -1, -1) if out[j]["role"] == "user"), None)
        if last_user is None or any(m["role"] == "assistant" for m in out[last_user + 1 :]):
            out.append({"role": "user", "content": tail})
        else:
            out[last_user] = {**out[last_user], "content": _suffixed(out[last_user]["content"], "\n\n" + tail)}
    return out


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def _prefixed(content: Any, text: str) -> Any:
    if isinstance(content, str):
        return text + content
    return [{"type": "text", "text": text}, *content]


def _suffixed(content: Any, text: str) -> Any:
    if isinstance(content, str):
        return content + text
    return [*content, {"type": "text", "text": text}]


def _assistant(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        kind = block["type"]
        if kind == "text":
            texts.append(block["text"])
        elif kind == "thinking":
            reasoning.append(block["thinking"])
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": orjson.dumps(block["input"]).decode()},
                }
            )
        # redacted_thinking carries nothing a local model can read: dropped.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _user(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results first, as `tool` messages in order; then the rest as one user message."""
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in blocks:
        if block["type"] == "tool_result":
            text, images = _tool_result_content(block.get("content"))
            if block.get("is_error"):
                text = f"Error: {text}" if text else "Error"
            tool_messages.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            parts.extend(images)
        else:
            part = _part(block)
            if part is not None:
                parts.append(part)
    out = tool_messages
    if parts:
        out.append({"role": "user", "content": _content(parts)})
    elif not tool_messages:
        out.append({"role": "user", "content": ""})
    return out


def _tool_result_content(content: Any) -> tuple[str, list[dict[str, Any]]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for block in content:
        part = _part(block)
        if part is None:
            continue
        if part["type"] == "text":
            texts.append(part["text"])
        else:
            images.append(part)
    return "\n".join(texts), images


def _part(block: dict[str, Any]) -> dict[str, Any] | None:
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": block["text"]}
    if kind == "image":
        source = block["source"]
        if source["type"] == "base64":
            url = f"data:{source['media_type']};base64,{source['data']}"
        else:
            url = source["url"]
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "document":
        return {"type": "text", "text": _document_text(block)}
    if kind == "search_result":
        # A search result the client ran itself: its title, source and passages as text.
        passages = "\n".join(b["text"] for b in block["content"])
        return {"type": "text", "text": f"{block['title']}\n{block['source']}\n\n{passages}"}
    return None  # thinking blocks in a user turn have no meaning: dropped


def _document_text(block: dict[str, Any]) -> str:
    source = block["source"]
    if source["type"] == "text":
        text = source["data"]
    else:
        inner = source["content"]
        text = inner if isinstance(inner, str) else "\n".join(b["text"] for b in inner)
    title = block.get("title")
    return f"{title}\n\n{text}" if isinstance(title, str) and title else text


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A plain string unless there are images: every chat template takes strings."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _joined_text(blocks: list[dict[str, Any]]) -> str:
    return "\n".join(b["text"] for b in blocks if b.get("type") == "text")


def _tools(request: MessagesRequest) -> dict[str, Any]:
    tools = request.tools or []
    choice = request.tool_choice or {"type": "auto"}
    if choice["type"] == "tool":
        # llama-server takes tool_choice only as a string (an object silently means "auto"):
        # "this tool" is "required" with the list narrowed to that one tool.
        tools = [t for t in tools if t["name"] == choice["name"]]
    mapped = {"auto": "auto", "any": "required", "tool": "required", "none": "none"}[choice["type"]]
    return {
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    "description": t.get("description", ""),
                    "parameters": t["input_schema"],
                },
            }
            for t in tools
        ],
        "tool_choice": mapped,
        "parallel_tool_calls": not choice.get("disable_parallel_tool_use", False),
    }

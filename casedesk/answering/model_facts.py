"""What a model's llama-server says about itself, asked once and kept in its ModelFacts.

- Its context window: one slot's `n_ctx` from `GET /props` (`-c` divided by `-np`). A managed
  model that is not running is not started to answer `/v1/models`: its window comes from
  what it reported when it last ran, or from its `-c`/`-np` args.
- Whether its chat template takes a system turn that is not the first: `POST /apply-template`
  of a probe conversation. Templates that refuse one (Gemma 3's and Qwen's official ones
  `raise_exception`) make llama-server answer an error; such a model gets its later system
  turns folded into the next user turn (translate/request.py, `fold_system_turns`).

Probes use `call_json` on one upstream directly, not the failover path: a template's refusal
is a fact about the model, not a fault of the upstream, and must not move its health.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from casedesk.serving import ModelState
from casedesk.upstream.client import call_json
from casedesk.upstream.connection import UpstreamError

log = logging.getLogger("casedesk.model_facts")

# A system turn between user turns, as Claude Code sends (since 2.1.154).
SYSTEM_PROBE = {
    "messages": [
        {"role": "system", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
        {"role": "system", "content": "d"},
        {"role": "user", "content": "e"},
    ]
}


def window_from_args(args: Sequence[str]) -> int | None:
    """One slot's context from llama-server's `-c N` and `-np P` (None without `-c`)."""
    values: dict[str, str] = {}
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name in ("-c", "--ctx-size", "-np", "--parallel"):
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
            values["c" if name in ("-c", "--ctx-size") else "np"] = value
    try:
        ctx = int(values["c"])
        parallel = int(values.get("np", "1"))
    except (KeyError, ValueError):
        return None
    if ctx <= 0 or parallel <= 0:
        return None
    return ctx // parallel


def slot_context(props: Any) -> int | None:
    """`default_generation_settings.n_ctx` of a `/props` answer: one slot's window."""
    if not isinstance(props, dict):
        return None
    settings = props.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    return n_ctx if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0 else None


async def context_window(model: ModelState, timeout: float) -> int | None:
    """The model's context window, or None when nothing says."""
    facts = model.facts
    managed = model.managed
    if managed is not None and managed.on_demand():
        return facts.context_window or window_from_args(managed.process.spec.args)
    for state in model.balancer.candidates():
        try:
            status, props = await call_json(state.pool, "GET", "/props", None, timeout)
        except UpstreamError as exc:
            log.info("GET /props on %s failed: %s", state.pool.authority, exc)
            continue
        window = slot_context(props) if status == 200 else None
        if window is not None:
            facts.context_window = window
            return window
    if facts.context_window is not None:
        return facts.context_window
    return window_from_args(managed.process.spec.args) if managed is not None else None


async def takes_mid_system_turns(model: ModelState, timeout: float) -> bool:
    """Whether the model's template renders a system turn after the first (probed once).

    Called inside the model's lease (a managed model is running). When no upstream answers
    the probe, the answer is "yes" for now (nothing is folded) and the probe runs again."""
    facts = model.facts
    if facts.mid_system_ok is not None:
        return facts.mid_system_ok
    for state in model.balancer.candidates():
        try:
            status, answer = await call_json(state.pool, "POST", "/apply-template", SYSTEM_PROBE, timeout)
        except UpstreamError:
            continue
        facts.mid_system_ok = status == 200 and isinstance(answer, dict) and isinstance(answer.get("prompt"), str)
        if not facts.mid_system_ok:
            log.info("%s: the chat template refuses a later system turn (%s); such turns are folded", model.tag, answer)
        return facts.mid_system_ok
    return True


def has_later_system_turn(messages: list[dict[str, Any]]) -> bool:
    """A system turn the template would see after the first message."""
    return any(m["role"] == "system" for m in messages)

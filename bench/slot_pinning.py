"""Issue 11 item 3, inside one llama-server: does pinning a conversation to a slot (`id_slot`)
beat llama-server's own slot choice plus its `--cache-ram`? Straight to llama-server, one
fresh server per mode, the traffic one server of the fleet carries (`make bench-fleet
--slot-pinning`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from typing import Any

from bench.fleet_traffic import system_prompt
from bench.llama import start_llama_servers
from bench.load import pct
from bench.procs import Processes


def post_chat(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as answer:
        return dict(json.loads(answer.read()))


async def slot_conversation(
    url: str,
    name: str,
    index: int,
    pin: int,
    args: argparse.Namespace,
    gate: asyncio.Semaphore,
    results: list[tuple[int, float, int, int]],
) -> None:
    """One conversation straight to llama-server; pin > 0: `id_slot = index % pin`."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt(name, args.prompt_words)}]
    for turn in range(args.turns):
        messages.append({"role": "user", "content": f"Question {turn} for {name}: what is the weather?"})
        body: dict[str, Any] = {"messages": messages, "max_tokens": args.tokens, "temperature": 0}
        if pin:
            body["id_slot"] = index % pin
        async with gate:
            answer = await asyncio.to_thread(post_chat, url, body)
        usage, timings = answer["usage"], answer.get("timings", {})
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        results.append((turn, float(timings.get("prompt_ms", 0)), usage["prompt_tokens"], cached))
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})


async def bench_slot_pinning(args: argparse.Namespace, procs: Processes) -> list[dict[str, Any]]:
    """Issue 11 item 3: inside one llama-server, does pinning a conversation to a slot
    (`id_slot`, deferred while that slot is busy) beat llama-server's own slot choice plus its
    `--cache-ram`? Straight to llama-server, one fresh server per mode, same traffic."""
    rows = []
    conversations = args.conversations // args.servers  # what one server of the fleet carries
    in_flight = max(1, args.in_flight // args.servers)
    for mode in ("llama-server's choice", "id_slot pinned"):
        server = Processes()
        try:
            (url,) = start_llama_servers(server, 1, args)
            gate = asyncio.Semaphore(in_flight)
            results: list[tuple[int, float, int, int]] = []  # turn, prompt ms, prompt tokens, cached

            started = time.perf_counter()
            pin = args.slots if mode == "id_slot pinned" else 0
            await asyncio.gather(
                *(slot_conversation(url, f"slots-{pin}-{i}", i, pin, args, gate, results) for i in range(conversations))
            )
            wall = time.perf_counter() - started
        finally:
            server.stop()
        later = [r for r in results if r[0] > 0]
        row = {
            "mode": mode,
            "conversations": conversations,
            "in_flight": in_flight,
            "later_cached_share": sum(r[3] for r in later) / max(1, sum(r[2] for r in later)),
            "later_prompt_ms_p50": pct(sorted(r[1] for r in later), 50),
            "wall_s": wall,
        }
        print(f"slot pinning: {row}", flush=True)
        rows.append(row)
    return rows

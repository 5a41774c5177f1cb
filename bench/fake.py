"""`make bench`: the direct upstream, the floor relay and CaseDesk side by side, in one run.

The upstream is tests/fake_llama.py (the real server's bytes; like it, a connection closed
after every stream; tokens sent as fast as the socket takes them), each server under test in
its own process. Per concurrency the targets run one after the other, so that all of them see
the same machine; CaseDesk's figures are also given against the direct upstream (added time
to first token) and against the floor (CPU per token ÷ the bare relay's: bench/floor.py).

The processes are pinned (bench/procs.py `two_cpus`, `pin`): the fake upstream on one CPU, the
server under test and this load generator on the other. Left to the scheduler, three busy
processes on the 2-core box took one of two layouts from run to run, and the one-stream row
followed the layout, not the code: in five runs of 1c5f739 (2026-12-04) the floor's added first
token was +0.19–0.28 ms in four and +0.52 in the fifth, its CPU 3.2–5.2 µs a token, and
CaseDesk's ÷ floor read 1.41–1.91. Pinning each layout by hand reproduced each mode (the
floor's first token at 0.39 ms with the load generator on the upstream's CPU, 0.77 on the
relay's; bench/results/issue23-session6-runs.md). This layout is the one that flatters CaseDesk
least against the direct upstream: the direct client has a core to itself, while a gateway's
client shares the gateway's, so that the first token waits for the gateway to let its client
run. Pinned, three runs of 1c5f739 gave CaseDesk ÷ floor 1.29, 1.31, 1.29 and +0.57 ms of added
first token each time. `--no-pin` measures the old way.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import orjson

from bench.load import (
    OPENAI_BODY,
    OPENAI_MARKER,
    OPENAI_PATH,
    Target,
    anthropic_target,
    interleaved,
    scenario,
    slow_streams_rss,
)
from bench.procs import (
    Processes,
    free_port,
    pin,
    python_module,
    start_casedesk,
    start_fake_llama,
    two_cpus,
    wait_port,
)
from bench.profiling import profile_gateway
from bench.report import fmt_row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--rounds", type=int, default=8, help="rounds that take the targets in turn")
    parser.add_argument("--streams", type=int, default=200, help="streams per target at one stream at a time")
    parser.add_argument("--slow-streams", type=int, default=500, help="held open at once for the memory figure")
    parser.add_argument("--peer", help="another Anthropic-compatible gateway's base URL on the same fake upstream")
    parser.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also the CaseDesk of the checkout at PATH, as target NAME (before and after in one run)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile tables")
    parser.add_argument(
        "--no-pin", action="store_true", help="leave the processes where the scheduler puts them (see the docstring)"
    )


def start_floor(procs: Processes, upstream_port: int, cpus: frozenset[int] | None = None) -> tuple[int, int]:
    port = free_port()
    process = procs.start(python_module("bench.floor", "--port", str(port), "--upstream-port", str(upstream_port)))
    wait_port(port)
    pin(process.pid, cpus)
    return port, process.pid


def peer_target(url: str, tokens: int) -> Target:
    port = int(url.split(":")[2].split("/")[0])
    target = anthropic_target("peer", port, tokens)
    target.path = "/" + url.split("/", 3)[3].rstrip("/") + "/v1/messages" if url.count("/") > 2 else "/v1/messages"
    return target


async def run(args: argparse.Namespace, procs: Processes, config_dir: Path) -> dict[str, Any]:
    cpus = None if args.no_pin else two_cpus()
    upstream_cpu, tested_cpu = cpus or (None, None)
    pin(os.getpid(), tested_cpu)  # the load generator
    fast_port = start_fake_llama(procs, args.tokens, 0, upstream_cpu)
    slow_port = start_fake_llama(procs, 50, 0.02, upstream_cpu)
    upstream = f"http://127.0.0.1:{fast_port}"
    floor_port, floor_pid = start_floor(procs, fast_port, tested_cpu)
    gw_port, gw = start_casedesk(procs, upstream, config_dir, cpus=tested_cpu)
    targets = [
        Target("direct", fast_port, OPENAI_PATH, OPENAI_BODY, OPENAI_MARKER),
        Target("floor", floor_port, OPENAI_PATH, OPENAI_BODY, OPENAI_MARKER, pid=floor_pid),
        anthropic_target("casedesk", gw_port, args.tokens, gw.pid),
    ]
    for spec in args.checkout:
        name, _, path = spec.partition("=")
        port, process = start_casedesk(procs, upstream, config_dir, Path(path).resolve(), tested_cpu)
        targets.append(anthropic_target(name, port, args.tokens, process.pid))
    if args.peer:
        targets.append(peer_target(args.peer, args.tokens))
    rows = []
    for target in targets:  # warm up connections and code paths
        await scenario(target, 4, 8)
    for concurrency in args.concurrency:
        # Enough streams for a steady p50 at one stream (a few dozen is a coin toss on a VM);
        # two waves a round at higher concurrency, so that some streams start while others run
        # (one wave a round measured a burst: ÷ floor moved by ±20 % between runs at 256).
        streams = max(args.streams, 2 * concurrency * args.rounds)
        for row in await interleaved(targets, concurrency, streams, args.rounds):
            rows.append(row)
            print(fmt_row(row), flush=True)
    result: dict[str, Any] = {
        "rows": rows,
        "gateways": [t.name for t in targets if t.path != OPENAI_PATH],
        "layout": _layout(cpus),
    }
    result["per_request"] = await cpu_per_request([t for t in targets if t.pid])
    if not args.no_profile:
        result["profile"] = await profile_gateway(procs, fast_port, config_dir, tokens=args.tokens)
    if args.slow_streams:
        slow_gw_port, slow_gw = start_casedesk(procs, f"http://127.0.0.1:{slow_port}", config_dir, cpus=tested_cpu)
        slow = anthropic_target("casedesk", slow_gw_port, 50, slow_gw.pid)
        result["slow_streams"] = await slow_streams_rss(slow, args.slow_streams)
        print(f"slow streams: {result['slow_streams']}", flush=True)
    result["upstream_connections"] = await upstream_connections(procs, config_dir)
    print(f"upstream connections opened per 200 requests: {result['upstream_connections']}", flush=True)
    return result


def _layout(cpus: tuple[frozenset[int], frozenset[int]] | None) -> str:
    if cpus is None:
        return "processes where the scheduler put them (--no-pin, or one CPU)"
    upstream, tested = (", ".join(map(str, sorted(c))) for c in cpus)
    return f"the fake upstream on CPU {upstream}; the server under test and the load generator on CPU {tested}"


async def cpu_per_request(targets: list[Target], requests: int = 200) -> list[dict[str, Any]]:
    """CPU per request of each relay: `requests` one-token answers, one at a time, interleaved
    in rounds so that all relays see the same machine."""
    one_token = []
    for target in targets:
        body = orjson.loads(target.body)
        body["max_tokens"] = 1
        one_token.append(dataclasses.replace(target, body=orjson.dumps(body)))
    spent = dict.fromkeys((t.name for t in one_token), 0.0)
    rounds = 4
    for _ in range(rounds):
        for target in one_token:
            row = await scenario(target, 1, requests // rounds)
            spent[target.name] += row["cpu_us_per_token"] * row["tokens"]
    rows = [{"target": name, "cpu_us_per_request": total / requests} for name, total in spent.items()]
    print("CPU per one-token request:", ", ".join(f"{r['target']} {r['cpu_us_per_request']:.0f} µs" for r in rows))
    return rows


async def upstream_connections(procs: Processes, config_dir: Path, requests: int = 200) -> dict[str, Any]:
    """Connections one CaseDesk opens to the fake llama-server for `requests` streamed requests,
    one at a time and 16 at a time. The fake runs in this process to be counted; like the real
    server it closes the connection after every stream (docs/llama-server-facts.md §4)."""
    from tests.fake_llama import FakeLlamaServer, Reply

    fake = await FakeLlamaServer(Reply(tokens=["x"] * 8)).start()
    try:
        port, _gw = await asyncio.to_thread(start_casedesk, procs, fake.url, config_dir)
        target = anthropic_target("c", port, 8)
        opened: dict[str, Any] = {}
        for concurrency in (1, 16):
            before = fake.connections_accepted
            row = await scenario(target, concurrency, requests)
            opened[f"concurrency {concurrency}"] = {
                "connections": fake.connections_accepted - before,
                "ttft_p50_ms": round(row["ttft_p50_ms"], 2),
            }
        return opened
    finally:
        await fake.close()

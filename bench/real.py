"""`make bench-real`: CaseDesk against llama-server's own /v1/messages, on the real model.

The same streamed request to both, interleaved run by run so that both see the same machine;
llama-server on one thread by default, which leaves a core to the gateway and the load
generator (with two it busy-polls both: docs/llama-server-facts.md §10). Then the time to the
first token, in pairs of short requests (`--ttft-pairs`): the issue's "within 1 ms of
llama-server's own" is a difference far smaller than a long run's TTFT moves by.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from bench.load import StreamResult, Target, anthropic_target, one_stream
from bench.llama import start_llama_server
from bench.procs import Processes, start_casedesk, wait_http

PROMPT = "Write a long story about a lighthouse keeper."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=200, help="max_tokens of each run")
    parser.add_argument("--runs", type=int, default=10, help="runs of each, interleaved")
    parser.add_argument(
        "--ttft-pairs", type=int, default=100, help="short requests of each, in pairs, for the time to first token"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama-server threads; 1 leaves a core to the gateway and the load generator",
    )


async def run(args: argparse.Namespace, procs: Processes, config_dir: Path) -> dict[str, Any]:
    url = start_llama_server(procs, ["-c", "4096", "-np", "1", "-t", str(args.threads)])
    wait_http(f"{url}/health", 300)
    port = int(url.rsplit(":", 1)[1])
    gw_port, gw = start_casedesk(procs, url, config_dir)
    own = anthropic_target("llama-server /v1/messages", port, args.tokens, prompt=PROMPT)
    own.path = "/v1/messages"
    ours = anthropic_target("casedesk", gw_port, args.tokens, gw.pid, prompt=PROMPT)
    await one_stream(own)
    await one_stream(ours)
    runs: dict[str, list[StreamResult]] = {own.name: [], ours.name: []}
    targets: tuple[Target, Target] = (own, ours)
    for i in range(args.runs):  # interleaved, so both see the same machine; who goes first alternates
        for target in targets if i % 2 == 0 else targets[::-1]:
            runs[target.name].append(await one_stream(target))
    summary = {}
    for name, results in runs.items():
        rates = [(r.tokens - 1) / sum(r.gaps) for r in results if r.gaps]
        summary[name] = {
            "runs": len(results),
            "tokens": results[0].tokens,
            "tokens_per_s_median": statistics.median(rates),
            # llama-server's own pace moves ~±10 % from run to run: the spread says how far
            # apart two medians must be before they differ
            "tokens_per_s_quartiles": _quartiles(rates),
            "ttft_ms_median": statistics.median(r.ttft for r in results) * 1e3,
        }
    ratio = summary["casedesk"]["tokens_per_s_median"] / summary[own.name]["tokens_per_s_median"]
    print(json.dumps(summary, indent=1), f"\nratio casedesk / llama-server own: {ratio:.4f}", flush=True)
    ttft = await _paired_ttft(own, ours, args.ttft_pairs)
    print(f"time to first token, paired: {ttft}", flush=True)
    return {"real": summary, "ratio": ratio, "threads": args.threads, "ttft_pairs": ttft}


async def _paired_ttft(own: Target, ours: Target, pairs: int) -> dict[str, Any]:
    """CaseDesk's added time to the first token, measured in pairs of short requests (3
    tokens), one to each right after the other, who goes first alternating: a 200-token run's
    TTFT moves by milliseconds with llama-server's own prompt time (the same 5-token prompt took
    36-64 ms), a pair's difference far less."""
    short = [_with_max_tokens(t, 3) for t in (own, ours)]
    times: dict[str, list[float]] = {t.name: [] for t in short}
    for target in short:
        await one_stream(target)
    for i in range(pairs):
        for target in short if i % 2 == 0 else short[::-1]:
            times[target.name].append((await one_stream(target)).ttft * 1e3)
    added = [a - b for a, b in zip(times[ours.name], times[own.name], strict=True)]
    return {
        "pairs": pairs,
        "own_ms_median": statistics.median(times[own.name]),
        "casedesk_ms_median": statistics.median(times[ours.name]),
        "added_ms_median": statistics.median(added),
        "added_ms_quartiles": _quartiles(added),
    }


def _with_max_tokens(target: Target, tokens: int) -> Target:
    body = json.loads(target.body)
    body["max_tokens"] = tokens
    return dataclasses.replace(target, body=json.dumps(body).encode())


def _quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles (the values themselves when there are too few)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]

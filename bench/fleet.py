"""`make bench-fleet`: prefix-aware routing against least-in-flight over several real llama-servers.

Each (variant, balance) run gets fresh llama-servers, so that no run inherits another's cache;
runs interleave (each repetition runs every variant and balance) so that a machine's drift
falls on all of them. What is counted: the share of later turns' prompt tokens that were
cached, time to first token, and how evenly the upstreams were loaded (from the access logs).
See README, "Fleets".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.fleet_traffic import Turn, converse
from bench.load import pct
from bench.procs import ROOT, Processes, free_port, wait_http
from bench.llama import start_llama_servers
from bench.report import fmt_fleet
from bench.slot_pinning import bench_slot_pinning


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2, help="llama-server -np")
    parser.add_argument("--ctx", type=int, default=8192, help="llama-server -c (shared by its slots)")
    parser.add_argument(
        "--llama-args",
        default="--swa-full",
        help="more llama-server arguments (default --swa-full: Gemma 3's sliding-window layers keep "
        "their whole cache, so a conversation restored from --cache-ram is whole; see the README)",
    )
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens: small, so prefill dominates")
    parser.add_argument("--prompt-words", type=int, default=1050, help="system prompt words (~1,300 tokens)")
    parser.add_argument("--hot-branches", type=int, default=16)
    parser.add_argument("--think", type=float, default=2.0, help="pause before a turn: up to this many s")
    parser.add_argument("--slot-pinning", action="store_true", help="also id_slot vs llama-server's choice")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant and balance, pooled")
    parser.add_argument(
        "--balances",
        nargs="+",
        default=["least_in_flight", "prefix"],
        help="least_in_flight, prefix; BALANCE@PATH: the CaseDesk checkout at PATH (e.g. prefix@/work/main)",
    )
    parser.add_argument("--abs-threshold", type=int, help="balance_abs_threshold (default: CaseDesk's)")
    parser.add_argument("--variants", nargs="*", help="main, two-instance, skewed (default: all)")


def start_fleet_gateway(
    procs: Processes, upstreams: list[str], balance: str, config_dir: Path, abs_threshold: int | None = None
) -> tuple[str, Path]:
    port = free_port()
    log = config_dir / f"access-{port}.log"
    config = config_dir / f"fleet-{port}.toml"
    listed = ", ".join(f'"{u}"' for u in upstreams)
    # "prefix@/path/to/checkout": that checkout's CaseDesk, to compare two versions in one run.
    balance, _, checkout = balance.partition("@")
    root = Path(checkout) if checkout else ROOT
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\naccess_log = "{log}"\nupstream_read_timeout = 600\n'
        f"[deployments.bench]\nmax_concurrency = 64\n"
        f'[deployments.bench.models.m]\nupstreams = [{listed}]\nbalance = "{balance}"\n'
        + (f"balance_abs_threshold = {abs_threshold}\n" if abs_threshold else "")
    )
    command = [sys.executable, "-m", "casedesk", "serve", "--config", str(config), "--log-level", "warning"]
    procs.start(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    wait_http(f"http://127.0.0.1:{port}/healthz", 60)
    return f"http://127.0.0.1:{port}/proxy/bench/anthropic", log


def fleet_summary(turns: list[Turn], logs: list[Path], upstreams: list[str], wall: float) -> dict[str, Any]:
    later = [t for t in turns if t.turn > 0]
    first = [t for t in turns if t.turn == 0]
    requests = {u.removeprefix("http://"): 0 for u in upstreams}
    work = dict.fromkeys(requests, 0)  # prompt tokens it had to compute (not cached) + generated
    for log in logs:
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("upstream") in requests and entry["status"] == 200:
                requests[entry["upstream"]] += 1
                work[entry["upstream"]] += entry["input_tokens"] - entry["cached_tokens"] + entry["output_tokens"]
    mean = sum(requests.values()) / len(requests)
    mean_work = sum(work.values()) / len(work)
    return {
        "requests": len(turns),
        "later_cached_share": sum(t.cached_tokens for t in later) / max(1, sum(t.prompt_tokens for t in later)),
        "later_misses": sum(t.cached_tokens * 2 < t.prompt_tokens for t in later),  # less than half cached
        "prompt_tokens_mean": statistics.mean(t.prompt_tokens for t in turns),
        "ttft_first_p50_ms": pct(sorted(t.ttft for t in first), 50) * 1e3,
        "ttft_first_p99_ms": pct(sorted(t.ttft for t in first), 99) * 1e3,
        "ttft_later_p50_ms": pct(sorted(t.ttft for t in later), 50) * 1e3,
        "ttft_later_p99_ms": pct(sorted(t.ttft for t in later), 99) * 1e3,
        "tokens_per_s": sum(t.tokens for t in turns) / wall,
        "wall_s": wall,
        "requests_per_upstream": list(requests.values()),
        "work_per_upstream": list(work.values()),
        "max_over_mean_requests": max(requests.values()) / mean if mean else float("nan"),
        "max_over_mean_work": max(work.values()) / mean_work if mean_work else float("nan"),
    }


def pooled_summary(variant: str, balance: str, turns: list[Turn], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One (variant, balance) over all its runs: shares and percentiles of the pooled turns,
    the worst run's spread (each run hashes conversations anew)."""
    runs = [r for r in rows if (r["variant"], r["balance"]) == (variant, balance)]
    later = [t for t in turns if t.turn > 0]
    first = [t for t in turns if t.turn == 0]
    return {
        "variant": variant,
        "balance": balance,
        "runs": len(runs),
        "later_cached_share": sum(t.cached_tokens for t in later) / max(1, sum(t.prompt_tokens for t in later)),
        "later_cached_share_min": min(r["later_cached_share"] for r in runs),
        "later_misses": sum(r["later_misses"] for r in runs),
        "later_turns": len(later),
        "ttft_first_p50_ms": pct(sorted(t.ttft for t in first), 50) * 1e3,
        "ttft_later_p50_ms": pct(sorted(t.ttft for t in later), 50) * 1e3,
        "ttft_later_p99_ms": pct(sorted(t.ttft for t in later), 99) * 1e3,
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
        "max_over_mean_requests_worst": max(r["max_over_mean_requests"] for r in runs),
        "max_over_mean_work_worst": max(r["max_over_mean_work"] for r in runs),
    }


async def run(args: argparse.Namespace, procs: Processes, config_dir: Path) -> dict[str, Any]:
    """Each (variant, balance) run gets fresh llama-servers, so no run inherits another's cache."""
    variants: dict[str, tuple[dict[str, int], dict[str, int], int]] = {
        "main": ({f"c{i}": args.turns for i in range(args.conversations)}, {}, 1),
        "two-instance": ({f"c{i}": args.turns for i in range(args.conversations)}, {}, 2),
        "skewed": (
            {"hot": 2, **{f"cold{i}": 2 for i in range(args.conversations)}},
            {"hot": args.hot_branches},
            1,
        ),
    }
    rows = []
    pooled: dict[tuple[str, str], list[Turn]] = {}
    # Runs interleave (each repetition runs every variant and balance) so that a machine's
    # drift falls on all of them; each repetition has its own prompts, pauses and ports (the
    # ports name the upstreams, so each repetition hashes conversations anew).
    for repetition in range(args.repeat):
        for variant, (conversations, branches, instances) in variants.items():
            if args.variants and variant not in args.variants:
                continue
            for balance in args.balances:
                fleet = Processes()
                try:
                    upstreams = start_llama_servers(fleet, args.servers, args)
                    gateways = [
                        start_fleet_gateway(fleet, upstreams, balance, config_dir, args.abs_threshold)
                        for _ in range(instances)
                    ]
                    # The same prompts and pauses for every balance (fresh servers: no cache is inherited).
                    tagged = {f"{variant}{repetition}-{name}": count for name, count in conversations.items()}
                    hot = {f"{variant}{repetition}-{name}": count for name, count in branches.items()}
                    started = time.perf_counter()
                    bases = [base for base, _ in gateways]
                    words, think = args.prompt_words, args.think
                    turns = await converse(bases, tagged, args.in_flight, args.tokens, words, hot, think)
                    wall = time.perf_counter() - started
                finally:
                    fleet.stop()
                summary = fleet_summary(turns, [log for _, log in gateways], upstreams, wall)
                row = {"variant": variant, "balance": balance, "run": repetition, **summary}
                row["turns"] = [asdict(t) for t in turns]  # for the JSON: every turn's figures
                rows.append(row)
                pooled.setdefault((variant, balance), []).extend(turns)
                print(fmt_fleet(row), flush=True)
    summaries = [pooled_summary(variant, balance, turns, rows) for (variant, balance), turns in pooled.items()]
    pinning = await bench_slot_pinning(args, procs) if args.slot_pinning else []
    return {
        "fleet": rows,
        "fleet_pooled": summaries,
        "slot_pinning": pinning,
        "fleet_setup": {
            "servers": args.servers,
            "slots": args.slots,
            "conversations": args.conversations,
            "turns": args.turns,
            "in_flight": args.in_flight,
            "max_tokens": args.tokens,
            "llama_args": args.llama_args,
            "hot_branches": args.hot_branches,
            "repeat": args.repeat,
        },
    }

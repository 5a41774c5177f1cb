"""`make bench-instructions`: CaseDesk's own CPU work counted in instructions, not seconds.

On these shared VMs a CPU-time figure moves by ±10-20 % between runs of the same code (a
neighbour's load, where the scheduler puts each process, how the reads happen to batch); a
cut of 3 % is invisible in it. `valgrind --tool=callgrind` counts the instructions a process
runs in user space: the same count for the same code and requests, whatever else the machine
does (±0.1 % for one-token requests; ±2 % for streams, whose reads still batch as they
happen). So each CaseDesk (this checkout and every `--checkout`) runs under callgrind in front
of the fake llama-server (tests/fake_llama.py, in its own process, not counted), and for each
shape of load its counter is zeroed after a warm-up and read after the measured requests
(`callgrind_control`): instructions per request, and per token. The paced shape (a second fake
that sends a token every 2 ms) reads one token a read, as a real model's streams do; the
others' fake sends as fast as the socket takes, so their reads batch tokens.

What it leaves out: the kernel's side of each syscall, and time spent waiting (callgrind makes
the gateway ~50× slower, so reads batch more than at full speed; compare checkouts with it, and
keep `make bench` for the times and the floor).

    python -m bench instructions [--checkout before=PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench.load import Target, anthropic_target, measure
from bench.procs import ROOT, Processes, free_port, start_fake_llama, wait_http

# (name, tokens per answer, streams at once, streams measured, model): model "m" answers at once
# (reads batch tokens), "paced" a token every PACE seconds (one token a read, as a real model's)
SHAPES = [
    ("one-token requests", 1, 1, 200, "m"),
    ("256-token streams", 256, 1, 40, "m"),
    ("256 tokens, 16 at once", 256, 16, 64, "m"),
    ("64-token streams, a token every 2 ms", 64, 1, 20, "paced"),
]
PACE = 0.002  # (libuv's timers count milliseconds: a shorter pace would batch tokens again)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also the CaseDesk of the checkout at PATH, as NAME",
    )


def _config(directory: Path, port: int, upstream: str, paced: str) -> Path:
    config = directory / f"counted-{port}.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nmax_connections = 4096\nhealth_interval = 3600\n'
        f"[deployments.bench]\nmax_concurrency = 1024\nmax_queue = 4096\n"
        f'[deployments.bench.models.m]\nupstreams = ["{upstream}"]\nmax_connections = 1024\n'
        f'[deployments.bench.models.paced]\nupstreams = ["{paced}"]\nmax_connections = 1024\n'
    )
    return config


def _counted(out: Path) -> int:
    """Instructions in the dumps callgrind_control wrote (out.1, out.2…; `out` is the exit's)."""
    total = 0
    for dump in glob.glob(f"{out}.*"):
        found = re.findall(r"^totals: (\d+)", Path(dump).read_text(), re.M)
        total += int(found[-1]) if found else 0
    return total


def _with_tokens(target: Target, tokens: int, model: str = "m") -> Target:
    body = orjson.loads(target.body)
    body["max_tokens"] = tokens
    body["model"] = model
    return dataclasses.replace(target, body=orjson.dumps(body))


async def _count(procs: Processes, checkout: Path, upstreams: tuple[str, str], directory: Path) -> dict[str, Any]:
    port = free_port()
    out = directory / f"callgrind-{port}.out"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "casedesk",
        "serve",
        "--config",
        str(_config(directory, port, *upstreams)),
        "--log-level",
        "warning",
    ]
    process = procs.start(command, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)})
    wait_http(f"http://127.0.0.1:{port}/healthz", 600)
    counts: dict[str, Any] = {}
    for name, tokens, concurrency, streams, model in SHAPES:
        target = _with_tokens(anthropic_target("counted", port, 256), tokens, model)
        await measure(target, concurrency, 8)  # warm-up, uncounted
        subprocess.run(["callgrind_control", "--zero", str(process.pid)], check=True, capture_output=True)
        before = _counted(out)
        sample = await measure(target, concurrency, streams)
        subprocess.run(["callgrind_control", "--dump", str(process.pid)], check=True, capture_output=True)
        time.sleep(0.5)
        spent = _counted(out) - before
        got = sum(r.tokens for r in sample.results)
        counts[name] = {"per_request": spent / streams, "per_token": spent / got if got else None}
        print(f"{checkout.name or checkout}: {name}: {spent / streams / 1e3:,.0f} k a request", flush=True)
    return counts


async def run(args: argparse.Namespace, procs: Processes, config_dir: Path) -> dict[str, Any]:
    upstreams = (
        f"http://127.0.0.1:{start_fake_llama(procs, 256, 0)}",
        f"http://127.0.0.1:{start_fake_llama(procs, 64, PACE)}",
    )
    checkouts = [("casedesk", ROOT)]
    checkouts += [(spec.partition("=")[0], Path(spec.partition("=")[2]).resolve()) for spec in args.checkout]
    return {"instructions": {name: await _count(procs, path, upstreams, config_dir) for name, path in checkouts}}

"""Where a CaseDesk's time goes, per request and per token: two runs under cProfile.

One run serves `requests` one-token requests: each function's own time divided by the
requests is its cost per request. The other serves `streams` streams of `tokens` tokens: its
own time per stream, less the per-request run's, divided by the extra tokens, is its cost per
token (what a longer answer pays). The profiler is on only while the measured requests run
(bench/profiled_gateway.py): start-up and warm-up are left out. cProfile's own overhead
inflates every call alike (a fraction of a µs each), so the shares are right and the totals high.
"""

from __future__ import annotations

import pstats
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.load import anthropic_target, one_stream
from bench.procs import ROOT, Processes, free_port, wait_http

Row = tuple[str, float, float]  # function, calls per unit, own µs per unit


@dataclass
class Profiled:
    calls: dict[str, int]  # per function: calls
    own: dict[str, float]  # per function: own time, seconds


def _name(key: tuple[str, int, str]) -> str:
    file, line, function = key
    if file == "~":
        return function  # a built-in
    short = file.split("/casedesk/", 1)[-1] if "/casedesk/" in file else Path(file).name
    return f"{short}:{line}({function})"


def _load(stats_file: Path) -> Profiled:
    stats = pstats.Stats(str(stats_file)).stats  # type: ignore[attr-defined]
    return Profiled({_name(k): v[1] for k, v in stats.items()}, {_name(k): v[2] for k, v in stats.items()})


def _wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the profiled gateway did not answer ({path} missing)")
        time.sleep(0.01)


async def _profiled_run(procs: Processes, upstream_port: int, config_dir: Path, count: int, tokens: int) -> Profiled:
    port = free_port()
    config = config_dir / f"profiled-{tokens}.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nhealth_interval = 3600\naccess_log = ""\n'
        f'[deployments.bench.models.m]\nupstreams = ["http://127.0.0.1:{upstream_port}"]\n'
    )
    stats_file = config_dir / f"gateway-{tokens}.prof"
    command = [sys.executable, "-m", "bench.profiled_gateway", str(stats_file), "serve", "--config", str(config)]
    gateway = procs.start(command, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/healthz", 60)
    target = anthropic_target("p", port, tokens)
    for _ in range(5):  # warm-up, unprofiled
        await one_stream(target)
    gateway.send_signal(signal.SIGUSR1)
    _wait_for(stats_file.with_suffix(".on"))
    for _ in range(count):
        await one_stream(target)
    gateway.send_signal(signal.SIGUSR2)
    _wait_for(stats_file)
    time.sleep(0.2)  # the file is written in one go, but give it the moment
    gateway.send_signal(signal.SIGTERM)
    gateway.wait(30)
    return _load(stats_file)


def _table(title: str, rows: list[Row], total: float, unit: str) -> str:
    lines = [title, f"{'own µs/' + unit:>12} {'calls/' + unit:>10}  function"]
    lines += [f"{own:12.2f} {calls:10.2f}  {name}" for name, calls, own in rows]
    lines.append(f"{total:12.2f} {'':>10}  all functions")
    return "\n".join(lines)


async def profile_gateway(
    procs: Processes, upstream_port: int, config_dir: Path, requests: int = 200, streams: int = 40, tokens: int = 256
) -> str:
    """The two tables, top 15 functions each, as text (printed, and kept in the results)."""
    one = await _profiled_run(procs, upstream_port, config_dir, requests, 1)
    many = await _profiled_run(procs, upstream_port, config_dir, streams, tokens)
    per_request = sorted(
        ((name, one.calls[name] / requests, one.own[name] / requests * 1e6) for name in one.own), key=lambda r: -r[2]
    )
    extra = tokens - 1
    names = set(many.own) | set(one.own)
    per_token = sorted(
        (
            (
                name,
                (many.calls.get(name, 0) / streams - one.calls.get(name, 0) / requests) / extra,
                (many.own.get(name, 0.0) / streams - one.own.get(name, 0.0) / requests) / extra * 1e6,
            )
            for name in names
        ),
        key=lambda r: -r[2],
    )
    text = (
        _table(
            f"gateway profile, per request ({requests} one-token requests; own time):",
            per_request[:15],
            sum(r[2] for r in per_request),
            "req",
        )
        + "\n\n"
        + _table(
            f"gateway profile, per token ({streams} streams of {tokens} tokens, less the per-request run; own time):",
            per_token[:15],
            sum(r[2] for r in per_token),
            "tok",
        )
    )
    print("\n" + text + "\n", flush=True)
    return text

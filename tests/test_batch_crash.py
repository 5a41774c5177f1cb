"""Nothing lost, nothing twice: a real `casedesk serve` process SIGKILLed three times at random
moments while a 100-item batch runs on the fake llama-server (a process too). After each
restart the batch is there; in the end every custom_id has exactly one result, and results
written before a kill are unchanged (read straight from the SQLite file between runs)."""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "k", "content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def call(url: str, method: str = "GET", body: Any = None) -> Any:
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=HEADERS)
    with urllib.request.urlopen(request, timeout=10) as answer:
        raw = answer.read()
    return raw if url.endswith("/results") else orjson.loads(raw)


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                return
        except OSError:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)


def written(database: Path) -> dict[str, bytes]:
    """custom_id → result of the items that have one, as committed in the file."""
    with sqlite3.connect(database) as db:
        return dict(db.execute("SELECT custom_id, result FROM items WHERE result IS NOT NULL").fetchall())


@pytest.mark.slow
def test_sigkill_three_times_during_a_batch_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    fake_port, port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    fake = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_llama.py"), "--port", str(fake_port), "--tokens", "4"]
        + ["--token-delay", "0.02"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    config = tmp_path / "casedesk.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
state_dir = "{tmp_path / "state"}"
access_log = ""
[deployments.dep]
max_concurrency = 4
[deployments.dep.models.m]
upstreams = ["http://127.0.0.1:{fake_port}"]
"""
    )
    log = tmp_path / "casedesk.log"
    gateway = f"http://127.0.0.1:{port}"
    base = f"{gateway}/proxy/dep/anthropic/v1/messages/batches"
    rng = random.Random(os.environ.get("CASEDESK_CRASH_SEED", str(time.time_ns())))
    database = tmp_path / "state" / "batches.sqlite3"

    def serve() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "casedesk", "serve", "--config", str(config)],
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_healthy(gateway, process, log)
        return process

    try:
        process = serve()
        requests = [
            {
                "custom_id": f"item-{i}",
                "params": {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": f"q{i}"}]},
            }
            for i in range(100)
        ]
        batch = call(base, "POST", {"requests": requests})
        kept: dict[str, bytes] = {}
        for _ in range(3):
            time.sleep(rng.uniform(0.05, 0.6))
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            now = written(database)
            assert all(now[k] == v for k, v in kept.items()), "a result changed"
            kept = now
            process = serve()
            assert call(f"{base}/{batch['id']}")["id"] == batch["id"]  # still there after the kill
        assert len(kept) < 100, "the batch ended before the third kill: make the items slower"
        deadline = time.monotonic() + 60
        while (done := call(f"{base}/{batch['id']}"))["processing_status"] != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert done["request_counts"] == {"processing": 0, "succeeded": 100, "errored": 0, "canceled": 0, "expired": 0}
        lines = call(done["results_url"]).splitlines()
        entries = [orjson.loads(line) for line in lines]
        assert sorted(e["custom_id"] for e in entries) == sorted(f"item-{i}" for i in range(100))
        assert all(e["result"]["type"] == "succeeded" for e in entries)
        final = written(database)
        assert all(final[k] == v for k, v in kept.items()), "a result written before a kill changed"
        process.terminate()
        process.wait(30)
    finally:
        for child in (fake, locals().get("process")):
            if isinstance(child, subprocess.Popen) and child.poll() is None:
                child.kill()
                child.wait()

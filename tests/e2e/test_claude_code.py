"""The real Claude Code CLI (npm `@anthropic-ai/claude-code`, pinned by
tests/claude-code/package-lock.json) run headless (`claude -p`) against CaseDesk, set up as a
user would: only the base URL, a dummy key and the switches that stop it calling home.

- against the real model behind the e2e rig, with no `--model`: Claude Code asks for its
  default `claude-…` model and the deployment's `claude-*` alias serves it;
- against a scripted fake llama-server, a whole agent loop through Claude Code's Read tool;
- against a fake that withholds its response head for 30 s (as llama-server does while every
  slot is busy): Claude Code still finishes the answer.

What Claude Code 2.1.332 sends in `-p` mode (seen in the access log): one streamed
`POST /v1/messages?beta=true` per turn, no count_tokens, no model lookups.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import GatewayFactory, RunningGateway
from tests.e2e.conftest import MODEL, Rig
from tests.fake_llama import FakeLlamaServer, Reply

CLAUDE_DIR = Path(__file__).resolve().parents[1] / "claude-code"
CLAUDE = CLAUDE_DIR / "node_modules" / ".bin" / "claude"
# The real model's prefill of Claude Code's ~12k-token first prompt takes tens of seconds
# on 2 cores; on a busy box several times that.
REAL_MODEL_TIMEOUT = 900.0
FAKE_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def claude() -> Path:
    """The pinned CLI, installed from the lock file when `make test` has not done it yet."""
    if not CLAUDE.exists():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install Claude Code for its end-to-end tests"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLAUDE_DIR, check=True, capture_output=True)
    version = subprocess.run([str(CLAUDE), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "Claude Code" in version.stdout, version.stderr
    return CLAUDE


def claude_env(base_url: str, home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: a fresh HOME (no login, no settings) and only what the README asks for."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "dummy-key",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        **extra,
    }


@dataclass
class Run:
    returncode: int
    result: dict[str, Any]  # the `--output-format json` summary ({} if stdout was not JSON)
    stdout: str
    stderr: str
    seconds: float

    def explain(self) -> str:
        return (
            f"claude -p: exit {self.returncode} after {self.seconds:.1f} s, "
            f"result {self.result.get('result')!r}, turns {self.result.get('num_turns')}\n"
            f"stdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}"
        )


def summary(stdout: str) -> dict[str, Any]:
    try:
        parsed = json.loads(stdout)
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


async def run_claude(claude: Path, prompt: str, cwd: Path, env: dict[str, str], timeout: float, *flags: str) -> Run:
    """`claude -p PROMPT --output-format json` without blocking the loop (the gateway runs in it)."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        str(claude),
        *flags,
        "-p",
        prompt,
        "--output-format",
        "json",
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(
            f"claude -p did not finish in {timeout} s: {out.decode()[-2000:]} {err.decode()[-2000:]}"
        ) from None
    assert process.returncode is not None
    stdout = out.decode()
    return Run(process.returncode, summary(stdout), stdout, err.decode(), time.monotonic() - started)


def access_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_bytes().splitlines():
        if line.startswith(b"{"):
            record = orjson.loads(line)
            if "request_id" in record:
                lines.append(record)
    return lines


# -- against the real model ------------------------------------------------------------------


def test_claude_code_with_only_the_base_url_runs_on_the_real_model(claude: Path, rig: Rig, tmp_path: Path) -> None:
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    # No --model: Claude Code asks for its default claude-… model. Output kept short: the
    # tiny model's answer is nonsense anyway, and each token costs time on 2 cores.
    env = claude_env(rig.base_url, home, CLAUDE_CODE_MAX_OUTPUT_TOKENS="256")
    before = len(access_lines(rig.log))
    run = asyncio.run(run_claude(claude, "Say hello in one short sentence.", project, env, REAL_MODEL_TIMEOUT))
    print(run.explain())  # shown with -s / on failure: Claude Code's own words
    seen = access_lines(rig.log)[before:]
    result = str(run.result.get("result", "")).strip()
    assert result, run.explain()
    if run.returncode != 0:
        # Gemma 3 270M under Claude Code's 12k-token prompt often rambles to the output cap;
        # Claude Code then asks it to resume three times and stops with this message of its
        # own. Every answer still arrived whole (checked below); any other failure fails here.
        assert result.startswith("API Error: Claude's response exceeded the 256 output token maximum"), run.explain()
        assert run.result.get("num_turns") == 4, run.explain()
    else:
        assert run.result.get("subtype") == "success" and run.result.get("is_error") is False, run.explain()
    messages = [r for r in seen if r["path"].endswith("/v1/messages")]
    assert messages, seen
    for record in messages:
        assert record["model"].startswith("claude-") and record["tag"] == MODEL, record
        assert record["status"] == 200 and record["input_tokens"] > 5000, record  # the whole agent prompt fit
        assert record["stream"] and record["output_tokens"] > 0, record


# -- against a scripted fake llama-server ----------------------------------------------------


@dataclass
class FakeBox:
    fake: FakeLlamaServer
    gateway: RunningGateway
    access_log: Path


@pytest.fixture
async def box(start_gateway: GatewayFactory, tmp_path: Path) -> Any:
    """CaseDesk in front of the fake, with the alias Claude Code's default model needs."""
    log = tmp_path / "access.log"
    async with FakeLlamaServer() as fake:
        gateway = await start_gateway(
            {
                "server": {"listen": "127.0.0.1:0", "health_interval": 3600, "access_log": str(log)},
                "deployments": {
                    "dep": {
                        "models": {MODEL: {"upstreams": [fake.url]}},
                        "aliases": {"claude-*": MODEL},
                    }
                },
            }
        )
        yield FakeBox(fake, gateway, log)


def tool_texts(body: dict[str, Any]) -> list[str]:
    """What the chat request carries back from tools (CaseDesk sends tool results as `tool` messages)."""
    return [str(m.get("content")) for m in body.get("messages", []) if m.get("role") == "tool"]


async def test_claude_code_agent_loop_reads_a_file_through_its_read_tool(
    claude: Path, box: FakeBox, tmp_path: Path
) -> None:
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    marker = f"MARKER-{secrets.token_hex(6)}"
    notes = project / "notes.txt"
    notes.write_text(f"The secret word is {marker}.\n")
    tools_offered: list[list[str]] = []

    def agent(body: dict[str, Any]) -> Reply:
        """Turn 1: call Read on the file. Turn 2: quote the marker found in the tool result."""
        tools_offered.append([t["function"]["name"] for t in body.get("tools", [])])
        found = re.findall(r"MARKER-[0-9a-f]{12}", " ".join(tool_texts(body)))
        if found:
            return Reply(tokens=["The file says ", found[0], "."])
        if tool_texts(body):
            return Reply(tokens=["The tool result had no marker."])
        return Reply(tokens=["Reading it."], tool_calls=[("Read", [json.dumps({"file_path": str(notes)})])])

    box.fake.replies.extend([agent] * 4)
    env = claude_env(box.gateway.base_url(), home)
    run = await run_claude(claude, "What is the secret word in notes.txt?", project, env, FAKE_TIMEOUT)
    print(run.explain())
    chats = box.fake.chat_requests()
    assert run.returncode == 0, run.explain()
    assert marker in run.result.get("result", ""), run.explain()
    assert run.result.get("num_turns") == 2, run.result
    # Exactly two model turns: the tool call, then the answer built from the tool's result.
    assert len(chats) == 2, [r.path for r in box.fake.requests]
    assert "Read" in tools_offered[0]
    assert any(marker in text for text in tool_texts(chats[1].body or {}))
    records = access_lines(box.access_log)
    assert [(r["path"].rsplit("/", 1)[-1], r["tag"], r["status"]) for r in records] == [("messages", MODEL, 200)] * 2
    assert all(r["model"].startswith("claude-") and r["stream"] for r in records), records


async def test_claude_code_waits_out_a_30_second_withheld_response_head(
    claude: Path, box: FakeBox, tmp_path: Path
) -> None:
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    # llama-server sends no response head while every slot is busy (docs/llama-server-facts.md).
    box.fake.replies.append(Reply(tokens=["Still", " here", " after", " the", " wait."], head_delay=30.0))
    env = claude_env(box.gateway.base_url(), home)
    run = await run_claude(claude, "Are you there?", project, env, FAKE_TIMEOUT)
    print(run.explain())
    assert run.returncode == 0, run.explain()
    assert run.result.get("result", "").strip() == "Still here after the wait.", run.explain()
    assert run.seconds >= 30
    # One request, not a retry: Claude Code waited rather than giving up and asking again.
    assert len(box.fake.chat_requests()) == 1
    assert [(r["tag"], r["status"]) for r in access_lines(box.access_log)] == [(MODEL, 200)]


def last_user_text(body: dict[str, Any]) -> str:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return str(users[-1].get("content")) if users else ""


async def test_claude_code_compacts_on_casedesks_prompt_too_long_error(
    claude: Path, box: FakeBox, tmp_path: Path
) -> None:
    """The exact text `prompt is too long: N tokens > M maximum` is what Claude Code reads to
    compact a conversation that outgrew the model's window (docs/anthropic-api.md §3)."""
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    env = claude_env(box.gateway.base_url(), home)
    box.fake.replies.append(Reply(tokens=["First", " answer."]))
    first = await run_claude(claude, "Say hi.", project, env, FAKE_TIMEOUT)
    assert first.returncode == 0 and first.result.get("result") == "First answer.", first.explain()

    overflow = Reply(
        status=400,
        error_type="exceed_context_size_error",
        error_message="the request exceeds the available context size",
        error_extra={"n_prompt_tokens": 40000, "n_ctx": 32768},
    )
    compactions: list[str] = []

    def after_overflow(body: dict[str, Any]) -> Reply:
        text = last_user_text(body)
        if "summary" in text.lower() and "Do NOT call any tools" in text:  # Claude Code's compaction prompt
            compactions.append(text)
            return Reply(tokens=["<summary>The user said hi and then asked for more.</summary>"])
        return Reply(tokens=["Carried", " on", " after", " compacting."])

    box.fake.replies.extend([overflow, *[after_overflow] * 6])
    # --continue: the second run carries the first conversation, which then "overflows".
    second = await run_claude(claude, "Say more.", project, env, FAKE_TIMEOUT, "--continue")
    print(second.explain())
    assert second.returncode == 0, second.explain()
    assert second.result.get("result") == "Carried on after compacting.", second.explain()
    assert compactions, [last_user_text(r.body or {})[:200] for r in box.fake.chat_requests()]
    statuses = [r["status"] for r in access_lines(box.access_log)]
    assert statuses[:3] == [200, 400, 200], statuses

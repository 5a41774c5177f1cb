"""Managed llama-servers: started before listening, restarted when they die, kept across a
reload that does not change them. The binary here is tests/fake_llama.py behind a shebang."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import anthropic

from casedesk.config import load
from tests.conftest import GatewayFactory

ROOT = Path(__file__).resolve().parents[1]


def fake_binary(tmp_path: Path) -> Path:
    script = tmp_path / "llama-server"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_llama.py"}" --tokens 3 "$@"\n')
    script.chmod(0o755)
    return script


def write_config(path: Path, binary: Path, args: list[str], extra_model: bool = False) -> None:
    model = path.parent / "model.gguf"
    model.write_bytes(b"GGUF")
    text = (
        f'[server]\naccess_log = ""\nstate_dir = "{path.parent / "state"}"\n'
        '[deployments.local.models."gemma3:270m".llama_server]\n'
        f'model = "{model}"\nbinary = "{binary}"\nargs = {args!r}\nstartup_timeout = 20\n'.replace("'", '"')
    )
    if extra_model:
        text += f'[deployments.local.models."other".llama_server]\nmodel = "{model}"\nbinary = "{binary}"\n'
    path.write_text(text)


async def ask(base_url: str) -> str:
    client = anthropic.AsyncAnthropic(base_url=base_url, api_key="k", max_retries=0)
    message = await client.messages.create(
        model="gemma3:270m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    return message.content[0].text  # type: ignore[union-attr]


def managed_pid() -> int:
    """The pid of the managed child (the only child of this test process running the fake)."""
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    pids = [int(c) for c in children if b"fake_llama.py" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(pids) >= 1, children
    return pids[0]


async def test_managed_server_is_started_restarted_and_kept_across_reload(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    binary = fake_binary(tmp_path)
    config = tmp_path / "casedesk.toml"
    write_config(config, binary, ["--token-delay", "0"])
    gw = await start_gateway(load(config))
    base = gw.base_url("local")
    assert await ask(base) == " tok0 tok1 tok2"
    first = managed_pid()

    # It dies: CaseDesk starts it again, and requests are served again.
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        try:
            assert await ask(base) == " tok0 tok1 tok2"
            break
        except anthropic.APIStatusError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    second = managed_pid()
    assert second != first

    # A reload that adds a model keeps the unchanged server running.
    write_config(config, binary, ["--token-delay", "0"], extra_model=True)
    gw.reload.set()
    client = anthropic.AsyncAnthropic(base_url=base, api_key="k", max_retries=0)
    deadline = time.monotonic() + 20
    while [m.id async for m in client.models.list()] != ["gemma3:270m", "other"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert second in [int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()]
    assert await ask(base) == " tok0 tok1 tok2"

    # Shutdown stops the managed servers with CaseDesk.
    await gw.shutdown()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{second}").exists() and b"fake_llama" in Path(f"/proc/{second}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_a_managed_server_that_cannot_start_is_a_clear_error(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = tmp_path / "casedesk.toml"
    broken = tmp_path / "broken-llama-server"
    broken.write_text("#!/bin/sh\necho 'no such model' >&2\nexit 3\n")
    broken.chmod(0o755)
    write_config(config, broken, [])
    try:
        await start_gateway(load(config))
    except Exception as exc:  # noqa: BLE001 (the type is the supervisor's)
        assert "exited with code 3" in str(exc)
    else:
        raise AssertionError("a server that cannot start must stop CaseDesk from starting")

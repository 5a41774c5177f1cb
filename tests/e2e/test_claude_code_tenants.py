"""Claude Code (the real CLI, headless) with a tenant's key, as ANTHROPIC_API_KEY and as
ANTHROPIC_AUTH_TOKEN (Authorization: Bearer), against the fake llama-server: it works, and
every request is accounted to that tenant (issue 17), with Anthropic's rate-limit headers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory
from tests.e2e.conftest import MODEL
from tests.e2e.test_claude_code import FAKE_TIMEOUT, access_lines, claude, claude_env, run_claude
from tests.fake_llama import FakeLlamaServer, Reply

__all__ = ["claude"]  # the fixture, imported for this module's tests


@pytest.mark.parametrize("variable", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])
async def test_claude_code_with_a_tenants_key_is_accounted_to_the_tenant(
    claude: Path, start_gateway: GatewayFactory, tmp_path: Path, variable: str
) -> None:
    log = tmp_path / "access.log"
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    key = "alice-secret-key"
    async with FakeLlamaServer() as fake:
        gateway = await start_gateway(
            {
                "server": {"listen": "127.0.0.1:0", "health_interval": 3600, "access_log": str(log)},
                "tenants": {
                    "alice": {"keys_sha256": [hashlib.sha256(key.encode()).hexdigest()], "requests_per_minute": 100},
                    "bob": {"keys_sha256": [hashlib.sha256(b"bob").hexdigest()]},
                },
                "deployments": {
                    "team": {
                        "tenants": ["alice", "bob"],
                        "models": {MODEL: {"upstreams": [fake.url]}},
                        "aliases": {"claude-*": MODEL},
                    }
                },
            }
        )
        fake.replies.append(Reply(tokens=["Hello", " from", " the", " box."]))
        env = claude_env(gateway.base_url("team"), home)
        del env["ANTHROPIC_API_KEY"]
        env[variable] = key
        run = await run_claude(claude, "Say hello.", project, env, FAKE_TIMEOUT)
        print(run.explain())
        assert run.returncode == 0, run.explain()
        assert run.result.get("result", "").strip() == "Hello from the box.", run.explain()
    records = [r for r in access_lines(log) if r["path"].endswith("/v1/messages")]
    assert records and all((r["tenant"], r["status"]) == ("alice", 200) for r in records), records

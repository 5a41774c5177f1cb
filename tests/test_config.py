"""The config file: the documented shape loads; every mistake is named with its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from casedesk.config import ConfigError, load, parse

ISSUE_SHAPE = """
[server]
listen = "127.0.0.1:8787"
[deployments."dep-123"]
api_keys_sha256 = []        # optional; empty = any non-empty key is accepted
max_concurrency = 8         # optional
max_queue = 64              # optional
[deployments."dep-123".models."llama3.1:8b"]
upstreams = ["http://127.0.0.1:8080"]
"""


def test_the_documented_shape_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(ISSUE_SHAPE)
    config = load(path)
    dep = config.deployments["dep-123"]
    assert (config.server.listen_host, config.server.listen_port) == ("127.0.0.1", 8787)
    assert dep.max_concurrency == 8 and dep.max_queue == 64 and not dep.api_keys_sha256
    assert dep.models["llama3.1:8b"].upstreams[0].port == 8080
    assert config.server.limits.max_body_bytes == 32 * 1024 * 1024
    assert dep.models["llama3.1:8b"].spare_connections == 1  # a stream's next socket is ready (upstream/pool.py)


def test_the_examples_load() -> None:
    root = Path(__file__).resolve().parents[1]
    for name in ("local.toml", "deployments.toml"):
        load(root / "examples" / name)


def test_every_problem_is_reported_with_its_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(
            {
                "server": {"listen": "nowhere", "max_body_bytes": -5, "colour": "blue"},
                "deployments": {
                    "d": {
                        "max_concurrency": "many",
                        "api_keys_sha256": ["not-a-hash"],
                        "models": {
                            "m": {"upstreams": ["https://x:1", 5]},
                            "n": {},
                            "p": {"upstreams": ["http://x:1"], "spare_connections": -1},
                            "o": {"llama_server": {"args": "-c 10"}},
                        },
                    },
                },
            }
        )
    problems = "\n".join(caught.value.problems)
    for key in (
        "server.listen",
        "server.max_body_bytes",
        "server.colour",
        "deployments.d.max_concurrency",
        "deployments.d.api_keys_sha256[0]",
        "deployments.d.models.m.upstreams[0]",
        "deployments.d.models.m.upstreams[1]",
        "deployments.d.models.n",
        "deployments.d.models.o.llama_server.model",
        "deployments.d.models.o.llama_server.args",
        "deployments.d.models.p.spare_connections",
    ):
        assert key in problems, key
    assert len(caught.value.problems) >= 10


def test_network_lists_name_what_is_not_a_network_and_write_addresses_as_networks() -> None:
    deployments = {"d": {"models": {"m": {"upstreams": ["http://x:1"]}}}}
    server = {"trusted_proxies": ["10.0.0.7", "10.1.0.0/16"], "image_url_allow": ["192.168.1.0/24"]}
    config = parse({"server": server, "deployments": deployments})
    assert config.server.trusted_proxies == ("10.0.0.7/32", "10.1.0.0/16")
    assert config.server.image_url_allow == ("192.168.1.0/24",)
    with pytest.raises(ConfigError) as caught:
        parse(
            {
                "server": {"trusted_proxies": ["10.0.0.7", "proxy"], "image_url_allow": "10.0.0.0/8"},
                "deployments": deployments,
            }
        )
    assert caught.value.problems == [
        "server.trusted_proxies[1]: must be an address or CIDR network, got 'proxy'",
        'server.image_url_allow: must be a list of addresses or CIDR networks, e.g. ["10.1.2.0/24"]',
    ]


def test_no_deployments_is_a_problem() -> None:
    with pytest.raises(ConfigError, match="deployments"):
        parse({"server": {}})


def test_check_config_command_explains_and_exits_nonzero(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nlisten = 5\n[deployments.d.models.m]\nupstreams = ["ftp://x"]\n')
    run = subprocess.run([sys.executable, "-m", "casedesk", "check-config", str(path)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "server.listen" in run.stderr and "deployments.d.models.m.upstreams[0]" in run.stderr
    good = tmp_path / "good.toml"
    good.write_text(ISSUE_SHAPE)
    run = subprocess.run([sys.executable, "-m", "casedesk", "check-config", str(good)], capture_output=True, text=True)
    assert run.returncode == 0 and "OK" in run.stdout


def test_version_command() -> None:
    run = subprocess.run([sys.executable, "-m", "casedesk", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("casedesk ")


def test_serve_has_no_workers_option() -> None:
    # One CaseDesk process relays far more tokens/s than a box's llama-servers produce
    # (README, "Performance"); past that, run one per box behind a load balancer.
    result = subprocess.run(
        [sys.executable, "-m", "casedesk", "serve", "--config", "examples/local.toml", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --workers 2" in result.stderr

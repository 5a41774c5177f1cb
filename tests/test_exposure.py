"""What a client without a key learns about a deployment that requires one: nothing. Not its
existence (HEAD, 401 versus 404), not its ids, tags or upstreams (/metrics, /readyz). The
operator sees everything on [server] ops_listen."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path
from typing import Any

import orjson

from casedesk.config import parse as parse_config
from tests.conftest import GatewayFactory, RunningGateway
from tests.fake_llama import FakeLlamaServer
from tests.support.wait import until
from tests.support.wire import DEAD_UPSTREAM, exchange, get, parse

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-private-key"


def two_deployments(public_upstream: str, **server: Any) -> dict[str, Any]:
    """ "open" needs no key; "private" (tag "secret-tag", a dead upstream) needs KEY."""
    return {
        "server": {"listen": "127.0.0.1:0", "health_interval": 3600, "access_log": "", **server},
        "deployments": {
            "open": {"models": {"m": {"upstreams": [public_upstream]}}},
            "private": {
                "api_keys_sha256": [hashlib.sha256(KEY.encode()).hexdigest()],
                "models": {"secret-tag": {"upstreams": [DEAD_UPSTREAM]}},
            },
        },
    }


async def answer(gw: RunningGateway, method: str, path: str, headers: str = "") -> tuple[int, bytes]:
    raw = f"{method} {path} HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n{headers}"
    if method == "POST":
        body = orjson.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        raw += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        status, _, got = parse(await exchange(gw.port, raw.encode() + body))
    elif method == "HEAD":  # a head and no body, whatever its content-length says
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write((raw + "\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        status, got = parse(head)[0], b""
    else:
        status, _, got = parse(await exchange(gw.port, (raw + "\r\n").encode()))
    return status, got


async def test_head_on_a_keyed_deployment_needs_its_key(fake: FakeLlamaServer, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(two_deployments(fake.url))
    assert (await answer(gw, "HEAD", "/proxy/private/anthropic"))[0] == 401  # before: 200
    assert (await answer(gw, "HEAD", "/proxy/private/anthropic", f"x-api-key: {KEY}\r\n"))[0] == 200
    assert (await answer(gw, "HEAD", "/proxy/open/anthropic"))[0] == 200


async def test_an_unknown_deployment_is_answered_as_a_keyed_one_without_its_key(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(two_deployments(fake.url))
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/messages"), ("HEAD", ""), ("GET", "/v1/models/x")):
        for headers in ("", "x-api-key: sk-wrong\r\n", "authorization: Bearer sk-wrong\r\n"):
            private = await answer(gw, method, f"/proxy/private/anthropic{path}", headers)
            unknown = await answer(gw, method, f"/proxy/no-such-id/anthropic{path}", headers)
            assert private == unknown and private[0] == 401, (method, path, headers, private, unknown)
    # Asked before the body (Expect: 100-continue), the answer is the same too.
    expect = "expect: 100-continue\r\ncontent-length: 10\r\n\r\n"
    for deployment in ("private", "no-such-id"):
        raw = f"POST /proxy/{deployment}/anthropic/v1/messages HTTP/1.1\r\nhost: x\r\n{expect}".encode()
        assert parse(await exchange(gw.port, raw))[0] == 401


async def test_the_main_listener_shows_no_keyed_deployment_in_metrics_or_readyz(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(two_deployments(fake.url))
    await answer(gw, "POST", "/proxy/private/anthropic/v1/messages", f"x-api-key: {KEY}\r\n")  # a 502: recorded
    await answer(gw, "POST", "/proxy/open/anthropic/v1/messages")
    status, metrics = await get(gw, "/metrics")
    assert status == 200 and b'deployment="open"' in metrics  # the open deployment's series stay
    for secret in (b"private", b"secret-tag", b'upstream="127.0.0.1:9"'):
        assert secret not in metrics, secret
    await until(lambda: readyz_is(gw, 503), what="/readyz to see the private deployment's dead upstream")
    status, body = await get(gw, "/readyz")
    assert status == 503 and b"private" not in body and b"secret-tag" not in body
    assert b"ops_listen" in body  # where to look
    # A request with the deployment's key (a Prometheus scrape's bearer token) sees it.
    raw = f"GET /metrics HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\r\n".encode()
    assert b'deployment="private",model="secret-tag"' in parse(await exchange(gw.port, raw))[2]
    raw = f"GET /readyz HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\n\r\n".encode()
    assert b"private" in parse(await exchange(gw.port, raw))[2]


async def readyz_is(gw: RunningGateway, status: int, port: int | None = None) -> bool:
    return (await get(gw, "/readyz", port))[0] == status


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_ops_listen_serves_metrics_and_readyz_in_full_and_only_there(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    ops = free_port()
    gw = await start_gateway(two_deployments(fake.url, ops_listen=f"127.0.0.1:{ops}"))
    await answer(gw, "POST", "/proxy/private/anthropic/v1/messages", f"x-api-key: {KEY}\r\n")
    assert (await get(gw, "/metrics"))[0] == 404 and (await get(gw, "/readyz"))[0] == 404  # not on the main one
    status, metrics = await get(gw, "/metrics", ops)
    assert status == 200 and b'deployment="private",model="secret-tag"' in metrics
    await until(lambda: readyz_is(gw, 503, ops), what="/readyz on ops_listen to see the dead upstream")
    assert b"private" in (await get(gw, "/readyz", ops))[1]
    assert (await get(gw, "/healthz", ops))[0] == 200
    assert (await get(gw, "/proxy/open/anthropic/v1/models", ops))[0] == 404  # the API is not served there


def test_ops_listen_is_checked_and_shown_to_operators() -> None:
    assert parse_config(two_deployments(DEAD_UPSTREAM, ops_listen="127.0.0.1:9090")).server.ops_listen == (
        "127.0.0.1",
        9090,
    )
    try:
        parse_config(two_deployments(DEAD_UPSTREAM, ops_listen=9090))
    except Exception as exc:  # noqa: BLE001
        assert "server.ops_listen" in str(exc)
    else:
        raise AssertionError("ops_listen = 9090 was accepted")
    assert "ops_listen" in (ROOT / "contrib" / "systemd" / "casedesk.service").read_text()
    assert "ops_listen" in (ROOT / "README.md").read_text()

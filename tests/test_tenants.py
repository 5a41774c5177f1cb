"""Tenants on real sockets (issue 17; issue 22 item 10): keys and identities, Anthropic's rate
limits and headers through the official SDK, fair turns measured on the fake llama-server,
usage in /metrics and the access log, admission across a reload."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import h11
import orjson
import pytest

from casedesk.config import ConfigError, load, parse
from tests.conftest import GatewayFactory, RunningGateway, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wire import post_bytes

BODY = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenants_config(upstream: str, tenants: dict[str, dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """gateway_config with [tenants] whose keys are "key-NAME", all allowed on "dep"."""
    raw = gateway_config([upstream], **overrides)
    raw["deployments"]["dep"].setdefault("tenants", ["*"])
    raw["tenants"] = {name: {"keys_sha256": [sha(f"key-{name}")], **table} for name, table in tenants.items()}
    return raw


async def post(
    port: int,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    *,
    path: str = "/proxy/dep/anthropic/v1/messages",
    local: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes, float]:
    """A POST on a fresh socket from `local`: (status, headers, body, seconds to the head)."""
    payload = orjson.dumps(body)
    conn = h11.Connection(h11.CLIENT)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    sent = time.monotonic()
    writer.write(post_bytes(conn, path, payload, headers))
    status, response_headers, data, waited = 0, {}, b"", 0.0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await asyncio.wait_for(reader.read(65536), 60))
        elif isinstance(event, h11.Response):
            status, waited = event.status_code, time.monotonic() - sent
            response_headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            data += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    writer.close()
    return status, response_headers, data, waited


def key(name: str) -> dict[str, str]:
    return {"x-api-key": f"key-{name}"}


async def metrics(gateway: RunningGateway, tenant: str = "alice") -> str:
    """/metrics as a client with `tenant`'s key sees it (a keyed deployment is hidden from others)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(f"GET /metrics HTTP/1.1\r\nhost: x\r\nx-api-key: key-{tenant}\r\nconnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data.decode()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
async def fake() -> AsyncIterator[FakeLlamaServer]:
    async with FakeLlamaServer(slots=64) as server:
        yield server


# -- config ------------------------------------------------------------------------------------


def test_check_config_names_every_tenant_mistake() -> None:
    raw = gateway_config(["http://127.0.0.1:9"])
    raw["deployments"]["dep"]["tenants"] = ["alice", "carol"]
    raw["deployments"]["dep"]["api_keys_sha256"] = [sha("shared")]
    raw["tenants"] = {
        "alice": {"keys_sha256": [sha("a")], "priority": "urgent", "requests_per_minute": -1},
        "bob": {"keys_sha256": [sha("a"), sha("shared")], "weight": 0},
    }
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    problems = "\n".join(caught.value.problems)
    assert 'tenants.alice.priority: must be "high", "normal" or "low", got \'urgent\'' in problems
    assert "tenants.alice.requests_per_minute: must be >= 0, got -1" in problems
    assert "tenants.bob.weight: must be > 0" in problems
    assert re.search(r"tenants\.bob\.keys_sha256: key hash \w+… also appears in tenants\.alice", problems)
    assert "also appears in deployments.dep.api_keys_sha256" in problems
    assert "deployments.dep.tenants: unknown tenant 'carol'" in problems


# -- who a request belongs to ------------------------------------------------------------------


async def test_keys_name_tenants_and_deployments_name_who_may_use_them(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    raw = tenants_config(fake.url, {"alice": {}, "bob": {}})
    raw["deployments"]["dep"]["tenants"] = ["alice"]
    raw["deployments"]["dep"]["api_keys_sha256"] = [sha("old-key")]
    gateway = await start_gateway(raw)
    assert (await post(gateway.port, BODY, key("alice")))[0] == 200
    assert (await post(gateway.port, BODY, {"authorization": "Bearer key-alice"}))[0] == 200
    assert (await post(gateway.port, BODY, {"x-api-key": "old-key"}))[0] == 200  # api_keys_sha256 still works
    status, _, body, _ = await post(gateway.port, BODY, key("bob"))
    assert status == 403 and orjson.loads(body)["error"] == {
        "type": "permission_error",
        "message": "tenant 'bob' may not use deployment 'dep'",
    }
    status, _, body, _ = await post(gateway.port, BODY, {"x-api-key": "nobody"})
    assert status == 401 and orjson.loads(body)["error"]["type"] == "authentication_error"


async def test_the_identity_header_is_honoured_only_from_a_trusted_address(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    raw = tenants_config(
        fake.url,
        {"alice": {"users": ["alice@example.com"]}},
        server={"identity_header": "X-Forwarded-Email", "trusted_proxies": ["127.0.0.1/32"]},
    )
    gateway = await start_gateway(raw)
    identity = {"x-forwarded-email": "alice@example.com", "x-api-key": "anything"}
    assert (await post(gateway.port, BODY, identity))[0] == 200  # the proxy vouched: any key
    text = await metrics(gateway)
    assert metric(text, "casedesk_tenant_requests_total", tenant="alice", status="200") == 1
    status, _, _, _ = await post(gateway.port, BODY, identity, local="127.0.0.2")
    assert status == 401  # from an untrusted address the header means nothing
    assert (await post(gateway.port, BODY, identity, local="127.0.0.2"))[0] == 401
    warned = [r for r in caplog.records if "ignoring x-forwarded-email" in r.getMessage()]
    assert len(warned) == 1 and "127.0.0.2" in warned[0].getMessage()  # logged once


# -- rate limits -------------------------------------------------------------------------------


async def test_the_sdk_sees_anthropics_headers_move_and_honours_retry_after(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    raw = tenants_config(fake.url, {"alice": {"requests_per_minute": 3, "output_tokens_per_minute": 60}})
    gateway = await start_gateway(raw)
    client = anthropic.AsyncAnthropic(base_url=gateway.base_url(), api_key="key-alice", max_retries=0)
    raw_response = await client.messages.with_raw_response.create(**BODY)  # type: ignore[call-overload]
    first = raw_response.headers
    for name in ("requests", "output-tokens", "tokens"):
        for part in ("limit", "remaining", "reset"):
            assert f"anthropic-ratelimit-{name}-{part}" in first, (name, part)
    assert first["anthropic-ratelimit-requests-limit"] == "3"
    assert first["anthropic-ratelimit-requests-remaining"] == "2"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["anthropic-ratelimit-requests-reset"])
    async with client.messages.stream(**BODY) as stream:  # type: ignore[arg-type]
        second = stream.response.headers  # the streamed answer carries them in its head
        await stream.get_final_message()
    assert second["anthropic-ratelimit-requests-remaining"] == "1"
    output_used = int(first["anthropic-ratelimit-output-tokens-remaining"]) - int(
        second["anthropic-ratelimit-output-tokens-remaining"]
    )
    assert 2 <= output_used <= 3  # the first answer's 3 tokens, less a second's refill at most
    await client.messages.create(**BODY)  # type: ignore[call-overload]
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(**BODY)  # type: ignore[call-overload]
    retry_after = int(caught.value.response.headers["retry-after"])
    assert 15 <= retry_after <= 20
    assert "requests_per_minute (3) exhausted for tenant 'alice'; retry after" in caught.value.message
    # The SDK's own retry waits what retry-after says, and the request then passes.
    retrying = anthropic.AsyncAnthropic(base_url=gateway.base_url(), api_key="key-alice", max_retries=2)
    started = time.monotonic()
    message = await retrying.messages.create(**BODY)  # type: ignore[call-overload]
    assert message.content[0].text == "Hello world!"
    assert time.monotonic() - started >= retry_after - 1.5
    text = await metrics(gateway)
    assert metric(text, "casedesk_tenant_rate_limited_total", tenant="alice", limit="requests") >= 2


async def test_output_tokens_per_minute_is_exact_with_four_concurrent_streams(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    """600 output tokens a minute, 4 streams of 50 tokens (0.5 s each) back to back for 10 s
    (shortened from the issue's 30 s): admitted at most 600 + 10 s of refill (100) + what
    was in flight when the bucket ran out (at most 4 × 50)."""
    fake.default = Reply(tokens=["t"] * 50, token_delay=0.01)
    gateway = await start_gateway(tenants_config(fake.url, {"ci": {"output_tokens_per_minute": 600}}))
    body = {**BODY, "stream": True}
    deadline = time.monotonic() + 10
    served = refused = 0

    async def stream_loop() -> None:
        nonlocal served, refused
        while time.monotonic() < deadline:
            status, headers, _, _ = await post(gateway.port, body, key("ci"))
            if status == 200:
                served += 1
            else:
                assert status == 429
                refused += 1
                await asyncio.sleep(min(float(headers["retry-after"]), max(0.0, deadline - time.monotonic())))

    await asyncio.gather(*(stream_loop() for _ in range(4)))
    output = metric(await metrics(gateway, "ci"), "casedesk_tenant_output_tokens_total", tenant="ci")
    print(f"one instance, 600 OTPM, 10 s, 4 streams: {output:g} output tokens, {served} served, {refused} refused")
    assert output == served * 50
    assert 600 <= output <= 600 + 100 + 4 * 50 + 50, (served, refused)
    assert refused > 0


async def test_cached_input_tokens_are_free(fake: FakeLlamaServer, start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(tenants_config(fake.url, {"alice": {"input_tokens_per_minute": 60000}}))
    fake.replies.append(Reply(prompt_tokens=2000, cached_tokens=0))
    fake.replies.append(Reply(prompt_tokens=2000, cached_tokens=1900))  # the same long prompt again
    for _ in range(2):
        assert (await post(gateway.port, {**BODY, "stream": True}, key("alice")))[0] == 200
    text = await metrics(gateway)
    assert metric(text, "casedesk_tenant_input_tokens_total", tenant="alice") == 2100
    assert metric(text, "casedesk_tenant_cached_input_tokens_total", tenant="alice") == 1900
    level = metric(text, "casedesk_tenant_bucket_tokens", tenant="alice", limit="input_tokens")
    assert 60000 - 2100 <= level < 60000 - 2100 + 1000 * 5  # charged 2100, refilled 1000/s since


# -- fair turns --------------------------------------------------------------------------------


async def _bob_waits(fake: FakeLlamaServer, start_gateway: GatewayFactory, named: bool) -> float:
    """max_concurrency 2, requests of ~1 s: alice keeps 12 waiting; how long bob's one waits."""
    fake.default = Reply(tokens=["t"] * 20, token_delay=0.05)
    if named:
        raw = tenants_config(fake.url, {"alice": {}, "bob": {}}, deployment={"max_concurrency": 2, "max_queue": 64})
    else:  # today: both anonymous, one first-come-first-served queue
        raw = gateway_config([fake.url], deployment={"max_concurrency": 2, "max_queue": 64})
        raw["deployments"]["dep"]["api_keys_sha256"] = [sha("key-alice"), sha("key-bob")]
    gateway = await start_gateway(raw)
    alice = [asyncio.ensure_future(post(gateway.port, BODY, key("alice"))) for _ in range(14)]
    assert await fake.wait_until(lambda: fake.active_generations == 2, 5)
    await until_queued(gateway, 12)
    status, _, _, waited = await post(gateway.port, BODY, key("bob"))
    assert status == 200
    await asyncio.gather(*alice)
    await gateway.shutdown()
    return waited - 1.0  # the wait for a slot: the head comes once his 1 s answer is done


async def until_queued(gateway: RunningGateway, count: int, timeout: float = 5.0) -> None:
    """Poll /metrics until the deployment's queue holds `count` requests."""
    deadline = time.monotonic() + timeout
    while metric(await metrics(gateway), "casedesk_queued_requests", deployment="dep") != count:
        assert time.monotonic() < deadline, f"the queue never held {count}"
        await asyncio.sleep(0.02)


async def test_bobs_one_request_starts_within_one_request_time_of_alices_flood(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    before = await _bob_waits(fake, start_gateway, named=False)
    after = await _bob_waits(fake, start_gateway, named=True)
    print(f"bob's wait for a slot: {before:.2f} s first come first served, {after:.2f} s with tenants")
    assert before > 4.5  # behind alice's 12: six rounds of two slots
    assert after < 1.2  # the next slot that frees, or nearly


async def test_weights_two_to_one_share_a_saturated_deployment(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    """Both tenants keep 6 requests waiting on 2 slots for 12 s (requests of 0.1 s, about
    240 slots: the issue's minute and second shortened in proportion)."""
    fake.default = Reply(tokens=["t"] * 10, token_delay=0.01)
    raw = tenants_config(
        fake.url, {"alice": {"weight": 2}, "bob": {"weight": 1}}, deployment={"max_concurrency": 2, "max_queue": 64}
    )
    gateway = await start_gateway(raw)
    deadline = time.monotonic() + 12
    served = {"alice": 0, "bob": 0}

    async def keep_busy(name: str) -> None:
        while time.monotonic() < deadline:
            status, _, _, _ = await post(gateway.port, BODY, key(name))
            assert status == 200
            if time.monotonic() < deadline:
                served[name] += 1

    await asyncio.gather(*(keep_busy(name) for name in ("alice", "bob") for _ in range(8)))
    ratio = served["alice"] / served["bob"]
    print(f"slots over 12 s: {served}, ratio {ratio:.2f}")
    assert sum(served.values()) > 100
    assert abs(ratio - 2) / 2 < 0.15


async def test_a_tenants_own_max_queue_refuses_its_flood_first(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    fake.default = Reply(token_delay=0.5)
    raw = tenants_config(
        fake.url, {"alice": {"max_queue": 2}, "bob": {}}, deployment={"max_concurrency": 1, "max_queue": 10}
    )
    gateway = await start_gateway(raw)
    alice = [asyncio.ensure_future(post(gateway.port, BODY, key("alice"))) for _ in range(3)]
    await until_queued(gateway, 2)
    status, headers, body, _ = await post(gateway.port, BODY, key("alice"))
    assert status == 529 and "max_queue" in orjson.loads(body)["error"]["message"]
    bob = asyncio.ensure_future(post(gateway.port, BODY, key("bob")))
    assert (await bob)[0] == 200  # bob still gets in
    assert [r[0] for r in await asyncio.gather(*alice)] == [200, 200, 200]


# -- across a reload (issue 22 item 10) --------------------------------------------------------


async def test_requests_in_flight_count_against_the_limit_across_a_reload(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    fake.default = Reply(tokens=["t"] * 20, token_delay=0.05)
    path = tmp_path / "casedesk.toml"
    sha_a = sha("key-alice")
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
health_interval = 3600
[tenants.alice]
keys_sha256 = ["{sha_a}"]
requests_per_minute = 100
[deployments.dep]
max_concurrency = 1
tenants = ["*"]
[deployments.dep.models.m]
upstreams = ["{fake.url}"]
"""
    )
    gateway = await start_gateway(load(path))
    first = asyncio.ensure_future(post(gateway.port, {**BODY, "stream": True}, key("alice")))
    assert await fake.wait_until(lambda: fake.active_generations == 1, 5)
    path.write_text(path.read_text().replace("requests_per_minute = 100", "requests_per_minute = 50"))
    gateway.reload.set()
    await asyncio.sleep(0)  # let the reload run
    assert await fake.wait_until(lambda: not gateway.reload.is_set(), 5)
    second = asyncio.ensure_future(post(gateway.port, BODY, key("alice")))
    await until_queued(gateway, 1)
    assert fake.active_generations == 1  # the old config's stream still holds the one slot
    text = await metrics(gateway)
    assert metric(text, "casedesk_in_flight_requests", deployment="dep") == 1  # not 0
    assert metric(text, "casedesk_queued_requests", deployment="dep") == 1
    # and the tenant's bucket kept its two requests taken (48 of 50 left, a little refill aside)
    assert 48 <= metric(text, "casedesk_tenant_bucket_tokens", tenant="alice", limit="requests") < 49
    assert (await first)[0] == 200 and (await second)[0] == 200

"""Two CaseDesk instances sharing a real Redis enforce one limit (issue 17); Redis killed
mid-run: requests are still served (fail open) or refused with 529 (fail closed), the metric
counts it; Redis back: the limits apply again. Needs redis-server (make test installs it)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory
from tests.fake_llama import FakeLlamaServer, Reply
from tests.test_tenants import BODY, key, metric, metrics, post, tenants_config

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


class RedisServer:
    """A real redis-server on an ephemeral port, in a temporary folder, no persistence."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def fake() -> AsyncIterator[FakeLlamaServer]:
    async with FakeLlamaServer(slots=16) as server:
        yield server


async def until_refused(ports: list[int], limit: int) -> list[int]:
    """Requests alternating between the instances until the first 429: the statuses."""
    statuses: list[int] = []
    while len(statuses) < limit * 3:
        status = (await post(ports[len(statuses) % len(ports)], BODY, key("ci")))[0]
        statuses.append(status)
        if status != 200:
            break
    return statuses


async def test_two_instances_enforce_one_limit_and_survive_redis_going_away(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    raw = tenants_config(fake.url, {"ci": {"requests_per_minute": 6}}, server={"shared_limits": redis_server.url})
    one, two = await start_gateway(raw), await start_gateway(raw)
    ports = [one.port, two.port]
    statuses = await until_refused(ports, 6)
    assert statuses == [200] * 6 + [429]  # six in all across both, not six each
    assert (await post(two.port, BODY, key("ci")))[0] == 429

    redis_server.kill()
    served = [(await post(ports[i % 2], BODY, key("ci")))[0] for i in range(4)]
    assert served == [200] * 4  # fail open: served without limits
    errors = [metric(await metrics(g), "casedesk_shared_limits_errors_total") for g in (one, two)]
    assert all(count >= 2 for count in errors), errors

    redis_server.start()  # an empty Redis: full buckets again, enforced again
    assert await until_refused(ports, 6) == [200] * 6 + [429]


async def test_fail_closed_refuses_with_529_while_redis_is_down(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    server = {"shared_limits": redis_server.url, "shared_limits_failure": "closed"}
    gateway = await start_gateway(tenants_config(fake.url, {"ci": {"requests_per_minute": 60}}, server=server))
    assert (await post(gateway.port, BODY, key("ci")))[0] == 200
    redis_server.kill()
    status, headers, body, _ = await post(gateway.port, BODY, key("ci"))
    assert status == 529 and b"Redis" in body and headers["retry-after"] == "1"
    redis_server.start()
    deadline = time.monotonic() + 5
    while (await post(gateway.port, BODY, key("ci")))[0] != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_two_instances_hold_one_output_token_limit_exactly(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    """600 output tokens a minute for the tenant, two streams on each of two instances, 50
    tokens a request, for 10 s: together at most 600 + 100 (10 s of refill) + what was in
    flight when the bucket ran out (4 × 50), not twice that."""
    fake.default = Reply(tokens=["t"] * 50, token_delay=0.01)
    raw = tenants_config(
        fake.url, {"ci": {"output_tokens_per_minute": 600}}, server={"shared_limits": redis_server.url}
    )
    gateways = [await start_gateway(raw), await start_gateway(raw)]
    deadline = time.monotonic() + 10
    served = [0, 0]

    async def stream_loop(i: int) -> None:
        while time.monotonic() < deadline:
            status, headers, _, _ = await post(gateways[i].port, {**BODY, "stream": True}, key("ci"))
            if status == 200:
                served[i] += 1
            else:
                assert status == 429
                await asyncio.sleep(min(float(headers["retry-after"]), max(0.0, deadline - time.monotonic())))

    await asyncio.gather(*(stream_loop(i) for i in (0, 1, 0, 1)))
    outputs = [metric(await metrics(g, "ci"), "casedesk_tenant_output_tokens_total", tenant="ci") for g in gateways]
    print(f"two instances, 600 OTPM, 10 s: output tokens {outputs} (sum {sum(outputs):g}), requests {served}")
    assert all(out > 0 for out in outputs)
    assert 600 <= sum(outputs) <= 600 + 100 + 4 * 50 + 50

"""Bounded soak and fuzz: many streams for a fixed time, hostile bytes; nothing leaks, nothing
crashes. Figures are printed (run with -s to see them)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import time
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GatewayFactory, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wire import exchange, parse, raw_events

SOAK_SECONDS = 6.0
CONCURRENCY = 100


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def gateway_tasks() -> int:
    """Tasks of this process but the fake llama-server's own (its idle keep-alive readers)."""

    def fake(task: asyncio.Task[object]) -> bool:
        code = getattr(task.get_coro(), "cr_code", None)
        return code is not None and (code.co_filename.endswith("fake_llama.py") or code.co_name == "read")

    return sum(1 for task in asyncio.all_tasks() if not fake(task))


async def test_soak_many_streams_leak_nothing(start_gateway: GatewayFactory) -> None:
    reply = Reply(tokens=[f"w{i} " for i in range(40)], token_delay=0.002)
    # Like llama-server, the fake closes the connection after every stream: one per stream.
    async with FakeLlamaServer(reply) as fake:
        gw = await start_gateway(
            gateway_config(
                [fake.url],
                server={"access_log": ""},
                deployment={"max_concurrency": 64, "max_queue": 256},
                model={"max_connections": 48},
            )
        )
        await raw_events(gw, {})  # warm up
        gc.collect()
        fds_before, tasks_before, rss_before = open_fds(), gateway_tasks(), rss_mb()
        streams = 0
        deadline = time.monotonic() + SOAK_SECONDS

        async def worker() -> None:
            nonlocal streams
            while time.monotonic() < deadline:
                events = await raw_events(gw, {"max_tokens": 100})
                assert events[-1][0] == "message_stop"
                assert sum(1 for name, _ in events if name == "content_block_delta") == 40
                streams += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        # Wait for the last streams' sockets to close.
        settle = time.monotonic() + 3
        while fake.active_generations and time.monotonic() < settle:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let closed client transports finish closing
        gc.collect()
        fds_after, tasks_after, rss_after = open_fds(), gateway_tasks(), rss_mb()
        print(
            f"\nsoak: {streams} streams ({CONCURRENCY} at once) in {SOAK_SECONDS:g} s; "
            f"open fds {fds_before} -> {fds_after}; tasks {tasks_before} -> {tasks_after}; "
            f"RSS {rss_before:.1f} -> {rss_after:.1f} MB; upstream connections opened {fake.connections_accepted}, "
            f"open now {fake.open_connections}"
        )
        assert streams >= CONCURRENCY
        assert fake.active_generations == 0
        assert tasks_after <= tasks_before + 2
        # A socket that carried a stream is never pooled: only the health probe's may stay open.
        assert fake.open_connections <= 1
        assert fds_after <= fds_before + 2 + 4
        assert rss_after - rss_before < 60


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=300))
async def test_fuzzed_bytes_never_crash_the_server(start_gateway: GatewayFactory, garbage: bytes) -> None:
    gw = await start_gateway(gateway_config(["http://127.0.0.1:9"], server={"access_log": "", "header_timeout": 0.5}))
    answer = await exchange(gw.port, garbage, read_until_close=True, timeout=5)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
    status, _, _ = parse(await exchange(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert status == 200
    await gw.shutdown()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    ["model", "max_tokens", "messages", "role", "content", "type", "text", "stream", "tools", "system"]
                ),
                c,
                max_size=4,
            )
        ),
        max_leaves=15,
    )
)
async def test_fuzzed_json_bodies_get_a_4xx_never_a_500(start_gateway: GatewayFactory, body: object) -> None:
    gw = await start_gateway(gateway_config(["http://127.0.0.1:9"], server={"access_log": ""}))
    payload = json.dumps(body).encode()  # the stdlib: it also writes integers orjson would refuse
    raw = (
        b"POST /proxy/dep/anthropic/v1/messages HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(payload), payload)
    )
    status, _, answer = parse(await exchange(gw.port, raw))
    # 400 for malformed input, 404 for an unknown tag, 502 if it was valid (nothing listens upstream).
    assert status in (400, 404, 502), answer
    assert orjson.loads(answer)["type"] == "error"
    await gw.shutdown()

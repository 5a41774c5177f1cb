"""Shared fixtures: a CaseDesk gateway running in the test's event loop on an ephemeral port,
in front of whatever upstreams a test gives it (usually `fake`, a tests/fake_llama.py server).
The tools behind them live in tests/support/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from casedesk.config import Config
from tests.fake_llama import FakeLlamaServer
from tests.support.gateway import GatewayFactory, RunningGateway, gateway_config, start

__all__ = ["GatewayFactory", "RunningGateway", "gateway_config"]  # imported from here by older tests

# Marked `slow` (left out of `make test-fast`): each takes seconds of wall time, measured on
# the 2-core CI box: they start processes, fuzz with hypothesis, or run several gateways.
# A module name covers all its tests; a test renamed away from this list just runs in test-fast.
SLOW = (
    "tests/test_ondemand.py",
    "tests/test_supervisor.py",
    "tests/test_prefix_routing.py",
    "tests/test_soak.py",
    "tests/test_schema.py::test_fuzzed_",
    "tests/test_affinity.py::test_memory_stays_bounded_whatever_the_traffic",
    "tests/test_logging.py::test_a_stdout_nobody_reads_never_stalls_the_gateway",
    "tests/test_logging.py::test_upstream_text_in_the_operators_log_is_escaped",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
async def fake() -> AsyncIterator[FakeLlamaServer]:
    """One fake llama-server on an ephemeral port."""
    async with FakeLlamaServer() as server:
        yield server


@pytest.fixture
async def start_gateway() -> AsyncIterator[GatewayFactory]:
    """`await start_gateway(raw_config_dict, shutdown_grace=...)` → a RunningGateway."""
    running: list[RunningGateway] = []

    async def start_one(raw: dict[str, Any] | Config, shutdown_grace: float = 5.0) -> RunningGateway:
        gateway = await start(raw, shutdown_grace)
        running.append(gateway)
        return gateway

    yield start_one
    for gateway in running:
        if not gateway.task.done():
            gateway.force.set()
            await gateway.shutdown()

"""contrib/grafana/casedesk.json queries only metrics CaseDesk exports, and covers what an
operator needs (issue 10): requests and errors by status, tokens/s, TTFT and inter-token
percentiles, queue and in-flight, upstream health, model states and loads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import GatewayFactory, gateway_config
from tests.fake_llama import FakeLlamaServer
from tests.support.wire import get

DASHBOARD = Path(__file__).resolve().parents[1] / "contrib" / "grafana" / "casedesk.json"


def queries(node: Any) -> list[str]:
    """Every PromQL string in the dashboard (panel targets and template variables)."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("expr", "query", "definition") and isinstance(v, str)]
        return found + [q for v in node.values() for q in queries(v)]
    if isinstance(node, list):
        return [q for v in node for q in queries(v)]
    return []


async def test_every_metric_the_dashboard_queries_is_exported(start_gateway: GatewayFactory) -> None:
    async with FakeLlamaServer() as fake:
        gw = await start_gateway(gateway_config([fake.url], server={"access_log": ""}))
        status, body = await get(gw, "/metrics")
    assert status == 200
    exported: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", body.decode(), re.M):
        exported.add(name)
        if kind == "histogram":
            exported.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    used = {name for query in queries(dashboard) for name in re.findall(r"\bcasedesk_[a-z0-9_]+", query)}
    assert used, "the dashboard queries nothing"
    assert used <= exported, f"not exported by CaseDesk: {sorted(used - exported)}"
    for needed in (
        "casedesk_requests_total",  # requests and errors by status
        "casedesk_output_tokens_total",  # tokens/s
        "casedesk_time_to_first_token_seconds_bucket",
        "casedesk_inter_token_seconds_bucket",
        "casedesk_in_flight_requests",
        "casedesk_queued_requests",
        "casedesk_upstream_up",
        "casedesk_model_state",
        "casedesk_model_loads_total",
        "casedesk_model_load_seconds_bucket",
        "casedesk_model_evictions_total",
    ):
        assert needed in used, needed
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(titles) == len(set(titles))

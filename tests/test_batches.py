"""The Message Batches API on real sockets, in front of tests/fake_llama.py: the official Python
SDK's calls, Anthropic's shapes, validation that names the index, owners, and the scheduling
that leaves interactive requests their slot."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anthropic
import orjson
import pytest

from casedesk.admission import Admission, TenantShare
from casedesk.batches.runner import DATABASE
from casedesk.config import load
from tests.conftest import GatewayFactory, RunningGateway, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.toml import to_toml

HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "k"}
BATCH_KEYS = {
    "id",
    "type",
    "processing_status",
    "request_counts",
    "ended_at",
    "created_at",
    "expires_at",
    "archived_at",
    "cancel_initiated_at",
    "results_url",
}


@dataclass
class Answer:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        return orjson.loads(self.content)


class Raw:
    """Plain HTTP calls (urllib on a thread) for what the SDK does not show: exact bodies."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers = headers or {}

    async def __aenter__(self) -> Raw:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    async def get(self, url: str, params: dict[str, Any] | None = None) -> Answer:
        return await asyncio.to_thread(self._call, "GET", url + ("?" + urlencode(params) if params else ""), None)

    async def post(self, url: str, content: bytes) -> Answer:
        return await asyncio.to_thread(self._call, "POST", url, content)

    def _call(self, method: str, url: str, body: bytes | None) -> Answer:
        request = urllib.request.Request(url, data=body, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return Answer(answer.status, answer.read())
        except urllib.error.HTTPError as error:
            return Answer(error.code, error.read())


def params(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": text}], **extra}


def requests_of(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "params": params(f"question {i}")} for i in range(n)]


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def started(
    start_gateway: GatewayFactory, fake: FakeLlamaServer, tmp_path: Path, **overrides: Any
) -> RunningGateway:
    server = {"state_dir": str(tmp_path / "state"), **overrides.pop("server", {})}
    return await start_gateway(gateway_config([fake.url], server=server, **overrides))


SdkFactory = Callable[..., anthropic.AsyncAnthropic]


@pytest.fixture
async def sdk() -> AsyncIterator[SdkFactory]:
    """`sdk(gateway, key="k")`: an SDK client, closed before the test's loop is."""
    clients: list[anthropic.AsyncAnthropic] = []

    def make(gateway: RunningGateway, key: str = "k") -> anthropic.AsyncAnthropic:
        clients.append(anthropic.AsyncAnthropic(base_url=gateway.base_url(), api_key=key, max_retries=0))
        return clients[-1]

    yield make
    for client in clients:
        await client.close()


async def ended(client: anthropic.AsyncAnthropic, batch_id: str, timeout: float = 15.0) -> Any:
    async def done() -> bool:
        return (await client.messages.batches.retrieve(batch_id)).processing_status == "ended"

    await until(done, timeout)
    return await client.messages.batches.retrieve(batch_id)


async def test_sdk_creates_a_batch_and_reads_every_result_once(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    async with FakeLlamaServer() as fake:
        gateway = await started(start_gateway, fake, tmp_path)
        client = sdk(gateway)
        batch = await client.messages.batches.create(requests=requests_of(12))  # type: ignore[arg-type]
        assert batch.id.startswith("msgbatch_") and batch.type == "message_batch"
        assert batch.processing_status == "in_progress" and batch.results_url is None
        assert batch.request_counts.processing == 12
        done = await ended(client, batch.id)
        assert done.request_counts.succeeded == 12 and done.request_counts.processing == 0
        assert done.results_url == f"{gateway.base_url()}/v1/messages/batches/{batch.id}/results"
        assert done.ended_at is not None and done.expires_at > done.created_at
        seen = []
        async for entry in await client.messages.batches.results(batch.id):
            assert entry.result.type == "succeeded"
            assert entry.result.message.content[0].text == "Hello world!"  # type: ignore[union-attr]
            assert entry.result.message.model == "m"  # type: ignore[union-attr]
            seen.append(entry.custom_id)
        assert sorted(seen) == sorted(f"r-{i}" for i in range(12))
        # The exact keys of Anthropic's objects, and well-formed JSON Lines.
        async with Raw(HEADERS) as raw:
            got = (await raw.get(f"{gateway.base_url()}/v1/messages/batches/{batch.id}")).json()
            assert set(got) == BATCH_KEYS and got["created_at"].endswith("Z")
            lines = (await raw.get(got["results_url"])).content.split(b"\n")
            assert lines[-1] == b"" and all(set(orjson.loads(line)) == {"custom_id", "result"} for line in lines[:-1])
        # Each item went through /v1/chat/completions as a /v1/messages request would.
        assert len(fake.chat_requests()) == 12


async def test_an_item_the_model_refuses_is_errored_with_the_anthropic_error(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    async with FakeLlamaServer(n_ctx=200) as fake:
        gateway = await started(start_gateway, fake, tmp_path)
        client = sdk(gateway)
        batch = await client.messages.batches.create(
            requests=[
                {"custom_id": "short", "params": params("hi")},  # type: ignore[list-item]
                {"custom_id": "long", "params": params("word " * 2000)},  # type: ignore[list-item]
            ]
        )
        done = await ended(client, batch.id)
        assert (done.request_counts.succeeded, done.request_counts.errored) == (1, 1)
        results = {r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)}
        assert results["short"].type == "succeeded"
        error = results["long"]
        assert error.type == "errored"
        assert error.error.type == "error" and error.error.error.type == "invalid_request_error"  # type: ignore[union-attr]
        assert "prompt is too long" in error.error.error.message  # type: ignore[union-attr]


async def test_list_pages_newest_first(start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory) -> None:
    async with FakeLlamaServer() as fake:
        gateway = await started(start_gateway, fake, tmp_path)
        client = sdk(gateway)
        ids = [(await client.messages.batches.create(requests=requests_of(1))).id for _ in range(5)]  # type: ignore[arg-type]
        newest_first = ids[::-1]
        first = await client.messages.batches.list(limit=2)
        assert [b.id for b in first.data] == newest_first[:2] and first.has_more
        assert first.first_id == newest_first[0] and first.last_id == newest_first[1]
        assert [b.id async for b in await client.messages.batches.list(limit=2)] == newest_first  # the SDK pages on
        async with Raw(HEADERS) as raw:
            url = f"{gateway.base_url()}/v1/messages/batches"
            after = (await raw.get(url, params={"limit": 2, "after_id": newest_first[3]})).json()
            assert [b["id"] for b in after["data"]] == newest_first[4:] and not after["has_more"]
            before = (await raw.get(url, params={"limit": 2, "before_id": newest_first[3]})).json()
            assert [b["id"] for b in before["data"]] == newest_first[1:3] and before["has_more"]
            bad = await raw.get(url, params={"limit": 0})
            assert bad.status_code == 400 and "limit" in bad.json()["error"]["message"]


async def test_cancel_ends_waiting_items_canceled_and_delete_only_when_ended(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    async with FakeLlamaServer(Reply(token_delay=0.1)) as fake:
        gateway = await started(start_gateway, fake, tmp_path, deployment={"batch_max_concurrency": 1})
        client = sdk(gateway)
        batch = await client.messages.batches.create(requests=requests_of(10))  # type: ignore[arg-type]
        await until(lambda: asyncio.sleep(0, bool(fake.chat_requests())))
        with pytest.raises(anthropic.ConflictError) as refused:
            await client.messages.batches.delete(batch.id)
        assert refused.value.status_code == 409 and refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        canceling = await client.messages.batches.cancel(batch.id)
        assert canceling.processing_status in ("canceling", "ended") and canceling.cancel_initiated_at is not None
        done = await ended(client, batch.id)
        counts = done.request_counts
        assert counts.succeeded >= 1 and counts.canceled >= 8 and counts.succeeded + counts.canceled == 10
        kinds = [r.result.type async for r in await client.messages.batches.results(batch.id)]
        assert sorted(kinds) == sorted(["succeeded"] * counts.succeeded + ["canceled"] * counts.canceled)
        deleted = await client.messages.batches.delete(batch.id)
        assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.batches.retrieve(batch.id)


async def test_bad_input_is_a_400_that_names_the_index(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    async with FakeLlamaServer() as fake:
        gateway = await started(
            start_gateway, fake, tmp_path, server={"max_body_bytes": 64 * 1024, "max_batch_bytes": 4 * 1024 * 1024}
        )
        url = f"{gateway.base_url()}/v1/messages/batches"

        def with_item(index: int, item: dict[str, Any], n: int = 20) -> dict[str, Any]:
            items = requests_of(n)
            items[index] = item
            return {"requests": items}

        no_max_tokens = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        cases = [
            (
                with_item(17, {"custom_id": "x", "params": no_max_tokens}),
                "requests[17].params.max_tokens: Field required",
            ),
            (with_item(3, {"custom_id": "r-1", "params": params()}), "requests[3].custom_id: 'r-1' is already"),
            (with_item(5, {"custom_id": "s", "params": params(stream=True)}), "requests[5].params.stream:"),
            (with_item(2, {"custom_id": "has space", "params": params()}), "requests[2].custom_id: must be 1 to 64"),
            (with_item(4, {"custom_id": "x" * 65, "params": params()}), "requests[4].custom_id:"),
            (
                with_item(6, {"custom_id": "m", "params": params(model="nope")}),
                "requests[6].params.model: model 'nope'",
            ),
            (
                with_item(1, {"custom_id": "t", "params": params(temperature=3)}),
                "requests[1].params.temperature: must be a number",
            ),
            ({"requests": [{"custom_id": f"c{i}"} for i in range(100_001)]}, "requests: at most 100,000 requests"),
            ({"requests": []}, "requests: must be a non-empty list"),
            ({}, "requests: Field required"),
        ]
        async with Raw(HEADERS) as raw:
            for body, message in cases:
                answer = await raw.post(url, content=orjson.dumps(body))
                assert answer.status_code == 400, (message, answer.text)
                error = answer.json()
                assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
                assert error["error"]["message"].startswith(message), error
            # Nothing of a refused batch was kept.
            assert (await raw.get(url)).json()["data"] == []
            # The batch path's own body limit: larger than max_body_bytes is fine there, not elsewhere.
            big = {"requests": requests_of(2000)}
            assert 64 * 1024 < len(orjson.dumps(big)) < 4 * 1024 * 1024
            assert (await raw.post(url, content=orjson.dumps(big))).status_code == 200
            too_big_message = await raw.post(f"{gateway.base_url()}/v1/messages", content=orjson.dumps(big))
            assert too_big_message.status_code == 413
            huge = b'{"requests": [' + b" " * (5 * 1024 * 1024) + b"]}"
            over = await raw.post(url, content=huge)
            assert over.status_code == 413 and over.json()["error"]["type"] == "request_too_large"


async def test_only_the_key_that_created_a_batch_sees_it(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    keys = ["alice-key", "bob-key"]
    hashes = [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    async with FakeLlamaServer() as fake:
        gateway = await started(start_gateway, fake, tmp_path, deployment={"api_keys_sha256": hashes})
        alice, bob = sdk(gateway, "alice-key"), sdk(gateway, "bob-key")
        batch = await alice.messages.batches.create(requests=requests_of(1))  # type: ignore[arg-type]
        await ended(alice, batch.id)
        for call in (
            bob.messages.batches.retrieve,
            bob.messages.batches.cancel,
            bob.messages.batches.delete,
            bob.messages.batches.results,
        ):
            with pytest.raises(anthropic.NotFoundError):
                await call(batch.id)
        assert (await bob.messages.batches.list()).data == []
        assert [b.id for b in (await alice.messages.batches.list()).data] == [batch.id]


async def test_an_interactive_request_waits_only_for_the_slot_that_frees_first(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    """max_concurrency 2, batch_max_concurrency 1: while the batch saturates its one slot, an
    interactive request starts at once; a second one queued behind a busy slot gets the batch
    item's slot when it frees, before any further batch item."""
    item_seconds = 0.6
    async with FakeLlamaServer(Reply(tokens=["a", "b"], token_delay=item_seconds / 2)) as fake:
        gateway = await started(
            start_gateway,
            fake,
            tmp_path,
            server={"access_log": str(tmp_path / "access.log")},
            deployment={"max_concurrency": 2, "batch_max_concurrency": 1},
        )
        client = sdk(gateway)
        batch = await client.messages.batches.create(requests=requests_of(6))  # type: ignore[arg-type]
        await until(lambda: asyncio.sleep(0, len(fake.chat_requests()) == 1))

        async def interactive(text: str) -> float:
            begun = time.monotonic()
            await client.messages.create(**params(text))
            return time.monotonic() - begun

        first = asyncio.ensure_future(interactive("interactive one"))
        await until(lambda: asyncio.sleep(0, len(fake.chat_requests()) == 2))
        second = await interactive("interactive two")  # both slots busy: it queues
        assert await first < item_seconds * 1.6
        assert second < item_seconds * 2.2  # waited for one slot to free, never for a batch item to start
        assert (await ended(client, batch.id)).request_counts.succeeded == 6
        texts = [r.body["messages"][-1]["content"] for r in fake.chat_requests()]
        # The queued interactive request went upstream before any batch item after the first.
        assert texts[:3] == ["question 0", "interactive one", "interactive two"]
        # Each item has its access-log line, naming its batch and custom_id.
        lines = [orjson.loads(line) for line in (tmp_path / "access.log").read_bytes().splitlines()]
        items = [line for line in lines if line.get("batch_id") == batch.id]
        assert sorted(line["custom_id"] for line in items) == sorted(f"r-{i}" for i in range(6))
        assert all(line["status"] == 200 and line["output_tokens"] == 2 for line in items)


async def test_metrics_count_batches_and_items(start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory) -> None:
    async with FakeLlamaServer() as fake:
        gateway = await started(start_gateway, fake, tmp_path)
        client = sdk(gateway)
        batch = await client.messages.batches.create(requests=requests_of(3))  # type: ignore[arg-type]
        await ended(client, batch.id)
        async with Raw() as raw:

            async def shown() -> bool:
                text = (await raw.get(f"{gateway.url}/metrics")).text
                return 'casedesk_batches{processing_status="ended"} 1' in text and (
                    'casedesk_batch_items{result="succeeded"} 3' in text
                )

            await until(shown, timeout=5)
            text = (await raw.get(f"{gateway.url}/metrics")).text
            assert 'casedesk_batch_items_waiting{deployment="dep"} 0' in text
            assert 'casedesk_batch_items_running{deployment="dep"} 0' in text
            assert 'casedesk_requests_total{deployment="dep",model="m",status="200"} 3' in text


async def test_a_restart_runs_what_was_left_and_keeps_what_was_written(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    async with FakeLlamaServer(Reply(token_delay=0.05)) as fake:
        gateway = await started(start_gateway, fake, tmp_path, deployment={"batch_max_concurrency": 2})
        client = sdk(gateway)
        batch = await client.messages.batches.create(requests=requests_of(20))  # type: ignore[arg-type]

        async def some_done() -> bool:
            return (await client.messages.batches.retrieve(batch.id)).request_counts.succeeded >= 3

        await until(some_done)
        gateway.force.set()
        await gateway.shutdown()
        again = await started(start_gateway, fake, tmp_path)
        client = sdk(again)
        done = await ended(client, batch.id)
        assert done.request_counts.succeeded == 20
        ids = [r.custom_id async for r in await client.messages.batches.results(batch.id)]
        assert sorted(ids) == sorted(f"r-{i}" for i in range(20))


async def test_an_item_whose_upstream_failed_waits_and_runs_again(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    """A server fault the request did not cause (here llama-server's 500) is not the item's
    result: the item is tried again after a pause, and succeeds."""
    async with FakeLlamaServer() as fake:
        fake.replies.append(Reply(status=500, error_message="scripted crash"))
        gateway = await started(start_gateway, fake, tmp_path, deployment={"batch_max_concurrency": 1})
        client = sdk(gateway)
        batch = await client.messages.batches.create(requests=requests_of(1))  # type: ignore[arg-type]
        done = await ended(client, batch.id)
        assert done.request_counts.succeeded == 1 and done.request_counts.errored == 0
        assert len(fake.chat_requests()) == 2


async def test_items_that_share_a_prefix_go_where_it_is_cached(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    """balance = "prefix" routes batch items as it routes interactive requests: one system
    prompt, many questions, one after another, all on the upstream that holds that prompt.
    (Items running at once are parallel branches of one prefix to the balancer, which may
    give a second, idler upstream one prefill of it: upstream/affinity.py.)"""
    system = "You are a careful classifier of customer feedback. " * 40
    async with FakeLlamaServer() as one, FakeLlamaServer() as two:
        gateway = await start_gateway(
            gateway_config(
                [one.url, two.url],
                server={"state_dir": str(tmp_path / "state")},
                deployment={"max_concurrency": 4, "batch_max_concurrency": 1},
            )
        )
        client = sdk(gateway)
        items = [{"custom_id": f"f-{i}", "params": params(f"feedback {i}", system=system)} for i in range(8)]
        batch = await client.messages.batches.create(requests=items)  # type: ignore[arg-type]
        assert (await ended(client, batch.id)).request_counts.succeeded == 8
        served = sorted([len(one.chat_requests()), len(two.chat_requests())])
        assert served == [0, 8]


# -- batches and tenants (issues 17 and 18) ----------------------------------------------------------


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def with_tenants(fake: FakeLlamaServer, tmp_path: Path, tenants: dict[str, dict[str, Any]], **overrides: Any) -> Any:
    """gateway_config whose "dep" lets every tenant in; tenant NAME's key is "key-NAME"."""
    server = {"state_dir": str(tmp_path / "state"), "access_log": str(tmp_path / "access.log")}
    raw = gateway_config([fake.url], server=server, **overrides)
    raw["deployments"]["dep"]["tenants"] = ["*"]
    raw["tenants"] = {name: {"keys_sha256": [sha(f"key-{name}")], **table} for name, table in tenants.items()}
    return raw


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's series that carry these labels."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_an_item_waits_for_its_tenants_output_tokens_and_is_charged_them(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    """alice at 600 output tokens a minute (10 a second) has overdrawn her bucket; her batch's
    items are started only as it refills (none gets a 429), and each is charged to her as a
    /v1/messages request is: a request, its input tokens, its output tokens."""
    per_minute, item_tokens, items = 600, 3, 4  # the fake's default answer is 3 tokens
    async with FakeLlamaServer() as fake:
        gateway = await start_gateway(
            with_tenants(
                fake,
                tmp_path,
                {"alice": {"output_tokens_per_minute": per_minute}},
                deployment={"batch_max_concurrency": 1},
            )
        )
        client = sdk(gateway, "key-alice")
        begun = time.monotonic()
        fake.replies.append(Reply(tokens=["x"] * (per_minute + 5)))
        drained = await client.messages.create(**{**params("use it all"), "max_tokens": 1000})
        assert drained.usage.output_tokens == per_minute + 5  # her bucket: -5, positive again in 0.5 s
        created = time.monotonic()
        batch = await client.messages.batches.create(requests=requests_of(items))  # type: ignore[arg-type]
        done = await ended(client, batch.id)
        took = time.monotonic() - created
        assert done.request_counts.succeeded == items and done.request_counts.errored == 0
        results = [r.result async for r in await client.messages.batches.results(batch.id)]
        assert all(r.type == "succeeded" for r in results)
        # Each item waited for the bucket to be positive again: 5 + 3 tokens per item but the
        # last at 10 a second. (Without the wait the four would take a few milliseconds.)
        refill = (5 + item_tokens * (items - 1)) / (per_minute / 60)
        assert took >= refill * 0.9, took
        async with Raw(HEADERS | {"x-api-key": "key-alice"}) as raw:
            text = (await raw.get(f"{gateway.url}/metrics")).text
        elapsed = time.monotonic() - begun
        charged = per_minute + 5 + item_tokens * items
        assert metric(text, "casedesk_tenant_output_tokens_total", tenant="alice") == charged
        assert metric(text, "casedesk_tenant_requests_total", tenant="alice", model="m", status="200") == 1 + items
        batch_input = sum(r.message.usage.input_tokens for r in results)  # type: ignore[union-attr]
        assert metric(text, "casedesk_tenant_input_tokens_total", tenant="alice") == (
            drained.usage.input_tokens + batch_input
        )
        assert metric(text, "casedesk_tenant_rate_limited_total", tenant="alice") == 0
        # Her bucket holds what was charged, less what refilled meanwhile; never more than one
        # item below zero (an item starts only while it is positive).
        level = metric(text, "casedesk_tenant_bucket_tokens", tenant="alice", limit="output_tokens")
        assert -item_tokens - 0.01 <= level <= per_minute - charged + elapsed * per_minute / 60
        lines = [orjson.loads(line) for line in (tmp_path / "access.log").read_bytes().splitlines()]
        logged = [line for line in lines if line.get("batch_id") == batch.id]
        assert len(logged) == items and all(line["tenant"] == "alice" and line["status"] == 200 for line in logged)


async def test_two_tenants_batches_take_turns(start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory) -> None:
    """One item at a time: alice's batch came first and its first item is slow; bob's batch,
    created meanwhile, then alternates with hers item by item, oldest batch first."""
    async with FakeLlamaServer() as fake:
        fake.replies.append(Reply(token_delay=0.5))  # alice's first item: 1.5 s
        gateway = await start_gateway(
            with_tenants(fake, tmp_path, {"alice": {}, "bob": {}}, deployment={"batch_max_concurrency": 1})
        )
        alice, bob = sdk(gateway, "key-alice"), sdk(gateway, "key-bob")

        def items(who: str) -> Any:
            return [{"custom_id": f"{who}-{i}", "params": params(f"{who} {i}")} for i in range(3)]

        first = await alice.messages.batches.create(requests=items("alice"))
        await until(lambda: asyncio.sleep(0, len(fake.chat_requests()) == 1))
        second = await bob.messages.batches.create(requests=items("bob"))
        await ended(alice, first.id)
        await ended(bob, second.id)
        texts = [r.body["messages"][-1]["content"] for r in fake.chat_requests()]
        assert texts == ["alice 0", "bob 0", "alice 1", "bob 1", "alice 2", "bob 2"]


async def test_a_tenant_removed_by_a_reload_has_the_rest_of_its_batch_refused(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    """The item running when alice is removed finishes; the rest of her batch ends errored with
    the 403 her requests now get, instead of running uncharged; bob's batch is untouched."""
    async with FakeLlamaServer() as fake:
        fake.replies.append(Reply(token_delay=0.3))  # her first item: about a second
        raw = with_tenants(fake, tmp_path, {"alice": {}, "bob": {}}, deployment={"batch_max_concurrency": 1})
        path = tmp_path / "casedesk.toml"
        path.write_text(to_toml(raw))
        gateway = await start_gateway(load(path))
        alice = sdk(gateway, "key-alice")
        batch = await alice.messages.batches.create(requests=requests_of(3))  # type: ignore[arg-type]
        await until(lambda: asyncio.sleep(0, len(fake.chat_requests()) == 1))
        del raw["tenants"]["alice"]
        path.write_text(to_toml(raw))
        gateway.reload.set()
        async with Raw(HEADERS | {"x-api-key": "key-bob"}) as raw_bob:
            await until(lambda: asyncio.sleep(0, not gateway.reload.is_set()))
            assert (await raw_bob.get(f"{gateway.url}/metrics")).status_code == 200
        bob = sdk(gateway, "key-bob")
        done = await ended(bob, (await bob.messages.batches.create(requests=requests_of(1))).id)
        assert done.request_counts.succeeded == 1
        with pytest.raises(anthropic.AuthenticationError):
            await alice.messages.batches.retrieve(batch.id)  # her key went with her
        # So her batch is read where it is kept: the state directory's SQLite file.
        database = tmp_path / "state" / DATABASE

        def stored() -> tuple[float | None, list[Any]]:
            with sqlite3.connect(database) as db:
                (ended_at,) = db.execute("SELECT ended_at FROM batches WHERE id = ?", (batch.id,)).fetchone()
                rows = db.execute(
                    "SELECT result FROM items WHERE batch = (SELECT seq FROM batches WHERE id = ?) ORDER BY idx",
                    (batch.id,),
                ).fetchall()
            return ended_at, [orjson.loads(r) if r is not None else None for (r,) in rows]

        await until(lambda: asyncio.sleep(0, stored()[0] is not None))
        results = stored()[1]
        assert [r["type"] for r in results] == ["succeeded", "errored", "errored"]
        refused = results[1]["error"]["error"]
        assert refused["type"] == "permission_error" and "alice" in refused["message"]
        assert len(fake.chat_requests()) == 2  # her first item, and bob's


async def test_a_tenants_batch_is_invisible_to_another_tenant(
    start_gateway: GatewayFactory, tmp_path: Path, sdk: SdkFactory
) -> None:
    async with FakeLlamaServer() as fake:
        gateway = await start_gateway(with_tenants(fake, tmp_path, {"alice": {}, "bob": {}}))
        alice, bob = sdk(gateway, "key-alice"), sdk(gateway, "key-bob")
        batch = await alice.messages.batches.create(requests=requests_of(2))  # type: ignore[arg-type]
        await ended(alice, batch.id)
        for call in (
            bob.messages.batches.retrieve,
            bob.messages.batches.cancel,
            bob.messages.batches.delete,
            bob.messages.batches.results,
        ):
            with pytest.raises(anthropic.NotFoundError) as missing:
                await call(batch.id)
            assert missing.value.status_code == 404
            assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        assert (await bob.messages.batches.list()).data == []
        assert [b.id for b in (await alice.messages.batches.list()).data] == [batch.id]
        with pytest.raises(anthropic.AuthenticationError):
            await sdk(gateway, "nobody's key").messages.batches.retrieve(batch.id)
        assert (await alice.messages.batches.delete(batch.id)).type == "message_batch_deleted"


def test_an_items_acquire_as_its_tenant_takes_a_free_slot_in_the_same_step() -> None:
    """The runner starts an item only when nobody is queued and a slot is free, and then takes
    the slot as the batch's tenant in that same step: with the fair queue too, whatever the
    tenant's share (weight, priority, its own max_queue), that acquire never suspends."""
    shares = {"alice": TenantShare(weight=2.0, priority="low", max_queue=1)}
    admission = Admission(max_concurrency=2, max_queue=4, queue_timeout=1.0, shares=shares)
    for tenant in ("alice", "alice"):
        acquiring = admission.acquire(tenant)
        with pytest.raises(StopIteration):  # finished at its first step: it never waited
            acquiring.send(None)
    assert admission.in_flight_of("alice") == 2 and admission.queued == 0
    admission.release("alice")
    admission.release("alice")
    assert admission.in_flight == 0

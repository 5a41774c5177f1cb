"""Message Batches with the official Python SDK, end to end on the real llama-server and model:
create, retrieve until ended, results, list pages, cancel, delete."""

from __future__ import annotations

import time
from typing import Any

import anthropic

from tests.e2e.conftest import MODEL


def request(i: int, max_tokens: int = 8) -> dict[str, Any]:
    return {
        "custom_id": f"q-{i}",
        "params": {
            "model": MODEL,
            "max_tokens": max_tokens,
            "system": "You answer in one short sentence.",
            "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
        },
    }


def until_ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := client.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    return batch


def test_a_batch_of_twenty_answers_every_custom_id_once(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request(i) for i in range(20)])  # type: ignore[misc]
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 20
    done = until_ended(client, batch.id)
    assert done.request_counts.succeeded == 20 and done.results_url
    seen: dict[str, str] = {}
    for entry in client.messages.batches.results(batch.id):
        assert entry.custom_id not in seen
        assert entry.result.type == "succeeded"
        message = entry.result.message
        assert message.model == MODEL and message.content and 0 < message.usage.output_tokens <= 8
        seen[entry.custom_id] = message.content[0].text  # type: ignore[union-attr]
    assert sorted(seen) == sorted(f"q-{i}" for i in range(20))
    page = client.messages.batches.list(limit=1)
    assert page.data[0].id == batch.id and len(page.data) == 1
    assert batch.id in [b.id for b in client.messages.batches.list(limit=1)]  # the SDK pages on
    deleted = client.messages.batches.delete(batch.id)
    assert deleted.type == "message_batch_deleted"


def test_cancel_a_long_batch_ends_it_with_canceled_items(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request(i, max_tokens=48) for i in range(40)])  # type: ignore[misc]
    canceling = client.messages.batches.cancel(batch.id)
    assert canceling.cancel_initiated_at is not None
    done = until_ended(client, batch.id)
    counts = done.request_counts
    assert counts.canceled >= 30 and counts.canceled + counts.succeeded == 40
    kinds = [entry.result.type for entry in client.messages.batches.results(batch.id)]
    assert kinds.count("canceled") == counts.canceled and len(kinds) == 40
    client.messages.batches.delete(batch.id)

"""The Message Batches API under /proxy/{deployment}/anthropic/v1/messages/batches (issue 18).

create, list, retrieve, cancel, delete and results, in Anthropic's shapes. Create validates
everything before it keeps anything: each `params` exactly as POST …/v1/messages validates it
(anthropic/schema.py, its errors prefixed with `requests[i].params.`), `stream` refused, each
custom_id unique and 1–64 of [A-Za-z0-9_-], at most 100,000 requests, a model the deployment
serves; the batch is acknowledged once committed (batches/store.py). A batch belongs to the
tenant that created it (batches/owner.py; the key's SHA-256 on a deployment with anonymous
keys; anyone on an open deployment): only its owner sees it, and another's gets a 404.
"""

from __future__ import annotations

import asyncio
import os
import re
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs

import orjson

from casedesk.anthropic.errors import ApiError, invalid_request, not_found
from casedesk.anthropic.schema import parse_messages_request, request_json
from casedesk.batches.owner import tenant_owner
from casedesk.batches.runner import BatchRunner
from casedesk.batches.store import BatchDatabase, BatchRow
from casedesk.http.server import Request, ResponseWriter
from casedesk.ops.accesslog import RequestRecord
from casedesk.serving import DeploymentState
from casedesk.tenancy.directory import key_digest, request_key

MAX_REQUESTS = 100_000
CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESULTS_PAGE = 500  # results read from the database per write


def owner_of(deployment: DeploymentState, request: Request, tenant: str) -> str | None:
    """Who a batch belongs to: its tenant (issue 17); on a deployment with anonymous keys, the
    key's hash; else nobody (None: any key sees it)."""
    if tenant:
        return tenant_owner(tenant)
    return key_digest(request_key(request.headers)) if deployment.config.api_keys_sha256 else None


async def handle_create_batch(
    runner: BatchRunner, deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    record.tenant = tenant = deployment.authorize(request.headers, request.client)
    # Parsing and checking up to max_batch_bytes of JSON takes a while: not on the event loop.
    items = await asyncio.to_thread(validate_batch, deployment, request)
    now = runner.clock()
    batch_id = "msgbatch_" + os.urandom(12).hex()
    owner = owner_of(deployment, request, tenant)
    row = await runner.store.call(
        lambda db: db.create(batch_id, deployment.config.id, owner, now, now + runner.item_ttl, items)
    )
    runner.added(row)
    writer.send(200, orjson.dumps(batch_object(row, _base_url(deployment, request))))


def validate_batch(deployment: DeploymentState, request: Request) -> list[tuple[str, bytes]]:
    """Every request checked, or the first mistake as a 400 naming its index; the items as
    (custom_id, params JSON)."""
    body = request_json(request.headers, request.body)
    if not isinstance(body, dict):
        raise invalid_request("request body must be a JSON object with requests")
    requests = body.get("requests")
    if requests is None:
        raise invalid_request("requests: Field required")
    if not isinstance(requests, list) or not requests:
        raise invalid_request("requests: must be a non-empty list of {custom_id, params} objects")
    if len(requests) > MAX_REQUESTS:
        raise invalid_request(f"requests: at most {MAX_REQUESTS:,} requests in a batch, got {len(requests):,}")
    seen: dict[str, int] = {}
    items: list[tuple[str, bytes]] = []
    for i, entry in enumerate(requests):
        where = f"requests[{i}]"
        if not isinstance(entry, dict):
            raise invalid_request(f"{where}: must be an object with custom_id and params")
        custom_id = entry.get("custom_id")
        if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
            raise invalid_request(
                f"{where}.custom_id: must be 1 to 64 letters, digits, underscores or hyphens, got {custom_id!r}"
            )
        if custom_id in seen:
            raise invalid_request(
                f"{where}.custom_id: {custom_id!r} is already the custom_id of requests[{seen[custom_id]}]"
            )
        seen[custom_id] = i
        params = entry.get("params")
        if not isinstance(params, dict):
            raise invalid_request(f"{where}.params: must be an object (the body of a Messages API request)")
        if params.get("stream") is True:
            raise invalid_request(f"{where}.params.stream: streaming is not supported in a batch")
        try:
            parsed = parse_messages_request(params)
            deployment.model(parsed.model)
        except ApiError as error:
            # The schema's messages start with their field ("max_tokens: …"); the model's is a 404.
            field = "" if error.status == 400 else "model: "
            raise invalid_request(f"{where}.params.{field}{error.message}") from None
        items.append((custom_id, orjson.dumps(params)))
    return items


async def handle_list_batches(
    runner: BatchRunner, deployment: DeploymentState, request: Request, writer: ResponseWriter, record: RequestRecord
) -> None:
    record.tenant = tenant = deployment.authorize(request.headers, request.client)
    query = {key: values[-1] for key, values in parse_qs(request.query).items()}
    raw_limit = query.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
        raise invalid_request(f"limit: must be an integer between 1 and 1000, got {raw_limit!r}")
    limit, before, after = int(raw_limit), query.get("before_id"), query.get("after_id")
    owner = owner_of(deployment, request, tenant)
    rows, has_more = await runner.store.call(
        lambda db: db.page(deployment.config.id, owner, limit, before, after) if runner.store.exists() else ([], False)
    )
    base = _base_url(deployment, request)
    data = [batch_object(row, base) for row in rows]
    page = {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
    writer.send(200, orjson.dumps(page))


async def handle_get_batch(
    runner: BatchRunner,
    deployment: DeploymentState,
    request: Request,
    writer: ResponseWriter,
    record: RequestRecord,
    batch_id: str,
) -> None:
    row = await _find(runner, deployment, request, record, batch_id)
    writer.send(200, orjson.dumps(batch_object(row, _base_url(deployment, request))))


async def handle_cancel_batch(
    runner: BatchRunner,
    deployment: DeploymentState,
    request: Request,
    writer: ResponseWriter,
    record: RequestRecord,
    batch_id: str,
) -> None:
    row = await _find(runner, deployment, request, record, batch_id)
    if row.processing_status == "in_progress":
        row = await runner.cancel(row)
    writer.send(200, orjson.dumps(batch_object(row, _base_url(deployment, request))))


async def handle_delete_batch(
    runner: BatchRunner,
    deployment: DeploymentState,
    request: Request,
    writer: ResponseWriter,
    record: RequestRecord,
    batch_id: str,
) -> None:
    row = await _find(runner, deployment, request, record, batch_id)
    if row.processing_status != "ended":
        raise ApiError(
            409,
            f"batch {batch_id} is {row.processing_status}: only an ended batch can be deleted (cancel it first)",
            "invalid_request_error",
        )
    await runner.store.call(lambda db: db.delete(row.seq))
    await runner.deleted(row)
    writer.send(200, orjson.dumps({"id": batch_id, "type": "message_batch_deleted"}))


async def handle_batch_results(
    runner: BatchRunner,
    deployment: DeploymentState,
    request: Request,
    writer: ResponseWriter,
    record: RequestRecord,
    batch_id: str,
) -> None:
    row = await _find(runner, deployment, request, record, batch_id)
    if row.processing_status != "ended":
        raise invalid_request(
            f"batch {batch_id} has not ended yet: its results are ready once processing_status is ended"
        )
    flow = _Flow()
    writer.set_flow_listener(flow)
    writer.start_stream(content_type="application/binary")
    after = -1
    while True:
        page = await runner.store.call(BatchDatabase.results, row.seq, after, RESULTS_PAGE)
        if not page:
            break
        writer.write(
            b"".join(
                b'{"custom_id":' + orjson.dumps(custom_id) + b',"result":' + result + b"}\n"
                for _, custom_id, result in page
            )
        )
        after = page[-1][0]
        await flow.drained()
    writer.end()


class _Flow:
    """Holds the results stream while the client's socket is full (pause/resume from http/)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    async def drained(self) -> None:
        await self._open.wait()


async def _find(
    runner: BatchRunner, deployment: DeploymentState, request: Request, record: RequestRecord, batch_id: str
) -> BatchRow:
    """The batch if the request's owner has it; else a 404 (another's batch is not there)."""
    record.tenant = tenant = deployment.authorize(request.headers, request.client)
    owner = owner_of(deployment, request, tenant)

    def get(db: BatchDatabase) -> BatchRow | None:
        return db.get(deployment.config.id, owner, batch_id)

    row = await runner.store.call(get) if runner.store.exists() else None
    if row is None:
        raise not_found(f"batch {batch_id!r} not found")
    return row


def _base_url(deployment: DeploymentState, request: Request) -> str:
    """This deployment's base URL as the client reached it (or as [server] public_url says)."""
    root = deployment.settings.public_url or "http://" + request.headers.get("host", "localhost")
    return f"{root}/proxy/{deployment.config.id}/anthropic"


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def batch_object(row: BatchRow, base_url: str) -> dict[str, Any]:
    """Anthropic's MessageBatch object."""
    ended = row.ended_at is not None
    return {
        "id": row.id,
        "type": "message_batch",
        "processing_status": row.processing_status,
        "request_counts": {
            "processing": row.processing,
            "succeeded": row.succeeded,
            "errored": row.errored,
            "canceled": row.canceled,
            "expired": row.expired,
        },
        "ended_at": rfc3339(row.ended_at),
        "created_at": rfc3339(row.created_at),
        "expires_at": rfc3339(row.expires_at),
        "archived_at": None,
        "cancel_initiated_at": rfc3339(row.cancel_initiated_at),
        "results_url": f"{base_url}/v1/messages/batches/{row.id}/results" if ended else None,
    }

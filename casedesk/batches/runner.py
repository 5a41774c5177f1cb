"""The batch runner: carries out the scheduler's decisions (casedesk/batches/scheduler.py) and
writes each item's result (casedesk/batches/store.py).

An item runs the very code a non-streamed POST …/v1/messages runs (answering/answer.py
`answer_message`): the same translation, failover and prefix routing (`balance = "prefix"`
sends items that share a system prompt where it is cached), the same Anthropic errors. It
is its batch's tenant's request (batches/owner.py): it holds an admission slot as that tenant
(Admission.acquire/release), so it counts against max_concurrency and the tenant's fair share,
and it is started only when that acquire cannot wait; it is charged to the tenant's rate
limits as /v1/messages is (one request, its uncached input and its output tokens). When those
limits are spent it takes nothing and waits: the scheduler starts nothing of that tenant until
the limiter says its next request would pass (no 429 result). Its result is committed before
it counts; an item cut short (shutdown, crash) has no result and runs again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import orjson

from casedesk.anthropic.errors import ApiError
from casedesk.anthropic.schema import parse_messages_request
from casedesk.batches.owner import tenant_of
from casedesk.batches.scheduler import ITEM_TTL, BatchScheduler, Capacity, Expire, Start
from casedesk.batches.store import BatchDatabase, BatchRow, BatchStore, Item
from casedesk.answering.answer import answer_message
from casedesk.tenancy.charge import Charge
from casedesk.http.server import new_request_id
from casedesk.ops.accesslog import RequestRecord
from casedesk.serving import DeploymentState

log = logging.getLogger("casedesk.batches")

CANCELED = orjson.dumps({"type": "canceled"})
EXPIRED = orjson.dumps({"type": "expired"})
TICK = 0.05  # seconds between looks at the deployments' load when nothing else wakes the runner
PURGE_EVERY = 600.0  # seconds between retention sweeps
# Failures that are not the item's fault (no upstream, the model loading or overloaded): the
# item waits and is tried again, its batch paused a while, up to MAX_ATTEMPTS times in all.
RETRIED = frozenset({502, 503, 504, 529})
MAX_ATTEMPTS = 5
RETRY_PAUSE = 2.0  # seconds, doubled at each attempt
DAY = 86400.0
DATABASE = "batches.sqlite3"  # in ServerSettings.state_path(), the state directory


class BatchRunner:
    """Runs the items of every deployment's batches on what interactive traffic leaves."""

    def __init__(
        self,
        store: BatchStore,
        deployments: Callable[[], Mapping[str, DeploymentState]],
        account: Callable[[RequestRecord, int], None],
        retention_days: float,
        item_ttl: float = ITEM_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.scheduler = BatchScheduler(item_ttl)
        self.item_ttl = item_ttl
        self.clock = clock
        self._deployments = deployments
        self._account = account
        self._retention = retention_days * DAY
        self._seq: dict[str, int] = {}  # batch id → its row
        self._tenant: dict[str, str] = {}  # batch id → the tenant its items are charged to
        # Which item each batch claimed last, and the ones running: changed only on the
        # store's thread (claim, finish, cancel run there one after another), so a cancel
        # sees exactly the items that have started.
        self._cursor: dict[int, int] = {}
        self._running: dict[int, set[int]] = {}
        self._again: dict[int, list[int]] = {}  # items to try again before the next new one
        self._attempts: dict[tuple[int, int], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._paused = False
        self.totals: tuple[dict[str, int], dict[str, int]] = ({}, {})  # for /metrics, refreshed each second

    # -- life --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Find the batches a previous run left unfinished (their items without a result wait
        again), then schedule."""
        if self.store.exists():

            def unfinished(db: BatchDatabase) -> list[tuple[BatchRow, int]]:
                return [(row, db.without_result(row.seq)) for row in db.unfinished()]

            for row, waiting in await self.store.call(unfinished):
                self._schedule(row, waiting)
            self.totals = await self.store.call(BatchDatabase.totals)
        self._loop_task = asyncio.create_task(self._run(), name="batches")

    def pause(self) -> None:
        """Start nothing more (shutting down); running items go on."""
        self._paused = True

    async def stop(self, grace: float = 0.0) -> None:
        """Let running items finish for up to `grace` seconds, then end everything: items cut
        short have no result and run again at the next start."""
        self._paused = True
        if self._tasks and grace > 0:
            await asyncio.wait(list(self._tasks), timeout=grace)
        tasks = [*self._tasks, *([self._loop_task] if self._loop_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.close()

    # -- what the endpoints tell it ------------------------------------------------------------------

    def added(self, row: BatchRow) -> None:
        """A batch was committed: its items may start."""
        self._schedule(row, row.processing)
        self._wake.set()

    async def cancel(self, row: BatchRow) -> BatchRow:
        """Items not started become `canceled`; running ones finish (then the batch ends)."""
        self.scheduler.stopped(row.id)
        return await self._close(row, "canceled", CANCELED)

    async def _finish_cancel(self, row: BatchRow) -> None:
        await self._close(row, "canceled", CANCELED)

    async def deleted(self, row: BatchRow) -> None:
        """An ended batch was deleted: what is remembered of it goes too."""
        self.scheduler.stopped(row.id)
        self._seq.pop(row.id, None)
        self._tenant.pop(row.id, None)
        await self.store.call(lambda db: self._forget(row.seq))

    # -- the loop ------------------------------------------------------------------------------------

    def _schedule(self, row: BatchRow, waiting: int) -> None:
        self._seq[row.id] = row.seq
        tenant = self._tenant[row.id] = tenant_of(row.owner)
        if row.cancel_initiated_at is None:
            self.scheduler.added(row.id, row.deployment, tenant, row.created_at, waiting)
        # A batch canceled before a crash has only items that were running then: they get
        # `canceled` too (the cancel promised that nothing more starts).
        elif waiting:
            self._keep(asyncio.ensure_future(self._finish_cancel(row)))

    def capacity(self) -> dict[str, Capacity]:
        return {
            name: Capacity(
                dep.admission.queued, dep.admission.in_flight, dep.admission.max_concurrency, dep.config.batch_limit
            )
            for name, dep in self._deployments().items()
        }

    async def _run(self) -> None:
        next_totals = next_purge = 0.0
        while True:
            now = self.clock()
            if not self._paused:
                self._act(now)
            if now >= next_totals and self.store.exists():
                next_totals = now + 1.0
                self.totals = await self.store.call(BatchDatabase.totals)
            if now >= next_purge and self.store.exists():
                next_purge = now + PURGE_EVERY
                ended_before = now - self._retention
                purged = await self.store.call(BatchDatabase.purge, ended_before)
                if purged:
                    log.info("deleted %d batches that ended over %g days ago", purged, self._retention / DAY)
            self._wake.clear()
            # With items waiting, look at the load often (a slot frees without telling us);
            # with none, only a new batch (the wake-up) or the next round of totals matters.
            tick = TICK if self.scheduler.deployments() else 1.0
            try:
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _act(self, now: float) -> None:
        deployments = self._deployments()
        for action in self.scheduler.decide(now, self.capacity()):
            if isinstance(action, Start):
                self._keep(asyncio.ensure_future(self._item(deployments[action.deployment], action.batch_id)))
            elif isinstance(action, Expire):
                self._keep(asyncio.ensure_future(self._expire(action.batch_id)))

    def _keep(self, task: asyncio.Future[None]) -> None:
        assert isinstance(task, asyncio.Task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one item -------------------------------------------------------------------------------------

    async def _item(self, deployment: DeploymentState, batch_id: str) -> None:
        admission = deployment.admission
        tenant = self._tenant.get(batch_id, "")
        # Looked at again in the step that takes the slot: an interactive request that came in
        # since the decision goes first, and the acquire below is granted without waiting
        # (Admission.acquire takes a slot at once, in this same step, whenever nobody is queued
        # and one is free, whoever the tenant).
        if admission.queued or admission.in_flight >= admission.max_concurrency:
            self.scheduler.returned(batch_id)
            self._wake.set()
            return
        await admission.acquire(tenant)
        pause = limited = 0.0
        try:
            charge = Charge(deployment.limiter, tenant)
            limited = await _budget(charge, deployment)
            if not limited:
                pause = await self._claim_and_run(deployment, batch_id, charge)
        finally:
            admission.release(tenant)
            if limited:
                self.scheduler.limited(batch_id, self.clock() + limited)
            elif pause:
                self.scheduler.retry_later(batch_id, self.clock() + pause)
            else:
                self.scheduler.finished(batch_id)
            self._wake.set()

    async def _claim_and_run(self, deployment: DeploymentState, batch_id: str, charge: Charge) -> float:
        """Run the batch's next item and keep its result; or, after a failure that was not
        its fault, give it back: the seconds its batch should pause then (else 0)."""
        seq = self._seq.get(batch_id)
        if seq is None:
            return 0.0
        item = await self.store.call(lambda db: self._claim(db, seq))
        if item is None:
            return 0.0
        record = RequestRecord(
            new_request_id(),
            "POST",
            f"/proxy/{deployment.config.id}/anthropic/v1/messages",
            "batch",
            time.monotonic(),
            deployment=deployment.config.id,
            batch_id=batch_id,
            custom_id=item.custom_id,
            tenant=charge.tenant,
        )
        status = 200
        try:
            result = await self._answer(deployment, item, record, charge)
        except ApiError as error:
            status = error.status
            result = b'{"type":"errored","error":' + error.body() + b"}"
            attempts = await self.store.call(lambda db: self._try_again(seq, item.index, status))
            if attempts:
                log.warning(
                    "batch %s item %s: %s (attempt %d of %d; it waits)",
                    batch_id,
                    item.custom_id,
                    error.message,
                    attempts,
                    MAX_ATTEMPTS,
                )
                record.status = status
                self._account(record, status)
                return float(RETRY_PAUSE * 2 ** (attempts - 1))
        except asyncio.CancelledError:
            await asyncio.shield(self.store.call(lambda db: self._unclaim(seq, item.index)))
            raise
        except Exception:
            log.exception("batch %s item %s failed", batch_id, item.custom_id)
            status = 500
            result = b'{"type":"errored","error":' + ApiError(500, "internal error in the gateway").body() + b"}"
        record.status = status
        result_type = "succeeded" if status == 200 else "errored"
        now = self.clock()
        await asyncio.shield(self.store.call(lambda db: self._finish(db, seq, item.index, result_type, result, now)))
        self._account(record, status)
        return 0.0

    @staticmethod
    async def _answer(deployment: DeploymentState, item: Item, record: RequestRecord, charge: Charge) -> bytes:
        tenant = charge.tenant
        if tenant and (tenant not in deployment.directory.tenants or not deployment.config.allows(tenant)):
            # A reload removed the tenant, or its access to this deployment: what is left of its
            # batch is refused as its requests now would be, never run uncharged.
            raise ApiError(
                403,
                f"tenant {tenant!r} may no longer use deployment {deployment.config.id!r}: "
                "the configuration changed after this batch was created",
            )
        parsed = parse_messages_request(orjson.loads(item.params))  # validated at create: the same checks
        record.model = parsed.model
        message = await answer_message(deployment, parsed, record, charge)
        return b'{"type":"succeeded","message":' + orjson.dumps(message) + b"}"

    # -- on the store's thread ------------------------------------------------------------------------------

    def _claim(self, db: BatchDatabase, seq: int) -> Item | None:
        again = self._again.get(seq)
        item = None
        while again and item is None:
            item = db.item(seq, again.pop(0))  # None if a cancel closed it meanwhile
        if item is None:
            item = db.next_item(seq, self._cursor.get(seq, -1))
            if item is not None:
                self._cursor[seq] = item.index
        if item is not None:
            self._running.setdefault(seq, set()).add(item.index)
        return item

    def _forget(self, seq: int) -> None:
        self._cursor.pop(seq, None)
        self._running.pop(seq, None)
        self._again.pop(seq, None)

    def _try_again(self, seq: int, index: int, status: int) -> int:
        """The attempt this was, if the item is to be tried again; else 0 (its error stays)."""
        attempts = self._attempts.get((seq, index), 0) + 1
        if status not in RETRIED or attempts >= MAX_ATTEMPTS:
            self._attempts.pop((seq, index), None)
            return 0
        self._attempts[(seq, index)] = attempts
        self._unclaim(seq, index)
        self._again.setdefault(seq, []).append(index)
        return attempts

    def _unclaim(self, seq: int, index: int) -> None:
        self._running.get(seq, set()).discard(index)

    def _finish(self, db: BatchDatabase, seq: int, index: int, result_type: str, result: bytes, now: float) -> None:
        self._unclaim(seq, index)
        db.finish(seq, index, result_type, result, now)

    async def _close(self, row: BatchRow, result_type: str, result: bytes) -> BatchRow:
        now = self.clock()
        return await self.store.call(
            lambda db: db.close_items(row.seq, result_type, result, self._running.get(row.seq, set()), now)
        )

    async def _expire(self, batch_id: str) -> None:
        seq = self._seq.get(batch_id)
        if seq is None:
            return
        now = self.clock()
        await self.store.call(lambda db: db.close_items(seq, "expired", EXPIRED, self._running.get(seq, set()), now))


async def _budget(charge: Charge, deployment: DeploymentState) -> float:
    """Take the item's request from its tenant's buckets: 0 when it was taken; else (the limits
    are spent, or fail closed with Redis away) the seconds to wait before the tenant's next
    item may ask again, as Charge.admit_waiting would wait, but without holding a slot."""
    try:
        await charge.admit()
    except ApiError as error:
        if error.status not in (429, 529):
            raise
        retry = next((float(value) for name, value in error.headers if name == "retry-after"), 1.0)
        return deployment.limiter.seconds_until_admitted(charge.tenant, time.monotonic()) or retry
    return 0.0

"""The batches and their results in SQLite (the standard library's sqlite3, WAL): nothing lost,
nothing twice.

A batch is acknowledged only once its row and all its items are committed, with
`synchronous=FULL` (a commit survives power loss, not only a crash of the process). An item's
result is written and its batch's counters moved in one transaction, and only if the item had
no result yet: a result is never counted twice nor replaced. Which items are running lives
only in memory (the runner's): after a crash every item without a result simply waits again.

Every method here blocks: the runner and the endpoints call them through `BatchStore.run`,
on one thread of their own, never on the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

RESULT_TYPES = ("succeeded", "errored", "canceled", "expired")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order: list pages
    id TEXT NOT NULL UNIQUE,
    deployment TEXT NOT NULL,
    owner TEXT,  -- the SHA-256 of the key that created it; NULL on an open deployment
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    ended_at REAL,
    cancel_initiated_at REAL,
    processing INTEGER NOT NULL,
    succeeded INTEGER NOT NULL DEFAULT 0,
    errored INTEGER NOT NULL DEFAULT 0,
    canceled INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batches_by_owner ON batches (deployment, owner, seq);
CREATE TABLE IF NOT EXISTS items (
    batch INTEGER NOT NULL REFERENCES batches (seq) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    params BLOB NOT NULL,  -- the request's params, as JSON
    result BLOB,  -- its result, as JSON; NULL until it has one
    PRIMARY KEY (batch, idx)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class BatchRow:
    seq: int
    id: str
    deployment: str
    owner: str | None
    created_at: float
    expires_at: float
    ended_at: float | None
    cancel_initiated_at: float | None
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int

    @property
    def processing_status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"


@dataclass(frozen=True, slots=True)
class Item:
    index: int
    custom_id: str
    params: bytes


_COLUMNS = (
    "seq, id, deployment, owner, created_at, expires_at, ended_at, cancel_initiated_at, "
    "processing, succeeded, errored, canceled, expired"
)


class BatchDatabase:
    """One SQLite database file, used from one thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE … COMMIT).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk: what we promised to keep
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            value = work(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return value

    def _row(self, where: str, args: Sequence[object]) -> BatchRow | None:
        found = self._db.execute(f"SELECT {_COLUMNS} FROM batches WHERE {where}", args).fetchone()
        return BatchRow(*found) if found else None

    # -- batches -----------------------------------------------------------------------------

    def create(
        self,
        batch_id: str,
        deployment: str,
        owner: str | None,
        created_at: float,
        expires_at: float,
        items: Sequence[tuple[str, bytes]],
    ) -> BatchRow:
        """Keep a new batch and all its items (custom_id, params JSON), committed on return."""

        def work(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO batches (id, deployment, owner, created_at, expires_at, processing) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (batch_id, deployment, owner, created_at, expires_at, len(items)),
            )
            seq = cursor.lastrowid
            assert seq is not None
            db.executemany(
                "INSERT INTO items (batch, idx, custom_id, params) VALUES (?, ?, ?, ?)",
                ((seq, i, custom_id, params) for i, (custom_id, params) in enumerate(items)),
            )
            return seq

        seq = self._transaction(work)
        row = self._row("seq = ?", (seq,))
        assert row is not None
        return row

    def get(self, deployment: str, owner: str | None, batch_id: str) -> BatchRow | None:
        """The batch, if it exists in this deployment and belongs to this owner."""
        return self._row("id = ? AND deployment = ? AND owner IS ?", (batch_id, deployment, owner))

    def page(
        self, deployment: str, owner: str | None, limit: int, before_id: str | None, after_id: str | None
    ) -> tuple[list[BatchRow], bool]:
        """Newest first: the `limit` batches after `after_id` (older) or before `before_id`
        (newer), and whether there are more that way. An unknown cursor gives nothing."""
        scope = "deployment = ? AND owner IS ?"
        args: list[object] = [deployment, owner]
        order = "DESC"
        for cursor_id, op in ((after_id, "<"), (before_id, ">")):
            if cursor_id is None:
                continue
            cursor = self.get(deployment, owner, cursor_id)
            if cursor is None:
                return [], False
            scope += f" AND seq {op} ?"
            args.append(cursor.seq)
        if before_id is not None and after_id is None:
            order = "ASC"  # the ones just newer than the cursor, then shown newest first
        found = self._db.execute(
            f"SELECT {_COLUMNS} FROM batches WHERE {scope} ORDER BY seq {order} LIMIT ?", (*args, limit + 1)
        ).fetchall()
        rows = [BatchRow(*row) for row in found[:limit]]
        if order == "ASC":
            rows.reverse()
        return rows, len(found) > limit

    def unfinished(self) -> list[BatchRow]:
        """Batches not ended (at start-up: their items without a result run again)."""
        found = self._db.execute(f"SELECT {_COLUMNS} FROM batches WHERE ended_at IS NULL ORDER BY seq").fetchall()
        return [BatchRow(*row) for row in found]

    def without_result(self, seq: int) -> int:
        """How many items of the batch have no result yet."""
        return int(
            self._db.execute("SELECT count(*) FROM items WHERE batch = ? AND result IS NULL", (seq,)).fetchone()[0]
        )

    def delete(self, seq: int) -> None:
        self._transaction(lambda db: db.execute("DELETE FROM batches WHERE seq = ?", (seq,)))

    def purge(self, ended_before: float) -> int:
        """Delete the batches (and results) that ended before this time; how many."""
        return self._transaction(
            lambda db: (
                db.execute("DELETE FROM batches WHERE ended_at IS NOT NULL AND ended_at < ?", (ended_before,)).rowcount
            )
        )

    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Batches by processing_status and their items by result type (processing included)."""
        statuses = {"in_progress": 0, "canceling": 0, "ended": 0}
        for status, count in self._db.execute(
            "SELECT CASE WHEN ended_at IS NOT NULL THEN 'ended' WHEN cancel_initiated_at IS NOT NULL "
            "THEN 'canceling' ELSE 'in_progress' END, count(*) FROM batches GROUP BY 1"
        ):
            statuses[status] = count
        sums = self._db.execute(
            "SELECT total(processing), total(succeeded), total(errored), total(canceled), total(expired) FROM batches"
        ).fetchone()
        items = dict(zip(("processing", *RESULT_TYPES), (int(n) for n in sums), strict=True))
        return statuses, items

    # -- items ---------------------------------------------------------------------------------

    def next_item(self, seq: int, after: int) -> Item | None:
        """The first item after index `after` that has no result (read only: claims nothing)."""
        found = self._db.execute(
            "SELECT idx, custom_id, params FROM items WHERE batch = ? AND idx > ? AND result IS NULL "
            "ORDER BY idx LIMIT 1",
            (seq, after),
        ).fetchone()
        return Item(*found) if found else None

    def item(self, seq: int, index: int) -> Item | None:
        """This item, if it still has no result."""
        found = self._db.execute(
            "SELECT idx, custom_id, params FROM items WHERE batch = ? AND idx = ? AND result IS NULL", (seq, index)
        ).fetchone()
        return Item(*found) if found else None

    def finish(self, seq: int, index: int, result_type: str, result: bytes, now: float) -> BatchRow | None:
        """Write an item's result and move its batch's counters, in one transaction; the batch
        ends with its last item. Nothing happens (None) if the item already had a result."""
        assert result_type in RESULT_TYPES

        def work(db: sqlite3.Connection) -> bool:
            written = db.execute(
                "UPDATE items SET result = ? WHERE batch = ? AND idx = ? AND result IS NULL", (result, seq, index)
            ).rowcount
            if written:
                self._count(db, seq, result_type, 1, now)
            return bool(written)

        return self._row("seq = ?", (seq,)) if self._transaction(work) else None

    def close_items(self, seq: int, result_type: str, result: bytes, running: Iterable[int], now: float) -> BatchRow:
        """Give every item without a result and not running this result (cancel, expiry); the
        batch ends now if nothing runs. `canceled` also marks when the cancel began."""
        skip = sorted(running)

        def work(db: sqlite3.Connection) -> None:
            if result_type == "canceled":
                db.execute(
                    "UPDATE batches SET cancel_initiated_at = ? WHERE seq = ? AND cancel_initiated_at IS NULL",
                    (now, seq),
                )
            marks = ",".join("?" * len(skip))
            closed = db.execute(
                f"UPDATE items SET result = ? WHERE batch = ? AND result IS NULL AND idx NOT IN ({marks})",
                (result, seq, *skip),
            ).rowcount
            self._count(db, seq, result_type, closed, now)

        self._transaction(work)
        row = self._row("seq = ?", (seq,))
        assert row is not None
        return row

    @staticmethod
    def _count(db: sqlite3.Connection, seq: int, result_type: str, n: int, now: float) -> None:
        db.execute(
            f"UPDATE batches SET processing = processing - ?, {result_type} = {result_type} + ? WHERE seq = ?",
            (n, n, seq),
        )
        db.execute("UPDATE batches SET ended_at = ? WHERE seq = ? AND processing = 0 AND ended_at IS NULL", (now, seq))

    def results(self, seq: int, after: int, limit: int) -> list[tuple[int, str, bytes]]:
        """(index, custom_id, result JSON) of the items after index `after` that have one."""
        return self._db.execute(
            "SELECT idx, custom_id, result FROM items WHERE batch = ? AND idx > ? AND result IS NOT NULL "
            "ORDER BY idx LIMIT ?",
            (seq, after, limit),
        ).fetchall()


class BatchStore:
    """The database on its own thread: `await store.call(lambda db: db.get(…))` from the event loop.

    One thread serialises the writes (SQLite has one writer anyway) and keeps every fsync off
    the event loop. The database opens on first use: a gateway that never sees a batch
    creates no file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="casedesk-batches")
        self._db: BatchDatabase | None = None

    @property
    def db(self) -> BatchDatabase:
        """Only from inside `call` (the store's thread)."""
        if self._db is None:
            self._db = BatchDatabase(self.path)
        return self._db

    def exists(self) -> bool:
        return self._db is not None or self.path.exists()

    async def call(self, work: Callable[Concatenate[BatchDatabase, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`work(db, *args, **kwargs)` on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: work(self.db, *args, **kwargs))

    def close(self) -> None:
        def close_db() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        self._thread.submit(close_db)
        self._thread.shutdown(wait=True)

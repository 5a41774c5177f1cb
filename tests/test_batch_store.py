"""The batches database (a real SQLite file in a temporary folder): what is committed, when a
batch ends, and that a result is never written twice."""

from __future__ import annotations

from pathlib import Path

from casedesk.batches.store import BatchDatabase

OK = b'{"type":"succeeded","message":{}}'
CANCELED = b'{"type":"canceled"}'


def items(n: int) -> list[tuple[str, bytes]]:
    return [(f"c{i}", b'{"model":"m"}') for i in range(n)]


def test_a_result_is_written_once_and_its_counter_moves_with_it(tmp_path: Path) -> None:
    db = BatchDatabase(tmp_path / "b.sqlite3")
    row = db.create("msgbatch_1", "dep", None, 10.0, 10.0 + 86400, items(2))
    assert (row.processing, row.processing_status) == (2, "in_progress")
    after = db.finish(row.seq, 0, "succeeded", OK, now=11.0)
    assert after is not None and (after.processing, after.succeeded) == (1, 1)
    assert db.finish(row.seq, 0, "errored", b"{}", now=12.0) is None  # already has one: unchanged
    assert db.results(row.seq, -1, 10) == [(0, "c0", OK)]
    ended = db.finish(row.seq, 1, "errored", b'{"type":"errored"}', now=13.0)
    assert ended is not None and ended.processing_status == "ended" and ended.ended_at == 13.0
    assert (ended.succeeded, ended.errored, ended.processing) == (1, 1, 0)
    db.close()
    again = BatchDatabase(tmp_path / "b.sqlite3")  # committed: a new connection sees it all
    assert again.get("dep", None, "msgbatch_1") == ended


def test_cancel_leaves_running_items_to_finish(tmp_path: Path) -> None:
    db = BatchDatabase(tmp_path / "b.sqlite3")
    row = db.create("msgbatch_1", "dep", None, 0.0, 1.0, items(5))
    canceling = db.close_items(row.seq, "canceled", CANCELED, running={1, 3}, now=5.0)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at == 5.0
    assert (canceling.canceled, canceling.processing) == (3, 2)
    assert db.next_item(row.seq, -1) is not None and db.next_item(row.seq, -1).index == 1  # type: ignore[union-attr]
    db.finish(row.seq, 1, "succeeded", OK, now=6.0)
    ended = db.finish(row.seq, 3, "succeeded", OK, now=7.0)
    assert ended is not None and ended.processing_status == "ended" and ended.ended_at == 7.0


def test_batches_belong_to_their_deployment_and_owner(tmp_path: Path) -> None:
    db = BatchDatabase(tmp_path / "b.sqlite3")
    db.create("msgbatch_a", "dep", "alice", 0.0, 1.0, items(1))
    assert db.get("dep", "alice", "msgbatch_a") is not None
    assert db.get("dep", "bob", "msgbatch_a") is None
    assert db.get("dep", None, "msgbatch_a") is None
    assert db.get("other", "alice", "msgbatch_a") is None
    assert db.page("dep", "bob", 10, None, None) == ([], False)


def test_pages_are_newest_first_with_both_cursors(tmp_path: Path) -> None:
    db = BatchDatabase(tmp_path / "b.sqlite3")
    for i in range(5):
        db.create(f"msgbatch_{i}", "dep", None, float(i), 1.0, items(1))
    ids = lambda rows: [r.id for r in rows]  # noqa: E731
    rows, more = db.page("dep", None, 2, None, None)
    assert ids(rows) == ["msgbatch_4", "msgbatch_3"] and more
    rows, more = db.page("dep", None, 2, None, "msgbatch_3")
    assert ids(rows) == ["msgbatch_2", "msgbatch_1"] and more
    rows, more = db.page("dep", None, 2, "msgbatch_1", None)
    assert ids(rows) == ["msgbatch_3", "msgbatch_2"] and more
    rows, more = db.page("dep", None, 5, "msgbatch_2", None)
    assert ids(rows) == ["msgbatch_4", "msgbatch_3"] and not more
    assert db.page("dep", None, 2, None, "msgbatch_nope") == ([], False)


def test_retention_deletes_ended_batches_and_their_results_only(tmp_path: Path) -> None:
    db = BatchDatabase(tmp_path / "b.sqlite3")
    old = db.create("msgbatch_old", "dep", None, 0.0, 1.0, items(1))
    db.finish(old.seq, 0, "succeeded", OK, now=100.0)
    db.create("msgbatch_running", "dep", None, 0.0, 1.0, items(1))
    assert db.purge(ended_before=50.0) == 0
    assert db.purge(ended_before=101.0) == 1
    assert db.get("dep", None, "msgbatch_old") is None and db.results(old.seq, -1, 10) == []
    assert db.get("dep", None, "msgbatch_running") is not None
    statuses, counts = db.totals()
    assert statuses == {"in_progress": 1, "canceling": 0, "ended": 0}
    assert counts == {"processing": 1, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}


def test_the_database_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    db = BatchDatabase(tmp_path / "b.sqlite3")
    assert db._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL

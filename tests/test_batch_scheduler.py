"""The batch scheduler's decisions, exactly, on a fake clock: no loop, no sockets, no sleeps."""

from __future__ import annotations

from casedesk.batches.scheduler import BatchScheduler, Capacity, Expire, Start

DAY = 86400.0


def idle(in_flight: int = 0, max_concurrency: int = 4, batch_limit: int = 3, waiting: int = 0) -> Capacity:
    return Capacity(waiting, in_flight, max_concurrency, batch_limit)


def starts(actions: list[Start | Expire]) -> list[str]:
    return [a.batch_id for a in actions if isinstance(a, Start)]


def test_items_start_up_to_the_batch_limit_and_no_further() -> None:
    scheduler = BatchScheduler()
    scheduler.added("b1", "dep", None, created_at=0.0, waiting=10)
    assert starts(scheduler.decide(1.0, {"dep": idle(batch_limit=3)})) == ["b1", "b1", "b1"]
    assert scheduler.running("dep") == 3 and scheduler.waiting("dep") == 7
    # The three hold admission slots now: nothing more starts until one finishes.
    assert scheduler.decide(1.1, {"dep": idle(in_flight=3, batch_limit=3)}) == []
    scheduler.finished("b1")
    assert starts(scheduler.decide(1.2, {"dep": idle(in_flight=2, batch_limit=3)})) == ["b1"]


def test_nothing_starts_while_an_interactive_request_waits() -> None:
    scheduler = BatchScheduler()
    scheduler.added("b1", "dep", None, 0.0, 5)
    assert scheduler.decide(1.0, {"dep": idle(in_flight=1, waiting=1)}) == []
    assert scheduler.waiting("dep") == 5


def test_only_free_admission_slots_are_used() -> None:
    """Interactive requests hold 3 of 4 slots: one batch item may start, not batch_limit."""
    scheduler = BatchScheduler()
    scheduler.added("b1", "dep", None, 0.0, 5)
    assert starts(scheduler.decide(1.0, {"dep": idle(in_flight=3, max_concurrency=4, batch_limit=3)})) == ["b1"]
    assert scheduler.decide(1.0, {"dep": idle(in_flight=4, max_concurrency=4, batch_limit=3)}) == []


def test_the_oldest_batch_goes_first() -> None:
    scheduler = BatchScheduler()
    scheduler.added("newer", "dep", None, created_at=5.0, waiting=2)
    scheduler.added("older", "dep", None, created_at=1.0, waiting=2)
    assert starts(scheduler.decide(6.0, {"dep": idle(batch_limit=3)})) == ["older", "older", "newer"]


def test_tenants_take_turns_in_the_order_of_their_oldest_batch() -> None:
    scheduler = BatchScheduler()
    scheduler.added("a1", "dep", "team-a", 1.0, 3)
    scheduler.added("b1", "dep", "team-b", 2.0, 3)
    scheduler.added("a2", "dep", "team-a", 3.0, 3)
    assert starts(scheduler.decide(4.0, {"dep": idle(max_concurrency=8, batch_limit=5)})) == [
        "a1",
        "b1",
        "a1",
        "b1",
        "a1",
    ]
    for batch_id in ("a1", "a1", "a1", "b1", "b1"):
        scheduler.finished(batch_id)
    # a1 has no items left waiting: team-a goes on with a2, still in turns with team-b.
    assert starts(scheduler.decide(5.0, {"dep": idle(max_concurrency=8, batch_limit=3)})) == ["b1", "a2", "a2"]


def test_deployments_are_decided_apart() -> None:
    scheduler = BatchScheduler()
    scheduler.added("x", "one", None, 0.0, 2)
    scheduler.added("y", "two", None, 0.0, 2)
    actions = scheduler.decide(1.0, {"one": idle(batch_limit=1), "two": idle(waiting=1)})
    assert actions == [Start("x", "one")]
    # A deployment that is no longer served (a reload removed it) keeps its items waiting.
    assert scheduler.decide(1.0, {"one": idle(in_flight=1, batch_limit=2)}) == [Start("x", "one")]
    assert scheduler.waiting("two") == 2


def test_items_not_started_within_a_day_expire() -> None:
    scheduler = BatchScheduler()
    scheduler.added("b1", "dep", None, created_at=100.0, waiting=3)
    assert scheduler.next_deadline() == 100.0 + DAY
    assert starts(scheduler.decide(200.0, {"dep": idle(batch_limit=1)})) == ["b1"]
    assert scheduler.decide(100.0 + DAY - 0.001, {"dep": idle(in_flight=1, batch_limit=1)}) == []
    assert scheduler.decide(100.0 + DAY, {"dep": idle(in_flight=1, batch_limit=1)}) == [Expire("b1")]
    assert scheduler.waiting("dep") == 0 and scheduler.running("dep") == 1
    scheduler.finished("b1")
    assert scheduler.running("dep") == 0 and scheduler.deployments() == set()


def test_a_start_given_back_waits_again_unless_the_batch_stopped() -> None:
    scheduler = BatchScheduler()
    scheduler.added("b1", "dep", None, 0.0, 2)
    assert starts(scheduler.decide(1.0, {"dep": idle(batch_limit=2)})) == ["b1", "b1"]
    scheduler.returned("b1")
    assert scheduler.waiting("dep") == 1 and scheduler.running("dep") == 1
    scheduler.stopped("b1")  # canceled
    scheduler.returned("b1")
    assert scheduler.waiting("dep") == 0 and scheduler.running("dep") == 0
    assert scheduler.decide(2.0, {"dep": idle(batch_limit=2)}) == []


def test_a_stopped_batch_starts_nothing_more() -> None:
    scheduler = BatchScheduler()
    scheduler.added("b1", "dep", None, 0.0, 5)
    scheduler.added("b2", "dep", None, 1.0, 1)
    scheduler.stopped("b1")
    assert starts(scheduler.decide(2.0, {"dep": idle(batch_limit=3)})) == ["b2"]


def test_a_batch_retried_later_pauses_until_then() -> None:
    scheduler = BatchScheduler()
    scheduler.added("b1", "dep", None, 0.0, 2)
    scheduler.added("b2", "dep", None, 1.0, 1)
    assert starts(scheduler.decide(2.0, {"dep": idle(batch_limit=1)})) == ["b1"]
    scheduler.retry_later("b1", not_before=4.0)  # its upstream failed: b1 pauses, b2 may go
    assert scheduler.waiting("dep") == 3 and scheduler.running("dep") == 0
    assert starts(scheduler.decide(3.0, {"dep": idle(batch_limit=2)})) == ["b2"]
    scheduler.finished("b2")
    assert scheduler.decide(3.9, {"dep": idle(batch_limit=2)}) == []
    assert starts(scheduler.decide(4.0, {"dep": idle(batch_limit=2)})) == ["b1", "b1"]


def test_a_tenant_whose_limits_are_spent_starts_nothing_until_they_pass_again() -> None:
    """An item that found its tenant's budget spent waits again (no 429 result); the tenant's
    other batches, on any deployment, wait with it, and the other tenants take every turn."""
    scheduler = BatchScheduler()
    scheduler.added("a1", "dep", "alice", 0.0, 3)
    scheduler.added("a2", "other", "alice", 0.5, 1)
    scheduler.added("b1", "dep", "bob", 1.0, 3)
    assert starts(scheduler.decide(2.0, {"dep": idle(batch_limit=1), "other": idle(in_flight=4)})) == ["a1"]
    scheduler.limited("a1", not_before=5.0)  # alice's output tokens are spent until t=5
    assert scheduler.waiting("dep") == 6 and scheduler.running("dep") == 0
    capacity = {"dep": idle(batch_limit=2), "other": idle(batch_limit=2)}
    assert starts(scheduler.decide(2.1, capacity)) == ["b1", "b1"]
    scheduler.finished("b1")
    scheduler.finished("b1")
    assert starts(scheduler.decide(4.9, capacity)) == ["b1"]
    scheduler.finished("b1")
    assert scheduler.decide(4.99, capacity) == []  # only alice's items are left: they wait
    assert starts(scheduler.decide(5.0, capacity)) == ["a1", "a1", "a2"]

"""The tenancy cores on a fake clock: the token bucket, the tenants' limiter and the fair queue
(issue 17). Exact figures: no sockets, no sleeps."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from casedesk.tenancy.bucket import TokenBucket
from casedesk.tenancy.fairqueue import FairQueue
from casedesk.tenancy.limiter import Limiter, Limits


def test_a_bucket_refills_continuously_up_to_its_capacity() -> None:
    bucket = TokenBucket.full(60, now=0.0)  # 60 a minute: 1 a second
    bucket.take(60, now=0.0)
    assert bucket.level(0.0) == 0
    assert bucket.level(10.0) == 10  # not a fixed window: 10 s give 10
    assert bucket.level(1000.0) == 60  # never beyond the capacity
    bucket.take(70, now=1000.0)
    assert bucket.level(1000.0) == -10  # what the last request used may overdraw it
    assert bucket.seconds_until_passes(1000.0) == 10
    assert bucket.retry_after(1000.0) == 11
    assert (
        bucket.retry_after(1000.0, whole=True) == 11 and bucket.seconds_until_passes(1000.0, whole=True) == 11
    )  # whole seconds after which it is strictly positive
    assert bucket.seconds_until_full(1000.0) == 70


def test_a_bucket_does_not_go_back_in_time() -> None:
    bucket = TokenBucket.full(60, now=5.0)
    bucket.take(30, now=5.0)
    assert bucket.level(4.0) == 30  # an older `now` changes nothing
    assert bucket.level(6.0) == 31


def test_the_limiter_refuses_naming_the_limit_and_the_wait() -> None:
    limiter = Limiter()
    limiter.configure({"alice": Limits(requests_per_minute=3)}, now=0.0)
    assert [limiter.admit("alice", 0.0) for _ in range(3)] == [None, None, None]
    refused = limiter.admit("alice", 0.0)
    assert refused is not None and refused.key == "requests_per_minute" and refused.retry_after == 20
    assert refused.message() == "requests_per_minute (3) exhausted for tenant 'alice'; retry after 20 s"
    assert limiter.seconds_until_admitted("alice", 0.0) == 20
    assert limiter.admit("alice", 19.9) is not None
    assert limiter.admit("alice", 20.0) is None  # 20 s give back one request (3 a minute)
    assert limiter.admit("bob", 0.0) is None and not limiter.limited("bob")  # no limits: always


def test_input_and_output_buckets_and_their_headers() -> None:
    limiter = Limiter()
    limiter.configure({"alice": Limits(50, 40000, 8000)}, now=100.0)
    assert limiter.admit("alice", 100.0) is None
    limiter.charge("alice", input_tokens=40000, output_tokens=10, now=100.0)
    refused = limiter.admit("alice", 100.0)
    assert refused is not None and refused.message() == (
        "input_tokens_per_minute (40000) exhausted for tenant 'alice'; retry after 1 s"
    )
    headers = dict(limiter.headers("alice", 130.0, wall=1_700_000_000.0))
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    assert headers["anthropic-ratelimit-requests-remaining"] == "50"  # 30 s refilled the one taken
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == "20000"
    assert headers["anthropic-ratelimit-input-tokens-reset"] == "2023-11-14T22:13:50Z"  # 30 s on
    assert headers["anthropic-ratelimit-output-tokens-remaining"] == "8000"
    # tokens-*: the more restrictive of input and output now
    assert headers["anthropic-ratelimit-tokens-limit"] == "8000"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "8000"
    limiter.charge("alice", input_tokens=100000, now=130.0)
    assert dict(limiter.headers("alice", 130.0, 0.0))["anthropic-ratelimit-input-tokens-remaining"] == "0"


def test_a_reload_keeps_what_was_used() -> None:
    limiter = Limiter()
    limiter.configure({"alice": Limits(output_tokens_per_minute=600)}, now=0.0)
    limiter.charge("alice", output_tokens=500, now=0.0)
    limiter.configure({"alice": Limits(output_tokens_per_minute=300)}, now=0.0)
    assert list(limiter.levels(0.0)) == [("alice", "output_tokens", 100.0)]
    limiter.configure({"alice": Limits(output_tokens_per_minute=300), "bob": Limits(10)}, now=0.0)
    assert sorted(limiter.levels(0.0)) == [("alice", "output_tokens", 100.0), ("bob", "requests", 10.0)]


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 2000),
    events=st.lists(
        st.tuples(st.floats(0, 5), st.integers(0, 400), st.booleans()),  # (gap, tokens, ends now)
        min_size=1,
        max_size=200,
    ),
)
def test_admitted_exceeds_the_limit_by_at_most_what_was_in_flight_when_it_ran_out(
    limit: int, events: list[tuple[float, int, bool]]
) -> None:
    """Over the run (from a full bucket), the output tokens admitted are at most the limit
    plus the refill plus what the requests in flight at the last admission went on to use:
    a request is admitted only while the bucket is positive, and every charge after that
    moment is one of theirs."""
    limiter = Limiter()
    limiter.configure({"t": Limits(output_tokens_per_minute=limit)}, now=0.0)
    now = 0.0
    in_flight: list[int] = []  # each admitted, unfinished request's eventual output
    charged = 0
    in_flight_when_last_admitted = 0
    for gap, tokens, ends in events:
        now += gap
        if ends and in_flight:
            used = in_flight.pop(0)
            limiter.charge("t", output_tokens=used, now=now)
            charged += used
        elif limiter.admit("t", now) is None:
            in_flight.append(tokens)
            in_flight_when_last_admitted = sum(in_flight)
    for used in in_flight:
        limiter.charge("t", output_tokens=used, now=now)
        charged += used
    refill = now * limit / 60
    assert charged < limit + refill + in_flight_when_last_admitted + 1e-6
    level = {(t, n): v for t, n, v in limiter.levels(now)}[("t", "output_tokens")]
    assert level > -in_flight_when_last_admitted - 1e-6  # overdrawn by at most that


def test_weights_two_to_one_share_slots_two_to_one() -> None:
    queue: FairQueue[int] = FairQueue()
    for n in range(60):
        queue.push(n, "alice")
        queue.push(100 + n, "bob")
    served = [queue.pop({"alice": 2.0, "bob": 1.0}) for _ in range(60)]
    tenants = [chosen[0] for chosen in served if chosen is not None]
    assert tenants.count("alice") == 40 and tenants.count("bob") == 20
    # interleaved, not batched: every three slots in a row, two are alice's
    assert all(tenants[i : i + 3].count("alice") == 2 for i in range(0, 58))


def test_one_request_behind_a_flood_goes_next() -> None:
    queue: FairQueue[str] = FairQueue()
    weights: dict[str, float] = {}
    queue.served("alice", 1.0)  # alice holds both slots…
    queue.served("alice", 1.0)
    for n in range(12):  # …and keeps 12 waiting
        queue.push(f"a{n}", "alice")
    assert queue.pop(weights) == ("alice", "a0")  # a slot frees: the head of the only flow
    queue.push("b0", "bob")
    assert queue.pop(weights) == ("bob", "b0")  # the next slot is bob's
    assert queue.queued("alice") == 11 and len(queue) == 11


def test_fifo_within_a_tenant_and_priorities_before_shares() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("low", "ci", "low")
    queue.push("n1", "alice")
    queue.push("n2", "alice")
    queue.push("high", "oncall", "high")
    order = [queue.pop({}) for _ in range(4)]
    assert [c[1] for c in order if c] == ["high", "n1", "n2", "low"]
    assert queue.pop({}) is None


def test_an_idle_tenant_earns_no_credit() -> None:
    queue: FairQueue[str] = FairQueue()
    for n in range(10):  # alice alone gets 10 slots in a row
        queue.push(f"a{n}", "alice")
        assert queue.pop({}) == ("alice", f"a{n}")
    for n in range(4):
        queue.push(f"a{n}", "alice")
        queue.push(f"b{n}", "bob")
    tenants = [c[0] for c in (queue.pop({}) for _ in range(8)) if c]
    # bob does not get 10 slots in a row for alice's past: they alternate
    assert tenants.count("bob") == 4 and tenants[:2] in (["alice", "bob"], ["bob", "alice"])
    assert "bob" in tenants[:2] and "alice" in tenants[2:4]


def test_a_removed_waiter_leaves_no_trace() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "alice")
    queue.push("b", "alice")
    assert queue.remove("a", "alice") and not queue.remove("a", "alice")
    assert queue.pop({}) == ("alice", "b") and len(queue) == 0

"""Admission control and upstream choice, without sockets where none are needed."""

from __future__ import annotations

import asyncio

import pytest

from casedesk.admission import Admission
from casedesk.anthropic.errors import ApiError
from casedesk.upstream.balancer import Balancer
from casedesk.upstream.pool import UpstreamPool
from tests.fake_llama import FakeLlamaServer
from tests.support.wait import until


async def test_admission_bounds_in_flight_and_serves_the_queue_in_order() -> None:
    admission = Admission(max_concurrency=2, max_queue=2, queue_timeout=5)
    await admission.acquire()
    await admission.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await admission.acquire()
        order.append(n)

    tasks = [asyncio.ensure_future(waiter(n)) for n in (1, 2)]
    await until(lambda: admission.queued == 2)
    assert admission.queued == 2 and admission.in_flight == 2
    with pytest.raises(ApiError) as caught:
        await admission.acquire()  # the queue is full: refused at once
    assert caught.value.status == 529 and caught.value.error_type == "overloaded_error"
    admission.release()
    admission.release()
    await asyncio.gather(*tasks)
    assert order == [1, 2] and admission.in_flight == 2


async def test_admission_queue_timeout_is_a_529() -> None:
    admission = Admission(max_concurrency=1, max_queue=4, queue_timeout=0.05)
    await admission.acquire()
    with pytest.raises(ApiError) as caught:
        await admission.acquire()
    assert caught.value.status == 529 and "queue" in caught.value.message
    assert admission.queued == 0


async def test_a_cancelled_waiter_gives_its_place_up() -> None:
    admission = Admission(max_concurrency=1, max_queue=4, queue_timeout=5)
    await admission.acquire()
    gone = asyncio.ensure_future(admission.acquire())
    await until(lambda: admission.queued == 1)
    gone.cancel()
    await until(gone.done)
    assert admission.queued == 0
    admission.release()
    assert admission.in_flight == 0  # no slot leaked to the cancelled waiter
    await admission.acquire()
    assert admission.in_flight == 1


async def test_least_loaded_first_and_a_failed_upstream_comes_back_with_its_health() -> None:
    async with FakeLlamaServer() as a, FakeLlamaServer() as b:
        pools = [UpstreamPool("127.0.0.1", a.port), UpstreamPool("127.0.0.1", b.port)]
        balancer = Balancer(pools)
        busy = await pools[0].acquire()  # one request in flight on a
        assert balancer.candidates()[0].pool is pools[1]
        pools[0].release(busy)
        state_b = balancer.states[1]
        balancer.failed(state_b)
        assert not state_b.healthy and balancer.candidates()[-1] is state_b  # taken out
        balancer.failed(state_b)
        assert state_b.failures == 2  # the backoff doubles with each failure
        await balancer.check_health()  # /health answers 200: brought back
        assert state_b.healthy and state_b.failures == 0
        b.health_status = 503
        await balancer.check_health()
        assert not state_b.healthy
        balancer.close()

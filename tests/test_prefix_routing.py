"""Prefix-aware routing over real sockets: the official SDK → CaseDesk → several fake
llama-servers. Which upstream served a turn is read from what each fake received."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from tests.conftest import GatewayFactory, RunningGateway, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wait import until

QUIET = {"access_log": ""}


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeLlamaServer]]:
    servers = [await FakeLlamaServer(Reply(tokens=["ok"])).start() for _ in range(3)]
    yield servers
    for server in servers:
        await server.close()


def system_of(n: int) -> str:
    return f"You are assistant number {n}. " + "Answer briefly and kindly. " * 80  # ~2 KB


def history(n: int, turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"conversation {n}, question {turn}"})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": "ok"})
    return messages


async def turn(client: anthropic.AsyncAnthropic, n: int, turns: int) -> None:
    await client.messages.create(model="m", max_tokens=8, system=system_of(n), messages=history(n, turns))


async def every_conversation(clients: list[anthropic.AsyncAnthropic], turns: int, count: int = 24) -> None:
    """Turn `turns` of conversations 0..count-1, two at a time (within the load bound), the
    conversations alternating between the given clients."""
    gate = asyncio.Semaphore(2)

    async def one(n: int) -> None:
        async with gate:
            await turn(clients[(n + turns) % len(clients)], n, turns)

    await asyncio.gather(*(one(n) for n in range(count)))


def served(fakes: list[FakeLlamaServer]) -> dict[tuple[int, int], list[int]]:
    """(conversation, turn) → the fakes (indices) that were sent it."""
    where: dict[tuple[int, int], list[int]] = {}
    for index, fake in enumerate(fakes):
        for request in fake.chat_requests():
            messages = (request.body or {})["messages"]
            n = int(messages[0]["content"].split()[4].rstrip("."))
            where.setdefault((n, (len(messages) - 1) // 2), []).append(index)
    return where


def client(gateway: RunningGateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gateway.base_url(), api_key="k", max_retries=0)


async def test_every_turn_of_a_conversation_goes_where_its_first_went(
    fakes: list[FakeLlamaServer], start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(gateway_config([f.url for f in fakes], server=QUIET))
    sdk = client(gw)
    for turns in (1, 2, 3):
        await every_conversation([sdk], turns)
    where = served(fakes)
    homes = {n: where[(n, 0)][0] for n in range(24)}
    assert all(where[(n, t)] == [homes[n]] for n in range(24) for t in range(3)), where
    assert len(set(homes.values())) == 3  # and conversations spread over the upstreams


async def test_the_load_bound_spills_and_the_conversation_stays_with_its_cache(
    fakes: list[FakeLlamaServer], start_gateway: GatewayFactory
) -> None:
    model = {"balance_abs_threshold": 2, "balance_rel_threshold": 1.5}
    gw = await start_gateway(gateway_config([f.url for f in fakes], server=QUIET, model=model))
    sdk = client(gw)
    await turn(sdk, 0, 1)
    home = served(fakes)[(0, 0)][0]
    # Two slow requests of other conversations keep the home busy (2 in flight vs 0).
    fakes[home].default = Reply(tokens=["ok"], head_delay=30)
    busy = [n for n in range(1, 60) if await _home_of(gw, fakes, n) == home][:2]
    blockers = [asyncio.ensure_future(turn(sdk, n, 2)) for n in busy]
    await until(lambda: fakes[home].active_generations == 2)
    await turn(sdk, 0, 2)  # would wait behind them: goes elsewhere instead
    spilled = served(fakes)[(0, 1)]
    assert spilled != [home] and len(spilled) == 1
    for task in blockers:
        task.cancel()
    await asyncio.gather(*blockers, return_exceptions=True)
    fakes[home].default = Reply(tokens=["ok"])
    await until_metric(
        gw, f'casedesk_upstream_in_flight{{deployment="dep",model="m",upstream="127.0.0.1:{fakes[home].port}"}} 0'
    )
    await turn(sdk, 0, 3)  # the home is free again, but the latest turn is cached where it spilled
    assert served(fakes)[(0, 2)] == spilled


async def test_an_instance_alone_spreads_new_conversations_and_one_of_two_does_not(
    fakes: list[FakeLlamaServer], start_gateway: GatewayFactory
) -> None:
    """Alone (every later turn it got, it had seen begin), an instance moves a new conversation
    off a home busier by half the bound; one that gets later turns it never saw has a peer, and
    sends a first turn home, where the peer would look for it."""
    pair = fakes[:2]
    config = gateway_config([f.url for f in pair], server=QUIET)  # bound 4: first turns alone move at 2
    alone, probe = await start_gateway(config), await start_gateway(config)
    home_of = {n: await _home_of(probe, pair, n) for n in range(24)}
    home = home_of[0]
    at_home = [n for n in range(1, 24) if home_of[n] == home]
    for fake in pair:
        fake.requests.clear()
    await turn(client(alone), 0, 1)
    await turn(client(alone), 0, 2)  # a later turn it saw begin: alone
    pair[home].default = Reply(tokens=["ok"], head_delay=30)
    blockers = [asyncio.ensure_future(turn(client(alone), n, 1)) for n in at_home[:2]]
    await until(lambda: pair[home].active_generations == 2)
    pair[home].default = Reply(tokens=["ok"])
    await turn(client(alone), at_home[2], 1)
    assert served(pair)[(at_home[2], 0)] == [1 - home]  # moved: nothing of it is cached anywhere

    peer = await start_gateway(config)
    await turn(client(peer), 0, 3)  # a later turn it never saw: another instance is about
    pair[home].default = Reply(tokens=["ok"], head_delay=30)
    more = [asyncio.ensure_future(turn(client(peer), n, 1)) for n in at_home[3:5]]
    await until(lambda: pair[home].active_generations == 4)
    pair[home].default = Reply(tokens=["ok"])
    await turn(client(peer), at_home[5], 1)
    assert served(pair)[(at_home[5], 0)] == [home]  # home, as the other instance will guess
    for task in [*blockers, *more]:
        task.cancel()
    await asyncio.gather(*blockers, *more, return_exceptions=True)


async def test_parallel_branches_of_one_conversation_spread_over_the_upstreams(
    fakes: list[FakeLlamaServer], start_gateway: GatewayFactory
) -> None:
    """An agent's parallel calls on one history: the second does not queue behind the first at
    the home while another upstream is idle; the conversation is then held by both."""
    pair = fakes[:2]
    gw = await start_gateway(gateway_config([f.url for f in pair], server=QUIET))
    sdk = client(gw)
    await turn(sdk, 0, 1)
    home = served(pair)[(0, 0)][0]
    pair[home].default = Reply(tokens=["ok"], head_delay=30)
    first_branch = asyncio.ensure_future(turn(sdk, 0, 2))
    await until(lambda: pair[home].active_generations == 1)
    await turn(sdk, 0, 2)  # the same request again while the first is in flight
    assert sorted(served(pair)[(0, 1)]) == [0, 1]  # one at each upstream
    first_branch.cancel()
    await asyncio.gather(first_branch, return_exceptions=True)
    pair[home].default = Reply(tokens=["ok"])
    await until_metric(
        gw, f'casedesk_upstream_in_flight{{deployment="dep",model="m",upstream="127.0.0.1:{pair[home].port}"}} 0'
    )
    await turn(sdk, 0, 3)  # one at a time again: it stays where its latest turn is cached
    await turn(sdk, 0, 4)
    where = served(pair)
    assert len(where[(0, 2)]) == 1 and where[(0, 3)] == where[(0, 2)]


async def metrics(gw: RunningGateway) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    text = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    return text


async def until_metric(gw: RunningGateway, line: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in await metrics(gw):
        assert time.monotonic() < deadline, f"{line!r} never showed in /metrics"
        await asyncio.sleep(0.01)


async def _home_of(gw: RunningGateway, fakes: list[FakeLlamaServer], n: int) -> int:
    """Where conversation n's first turn goes (asked of the gateway by sending it)."""
    for fake in fakes:
        fake.replies.append(Reply(tokens=["ok"]))  # answered at once, whoever is slow now
    await turn(client(gw), n, 1)
    for fake in fakes:
        fake.replies.clear()
    return served(fakes)[(n, 0)][0]


async def test_a_dead_upstreams_conversations_move_and_come_back(
    fakes: list[FakeLlamaServer], start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(gateway_config([f.url for f in fakes], server={**QUIET, "health_interval": 0.1}))
    sdk = client(gw)
    await every_conversation([sdk], 1)
    homes = {n: served(fakes)[(n, 0)][0] for n in range(24)}
    dead = homes[0]
    port = fakes[dead].port
    await fakes[dead].close()
    await every_conversation([sdk], 2)
    where = served(fakes)
    moved = {n: where[(n, 1)][-1] for n in range(24)}
    for n in range(24):
        if homes[n] == dead:
            assert moved[n] != dead  # served by another upstream, without an error to the client
        else:
            assert where[(n, 1)] == [homes[n]]  # the others' conversations did not move
    fakes[dead] = revived = await FakeLlamaServer(Reply(tokens=["ok"]), port=port).start()
    await until(lambda: sum(r.path == "/health" for r in revived.requests) >= 2)
    await every_conversation([sdk], 3)
    where = served(fakes)
    assert all(where[(n, 2)] == [homes[n]] for n in range(24)), where  # all back home


async def test_two_gateway_instances_agree_without_talking(
    fakes: list[FakeLlamaServer], start_gateway: GatewayFactory
) -> None:
    config = gateway_config([f.url for f in fakes], server=QUIET)
    instances = [client(await start_gateway(config)), client(await start_gateway(config))]
    for turns in (1, 2, 3, 4):  # turns alternate between the two instances
        await every_conversation(instances, turns)
    where = served(fakes)
    for n in range(24):
        assert len({where[(n, t)][0] for t in range(4)}) == 1, where


async def test_cached_tokens_per_upstream_in_metrics_and_the_access_log(
    fakes: list[FakeLlamaServer], start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    gw = await start_gateway(gateway_config([fakes[0].url], server={"access_log": str(log)}))
    fakes[0].replies.append(Reply(tokens=["ok"], prompt_tokens=100, cached_tokens=0))
    fakes[0].replies.append(Reply(tokens=["ok"], prompt_tokens=120, cached_tokens=96))
    first = await client(gw).messages.create(model="m", max_tokens=8, messages=history(0, 1))
    async with client(gw).messages.stream(model="m", max_tokens=8, messages=history(0, 2)) as stream:
        second = await stream.get_final_message()
    assert (first.usage.input_tokens, first.usage.cache_read_input_tokens) == (100, 0)
    assert (second.usage.input_tokens, second.usage.cache_read_input_tokens) == (24, 96)
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert [(r["input_tokens"], r["cached_tokens"]) for r in lines] == [(100, 0), (120, 96)]
    text = await metrics(gw)
    labels = f'deployment="dep",model="m",upstream="127.0.0.1:{fakes[0].port}"'
    assert f"casedesk_prompt_tokens_total{{{labels}}} 220" in text
    assert f"casedesk_cached_prompt_tokens_total{{{labels}}} 96" in text


async def test_two_instances_agree_when_the_second_sees_load_on_the_home(
    fakes: list[FakeLlamaServer], start_gateway: GatewayFactory
) -> None:
    """Instance B has not seen conversation 0 (A served its first turn, at home) and has a
    request of its own in flight there, within the bound: B must send the conversation's second
    turn home, where its first is cached, not where B alone sees less load."""
    pair = fakes[:2]
    model = {"balance_abs_threshold": 2}  # B's one request in flight at the home is within it
    config = gateway_config([f.url for f in pair], server=QUIET, model=model)
    a, b, probe = await start_gateway(config), await start_gateway(config), await start_gateway(config)
    home_of = {n: await _home_of(probe, pair, n) for n in range(16)}  # a third instance's choice: the same
    for fake in pair:
        fake.requests.clear()
    await turn(client(a), 0, 1)
    home = home_of[0]
    assert served(pair)[(0, 0)] == [home]
    pair[home].default = Reply(tokens=["ok"], head_delay=30)
    pair[home].replies.append(Reply(tokens=["ok"], head_delay=30))  # B's own request, kept in flight
    blocker = asyncio.ensure_future(turn(client(b), next(n for n in range(1, 16) if home_of[n] == home), 2))
    await until(lambda: pair[home].active_generations == 1)
    pair[home].replies.append(Reply(tokens=["ok"]))
    await turn(client(b), 0, 2)
    assert served(pair)[(0, 1)] == [home]  # where its first turn is cached
    blocker.cancel()
    await asyncio.gather(blocker, return_exceptions=True)
    pair[home].default = Reply(tokens=["ok"])
    await turn(client(a), 0, 3)
    assert served(pair)[(0, 2)] == [home]

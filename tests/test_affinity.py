"""The prefix/rendezvous choice as pure functions: keys, the bounded table, the order."""

from __future__ import annotations

import random
from typing import Any

from casedesk.upstream.affinity import (
    BLOCK_BYTES,
    PrefixTable,
    Solitude,
    Thresholds,
    Candidate,
    order,
    rendezvous,
    route_key,
)

SYSTEM = "You answer questions about lighthouses. " * 60  # ~2.4 KB: several blocks


def chat(system: str, turns: int, tools: list[Any] | None = None) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question {turn}"})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": f"answer {turn}"})
    body: dict[str, Any] = {"messages": messages, "max_tokens": 16}
    if tools:
        body["tools"] = tools
    return body


def up(*loads: int, down: tuple[int, ...] = ()) -> list[Candidate]:
    return [Candidate(f"10.0.0.{i}:8080", i not in down, load) for i, load in enumerate(loads)]


def test_a_later_turn_extends_the_earlier_turns_blocks_and_keeps_its_lead() -> None:
    first, later = route_key(chat(SYSTEM, 1)), route_key(chat(SYSTEM, 3))
    assert first.lead == later.lead and first.lead_bytes == later.lead_bytes
    assert len(first.blocks) >= 4 and later.blocks[: len(first.blocks)] == first.blocks
    other = route_key(chat(SYSTEM[:1200] + "!" + SYSTEM[1201:], 1))  # one byte changed, in block 3
    assert other.lead != first.lead
    # Only the blocks up to the change are shared: the hashes are chained.
    assert other.blocks[:2] == first.blocks[:2] and other.blocks[2] != first.blocks[2]
    assert all(a != b for a, b in zip(other.blocks[2:], first.blocks[2:], strict=True))


def test_the_same_system_prompt_with_another_first_question_is_another_conversation() -> None:
    a = route_key(chat(SYSTEM, 1))
    b = chat(SYSTEM, 1)
    b["messages"][1]["content"] = "something else"
    assert route_key(b).lead != a.lead
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert route_key(chat(SYSTEM, 1, tools)).lead != a.lead


def test_key_order_in_a_message_does_not_matter() -> None:
    a = chat(SYSTEM, 2)
    b = chat(SYSTEM, 2)
    b["messages"] = [dict(reversed(list(m.items()))) for m in b["messages"]]
    assert route_key(a) == route_key(b)


def test_rendezvous_is_stable_and_moves_only_the_removed_names_keys() -> None:
    names = [f"10.0.0.{i}:8080" for i in range(4)]
    leads = [route_key(chat(f"system {n} " * 50, 1)).lead for n in range(400)]
    before = [rendezvous(lead, names)[0] for lead in leads]
    assert before == [rendezvous(lead, list(names))[0] for lead in leads]  # deterministic
    assert all(70 <= before.count(i) <= 130 for i in range(4)), [before.count(i) for i in range(4)]
    without = names[:2] + names[3:]  # upstream 2 removed
    after = [names.index(without[rendezvous(lead, without)[0]]) for lead in leads]
    for was, now in zip(before, after, strict=True):
        assert now == was or was == 2  # only upstream 2's keys moved


def test_home_is_the_rendezvous_choice_then_sticks_to_where_it_was_served() -> None:
    key = route_key(chat(SYSTEM, 1))
    upstreams = up(0, 0, 0)
    table = PrefixTable(3)
    home = order(key, upstreams, table, Thresholds())[0]
    assert home == rendezvous(key.lead, [u.name for u in upstreams])[0]
    spilled = (home + 1) % 3
    table.record(spilled, key)  # served elsewhere (a spill): its next turn follows its cache
    later = route_key(chat(SYSTEM, 2))
    assert order(later, upstreams, table, Thresholds())[0] == spilled
    table.record(home, later)  # then served at home again: the latest holder wins
    assert order(route_key(chat(SYSTEM, 3)), upstreams, table, Thresholds())[0] == home


def test_the_load_bound_spills_to_the_holder_else_the_least_loaded() -> None:
    key = route_key(chat(SYSTEM, 2))
    table = PrefixTable(3)
    home = order(key, up(0, 0, 0), table, Thresholds())[0]
    table.record(home, key)
    loads = [0, 0, 0]
    loads[home] = 3
    busy = up(*loads)
    assert order(key, busy, table, Thresholds(absolute=4))[0] == home  # within the bound: stays
    spill = order(key, busy, table, Thresholds(absolute=3, relative=1.5))
    assert spill[0] != home and busy[spill[0]].in_flight == 0
    other = next(i for i in range(3) if i not in (home, spill[0]))
    loads[other] = 1
    table.record(other, route_key(chat(SYSTEM, 1)))  # holds the lead, busier than the third
    assert order(key, up(*loads), table, Thresholds(absolute=2))[0] == other


def test_a_dead_home_sends_to_the_next_rendezvous_choice_and_takes_it_back() -> None:
    key = route_key(chat(SYSTEM, 1))
    table = PrefixTable(3)
    ranked = rendezvous(key.lead, [u.name for u in up(0, 0, 0)])
    table.record(ranked[0], key)
    dead = order(key, up(0, 0, 0, down=(ranked[0],)), table, Thresholds())
    assert dead == [ranked[1], ranked[2], ranked[0]]  # the dead one is tried last
    # (What the stand-in serves is not recorded: Balancer.served.) Healthy again: back home.
    assert order(route_key(chat(SYSTEM, 3)), up(0, 0, 0), table, Thresholds())[0] == ranked[0]


def test_memory_stays_bounded_whatever_the_traffic() -> None:
    table = PrefixTable(2, max_blocks=1000)
    rng = random.Random(7)
    for n in range(3000):
        text = "".join(rng.choice("abcdefgh ") for _ in range(BLOCK_BYTES * 3))
        table.record(n % 2, route_key(chat(text, 1 + n % 3)))
        assert table.size() <= 2 * 1000
    assert table.size() == 2 * 1000
    recent = route_key(chat("recent " * 400, 2))
    table.record(0, recent)
    assert table.matched(0, recent) == len(recent.blocks)  # the newest is kept whole


def test_eviction_eats_prompts_from_their_tails() -> None:
    key = route_key(chat(SYSTEM, 4))
    table = PrefixTable(1, max_blocks=len(key.blocks) - 2)
    table.record(0, key)
    assert table.matched(0, key) == len(key.blocks) - 2  # the head survives


def test_the_balance_keys_are_checked_by_name() -> None:
    import pytest

    from casedesk.config import ConfigError, parse

    def model(**keys: Any) -> dict[str, Any]:
        return {"deployments": {"d": {"models": {"m": {"upstreams": ["http://127.0.0.1:1"], **keys}}}}}

    assert parse(model()).deployments["d"].models["m"].balance == "prefix"
    chosen = parse(model(balance="least_in_flight", balance_abs_threshold=2, balance_rel_threshold=2))
    m = chosen.deployments["d"].models["m"]
    assert (m.balance, m.balance_abs_threshold, m.balance_rel_threshold) == ("least_in_flight", 2, 2.0)
    with pytest.raises(ConfigError) as caught:
        parse(model(balance="random", balance_abs_threshold=0, balance_rel_threshold=0.5))
    problems = "\n".join(caught.value.problems)
    assert "deployments.d.models.m.balance: must be 'prefix' or 'least_in_flight', got 'random'" in problems
    assert "balance_abs_threshold" in problems and "balance_rel_threshold" in problems


def test_a_turn_nobody_here_holds_goes_home_until_the_load_bound() -> None:
    """First turn or later turn another instance served: every instance must guess the same
    upstream, and the only guess they share is the home; one instance's own load (which the
    others do not see) moves it only past the bound."""
    for turns in (1, 2):
        key, table = route_key(chat(SYSTEM, turns)), PrefixTable(2)
        home = order(key, up(0, 0), table, Thresholds(absolute=4))[0]
        loads = [0, 0]
        loads[home] = 3  # busy, but within the bound
        assert order(key, up(*loads), table, Thresholds(absolute=4))[0] == home
        loads[home] = 4
        assert order(key, up(*loads), table, Thresholds(absolute=4))[0] != home  # the bound holds


def test_an_instance_alone_moves_a_first_turn_at_half_the_threshold() -> None:
    fresh, table = route_key(chat(SYSTEM, 1)), PrefixTable(2)
    home = order(fresh, up(0, 0), table, Thresholds(absolute=4))[0]
    loads = [0, 0]
    loads[home] = 2
    assert order(fresh, up(*loads), table, Thresholds(absolute=4), alone=True)[0] != home  # no cache to lose
    assert order(fresh, up(*loads), table, Thresholds(absolute=4), alone=False)[0] == home  # others guess home
    later = route_key(chat(SYSTEM, 2))
    assert order(later, up(*loads), table, Thresholds(absolute=4), alone=True)[0] == home  # not a first turn
    table.record(home, fresh)
    assert order(later, up(*loads), table, Thresholds(absolute=4), alone=True)[0] == home  # its cache is worth a wait


def test_alone_means_it_saw_the_previous_turn_of_every_recent_later_turn() -> None:
    solitude = Solitude(window=4)
    assert not solitude.alone  # before it knows: as if others were about
    for turns in (1, 2, 3):  # one conversation, every turn here
        solitude.saw(route_key(chat(SYSTEM, turns)))
    assert solitude.alone
    solitude.saw(route_key(chat(SYSTEM, 3)))  # the same again (a retry, a parallel branch)
    assert solitude.alone
    solitude.saw(route_key(chat(SYSTEM, 5)))  # its turn 4 went to another instance
    assert not solitude.alone
    for turns in (6, 7, 8):
        solitude.saw(route_key(chat(SYSTEM, turns)))
    assert not solitude.alone
    solitude.saw(route_key(chat(SYSTEM, 9)))  # the gap has left the window
    assert solitude.alone
    solitude.saw(route_key(chat("Another system prompt. " * 40, 2)))  # never saw its first turn
    assert not solitude.alone


def test_solitude_remembers_a_bounded_number_of_conversations() -> None:
    solitude = Solitude(conversations=8)
    for n in range(100):
        solitude.saw(route_key(chat(f"System {n}. " + SYSTEM, 1)))
    assert len(solitude._latest) == 8


def branches(loads: list[int], siblings: list[int]) -> list[Candidate]:
    pairs = zip(loads, siblings, strict=True)
    return [Candidate(f"10.0.0.{i}:8080", True, load, sib) for i, (load, sib) in enumerate(pairs)]


def test_parallel_requests_of_one_conversation_spread_to_a_lighter_upstream() -> None:
    """An agent's branches on one history: the second goes where fewer requests are in flight
    rather than queue behind the first; further ones go to holders of the history first."""
    key, table = route_key(chat(SYSTEM, 2)), PrefixTable(3)
    home = order(key, up(0, 0, 0), table, Thresholds())[0]
    table.record(home, key)
    loads, siblings = [0, 0, 0], [0, 0, 0]
    loads[home] = siblings[home] = 1
    spill = order(key, branches(loads, siblings), table, Thresholds())[0]
    assert spill != home
    loads[spill] = siblings[spill] = 1
    third = next(i for i in range(3) if i not in (home, spill))
    loads[home] = 2  # a third branch: not where the second is still computing the history
    assert order(key, branches(loads, siblings), table, Thresholds())[0] == third
    loads[home] = 1
    table.record(spill, key)  # its answer began: it holds the history now
    loads[third] = 2  # busy with others: the branch stays with a holder of equal load
    assert order(key, branches(loads, siblings), table, Thresholds())[0] in (home, spill)
    table.record(home, key)  # the home served its latest turn, but is busier now
    loads[spill] = siblings[spill] = 0
    assert order(key, branches(loads, siblings), table, Thresholds())[0] == spill  # the lighter holder


def test_a_single_request_does_not_spread_and_branches_stay_when_no_upstream_is_lighter() -> None:
    key, table = route_key(chat(SYSTEM, 2)), PrefixTable(2)
    home = order(key, up(0, 0), table, Thresholds())[0]
    table.record(home, key)
    loads = [1, 1]
    assert order(key, branches(loads, [0, 0]), table, Thresholds())[0] == home  # another's load
    siblings = [0, 0]
    siblings[home] = 1
    assert order(key, branches(loads, siblings), table, Thresholds())[0] == home  # none lighter

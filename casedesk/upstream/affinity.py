"""Prefix-aware upstream choice, without I/O: which upstream most likely holds a prompt's cache.

llama-server keeps a conversation's KV cache in the slot (and its `--cache-ram` prompt cache)
of the server that served its last turn, so the next turn should go back there. CaseDesk
judges that from what it sent where, as SGLang's cache-aware router and llm-d's approximate
mode do (docs/anthropic-api.md §4):

- A chat request is serialised canonically (tools and template options, then each message)
  and cut into fixed-size blocks; the hash of block i covers block i-1's hash, so one hash
  names a whole prefix. Each upstream keeps the blocks it was sent in a bounded LRU.
- A conversation's *home* is a rendezvous (highest-random-weight) choice over the healthy
  upstreams, keyed by its leading prefix (tools + system + first user turn). Every CaseDesk
  instance with the same upstreams and health computes the same home, with no shared state;
  when the home dies its conversations move to their next choice and come back after.
- A request goes where the longest prefix of it was sent, else to its home. A load bound
  (absolute and relative in-flight thresholds, after SGLang's `balance_abs_threshold` and
  `balance_rel_threshold`) moves a request off an overloaded choice, to the upstream holding
  most of it, else the least loaded; the conversation then stays where it was moved, so a
  lopsided hash evens out. A first turn moves by the bound too, unless this instance knows it
  is alone (Solitude): where a first turn goes is what every other instance has to guess for
  the second, and all they can guess is the home (a first turn moved early by one instance's
  own load costs its second turn a cold prefill on the other). An instance alone, which saw
  the previous turn of every later turn it got lately, moves a first turn at half the
  absolute threshold: it has no cache to lose, and nobody else to tell.
- Parallel requests of one conversation (an agent's branches on one history: the same lead)
  spread: when its upstream already serves one of them and another carries fewer requests,
  the next goes there, unless a branch there is still computing the history (it holds it
  once that one's answer begins). One prefill of the shared history buys a second server's
  slots, where at the home they would queue.
  What an upstream serves only because the home is down is not remembered
  (Balancer.served): the conversation goes back home when the home recovers.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

BLOCK_BYTES = 512  # ~128 tokens of JSON text: fine enough, and an 80 KB agent prompt is 160 hashes
MAX_BLOCKS_PER_UPSTREAM = 32768  # ≈ 16 MB of prompt text remembered per upstream in ~6 MB (tracemalloc)

_HASH_BYTES = 8


@dataclass(frozen=True, slots=True)
class RouteKey:
    """What the balancer needs to know of one chat request."""

    lead: bytes  # hash of the leading prefix: tools + template options + system + first user turn
    lead_bytes: int  # how long that prefix is in the canonical serialisation
    blocks: tuple[bytes, ...]  # chained hashes of the serialisation's whole blocks
    first: bool  # nothing after the first user turn: a conversation's first request
    messages: int  # how many messages the request has (a turn adds two: answer and question)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The load bound: leave the cache-chosen upstream when its requests in flight exceed the
    least-loaded one's by at least `absolute` AND by the factor `relative`."""

    absolute: int = 4
    relative: float = 1.5

    def overloaded(self, load: int, least: int) -> bool:
        return load - least >= self.absolute and load > least * self.relative


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_HASH_BYTES).digest()


def route_key(chat: dict[str, Any], block_bytes: int = BLOCK_BYTES) -> RouteKey:
    """The RouteKey of a llama-server chat request (translate/request.py's output)."""
    parts = [orjson.dumps([chat.get("tools"), chat.get("chat_template_kwargs")], option=orjson.OPT_SORT_KEYS)]
    lead_end = 0
    seen_user = False
    for message in chat.get("messages") or ():
        parts.append(orjson.dumps(message, option=orjson.OPT_SORT_KEYS))
        if not seen_user:
            lead_end += 1
            seen_user = message.get("role") == "user"
    text = b"".join(parts)
    lead_bytes = sum(len(p) for p in parts[: lead_end + 1])
    blocks: list[bytes] = []
    previous = b""
    for start in range(0, len(text) - block_bytes + 1, block_bytes):
        previous = _digest(previous + text[start : start + block_bytes])
        blocks.append(previous)
    first = len(parts) == lead_end + 1  # parts: the tools, then one per message
    lead = _digest(text[:lead_bytes])
    return RouteKey(lead=lead, lead_bytes=lead_bytes, blocks=tuple(blocks), first=first, messages=len(parts) - 1)


class PrefixTable:
    """Per upstream, the block hashes CaseDesk sent it: a bounded LRU each, so memory stays
    bounded whatever the traffic. A request's blocks are touched last-first, which keeps a
    prefix's head the freshest: eviction eats prompts from their tails, as a cache would.
    Each block remembers when it was last sent, so that of two upstreams holding as many
    blocks of a prompt the one that served its latest turn wins (a turn adds less than a block)."""

    def __init__(
        self, upstreams: int, max_blocks: int = MAX_BLOCKS_PER_UPSTREAM, block_bytes: int = BLOCK_BYTES
    ) -> None:
        self.block_bytes = block_bytes
        self.max_blocks = max_blocks
        self._held: list[OrderedDict[bytes, int]] = [OrderedDict() for _ in range(upstreams)]
        self._clock = 0

    def record(self, upstream: int, key: RouteKey) -> None:
        self._clock += 1
        held = self._held[upstream]
        for block in reversed(key.blocks):
            held[block] = self._clock
            held.move_to_end(block)
        while len(held) > self.max_blocks:
            held.popitem(last=False)

    def match(self, upstream: int, key: RouteKey) -> tuple[int, int]:
        """(how many leading blocks of the request this upstream was sent, when last); (0, 0): none."""
        held = self._held[upstream]
        for count in range(len(key.blocks), 0, -1):
            when = held.get(key.blocks[count - 1])  # chained: this one hash stands for the whole prefix
            if when is not None:
                return count, when
        return 0, 0

    def matched(self, upstream: int, key: RouteKey) -> int:
        return self.match(upstream, key)[0]

    def holds_lead(self, upstream: int, key: RouteKey) -> bool:
        """The upstream was sent at least this conversation's leading prefix."""
        return self.matched(upstream, key) >= max(1, key.lead_bytes // self.block_bytes)

    def size(self) -> int:
        return sum(len(held) for held in self._held)


class Solitude:
    """Whether this instance alone serves its conversations, judged from the later turns it gets:
    one whose previous turn it did not see was served by another instance (or before a
    restart). Alone, it may move a first turn by its own load, early (nobody else must guess
    where it went); with others about, or before it knows, a first turn goes home until the
    load bound. Memory: the latest turn of a bounded number of conversations."""

    def __init__(self, window: int = 16, conversations: int = 16384) -> None:
        self._recent: deque[bool] = deque(maxlen=window)  # later turns: True when it saw the previous one
        self._latest: OrderedDict[bytes, int] = OrderedDict()  # lead → messages in its latest request here
        self._conversations = conversations

    def saw(self, key: RouteKey) -> None:
        latest = self._latest.get(key.lead)
        if not key.first:
            self._recent.append(latest is not None and key.messages <= latest + 2)
        self._latest[key.lead] = max(key.messages, latest or 0)
        self._latest.move_to_end(key.lead)
        if len(self._latest) > self._conversations:
            self._latest.popitem(last=False)

    @property
    def alone(self) -> bool:
        return bool(self._recent) and all(self._recent)


def rendezvous(lead: bytes, names: Sequence[str]) -> list[int]:
    """Indices of `names` from the highest to the lowest random weight for `lead`: the same on
    every instance, and removing a name moves only the keys whose first choice it was."""
    weights = [(_digest(lead + name.encode()), i) for i, name in enumerate(names)]
    return [i for _, i in sorted(weights, reverse=True)]


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the choice needs to know of one upstream right now."""

    name: str  # its identity across instances: "host:port" as configured
    healthy: bool
    in_flight: int
    siblings: int = 0  # of those, requests of the same conversation (the same lead)


def _held(candidates: list[int], holders: list[int], key: RouteKey, table: PrefixTable) -> list[int]:
    """The candidates that hold the request's lead: the one sent most of it (of equals, the
    one that served its latest turn) first."""
    return sorted((i for i in candidates if i in holders), key=lambda i: table.match(i, key), reverse=True)


def order(
    key: RouteKey, upstreams: Sequence[Candidate], table: PrefixTable, thresholds: Thresholds, alone: bool = False
) -> list[int]:
    """The upstreams (indices) in the order to try them for this request; `alone`: see Solitude."""
    healthy = [i for i, u in enumerate(upstreams) if u.healthy]
    pool = healthy or list(range(len(upstreams)))
    ranked = [pool[j] for j in rendezvous(key.lead, [upstreams[i].name for i in pool])]
    holders = [i for i in ranked if table.holds_lead(i, key)]
    home = (_held(ranked, holders, key, table) or ranked)[0]  # its longest prefix, else its home
    load = upstreams[home].in_flight
    least = min(upstreams[i].in_flight for i in pool)
    if alone and key.first and not holders:
        # Nothing cached anywhere, and no other instance to guess where it goes: it moves sooner.
        thresholds = Thresholds(max(1, thresholds.absolute // 2), thresholds.relative)
    if thresholds.overloaded(load, least):
        fit = [i for i in ranked if not thresholds.overloaded(upstreams[i].in_flight, least)]
        held = _held(fit, holders, key, table)
        home = held[0] if held else min(fit, key=lambda i: upstreams[i].in_flight)
    elif upstreams[home].siblings and least < load:
        # A branch of a conversation already served here (an agent's parallel calls on one
        # history): a less loaded upstream serves it sooner, at the price of one prefill there;
        # not of one per branch: none goes where another branch is still computing it.
        lighter = [i for i in ranked if upstreams[i].in_flight < load and (i in holders or not upstreams[i].siblings)]
        held = _held(lighter, holders, key, table)
        if lighter:
            home = held[0] if held else min(lighter, key=lambda i: upstreams[i].in_flight)
    rest = [i for i in ranked if i != home]
    unhealthy = sorted((i for i in range(len(upstreams)) if i not in pool), key=lambda i: upstreams[i].in_flight)
    return [home, *rest, *unhealthy]

"""The fleet benchmark's traffic: agents' conversations, turn by turn, through the Anthropic SDK.

Each conversation has a long system prompt of its own, turns that wait a random pause (an
agent runs tools, a user reads and types), and may fan out into parallel branches on one
history (an agent's parallel calls): what prefix-aware routing is for.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

WORDS = (
    "lighthouse keeper harbour storm signal beacon lantern rocks tide ship captain log weather north "
    "wind coast night fog horn island supply boat winter summer gull chart compass rope oil lamp glass "
    "stairs tower door window radio report shift watch duty rescue crew anchor wave current reef sand "
    "village market letter bread coffee book chair table bed map clock bell light dark morning evening"
).split()


def system_prompt(name: str, words: int) -> str:
    """A long, distinct system prompt (~1.2 tokens a word with Gemma's tokenizer)."""
    rng = random.Random(name)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are assistant {name}. Answer in one short sentence. Background notes: {body}"


@dataclass
class Turn:
    conversation: str
    turn: int
    ttft: float
    tokens: int
    prompt_tokens: int
    cached_tokens: int


async def chat_turn(base_url: str, system: str, messages: list[Any], max_tokens: int) -> tuple[Any, float]:
    import anthropic

    client = anthropic.AsyncAnthropic(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    started = time.perf_counter()
    ttft = float("nan")
    async with client.messages.stream(
        model="m", max_tokens=max_tokens, system=system, messages=messages, extra_body={"temperature": 0}
    ) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and ttft != ttft:
                ttft = time.perf_counter() - started
        message = await stream.get_final_message()
    await client.close()
    if ttft != ttft:  # nothing generated: the head of the answer stands in
        ttft = time.perf_counter() - started
    return message, ttft


async def converse(
    bases: list[str],
    conversations: dict[str, int],
    in_flight: int,
    max_tokens: int,
    prompt_words: int,
    branches: dict[str, int] | None = None,
    think: float = 1.0,
) -> list[Turn]:
    """Each conversation's turns in order (its turn t goes to bases[(i + t) % len(bases)]); at
    most `in_flight` requests at once, a random pause of up to `think` seconds before each
    turn. A conversation in `branches` sends that many requests at
    once after its first turn, each a different question on the same history (an agent's
    parallel calls): the hot spot of the skewed variant."""
    gate = asyncio.Semaphore(in_flight)
    turns: list[Turn] = []
    branches = branches or {}

    async def ask(index: int, name: str, turn: int, system: str, messages: list[dict[str, str]]) -> str:
        async with gate:
            message, ttft = await chat_turn(bases[(index + turn) % len(bases)], system, messages, max_tokens)
        usage = message.usage
        prompt = usage.input_tokens + (usage.cache_read_input_tokens or 0)
        turns.append(Turn(name, turn, ttft, usage.output_tokens, prompt, usage.cache_read_input_tokens or 0))
        return "".join(block.text for block in message.content if block.type == "text") or "ok"

    async def one(index: int, name: str, count: int) -> None:
        system = system_prompt(name, prompt_words)
        messages: list[dict[str, str]] = []
        pause = random.Random(name)
        for turn in range(count):
            # An agent runs tools, a user reads and types: turns do not arrive in lockstep.
            await asyncio.sleep(pause.uniform(0, think))
            messages.append({"role": "user", "content": f"Question {turn} for {name}: what is the weather?"})
            answer = await ask(index, name, turn, system, list(messages))
            messages.append({"role": "assistant", "content": answer})
        if name in branches:
            await asyncio.gather(
                *(
                    ask(index, name, count + j, system, [*messages, {"role": "user", "content": f"Branch {j}?"}])
                    for j in range(branches[name])
                )
            )

    await asyncio.gather(*(one(i, name, count) for i, (name, count) in enumerate(conversations.items())))

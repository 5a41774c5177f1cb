"""Pure work that grows with a request (parsing, translation) done without letting one large
body stall or bloat the process (issue 22, item 3).

A body under LARGE_BODY is worked on the event loop: that costs microseconds to a few
milliseconds. A larger one is worked in a thread (the loop keeps running: the GIL is handed
over every few milliseconds), one at a time per gateway, so three 27 MB bodies never hold
three copies of their objects at once. orjson's own parse holds the GIL while it runs
(60–95 ms per MB measured on a busy 2-core box): that part of a large body still pauses the
loop, once, which is why only one is processed at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import orjson

from casedesk.anthropic.errors import invalid_request
from casedesk.serving import DeploymentState

LARGE_BODY = 1 << 20  # bytes
LARGE_BODIES_AT_ONCE = 1
T = TypeVar("T")


def new_large_body_gate() -> asyncio.Semaphore:
    return asyncio.Semaphore(LARGE_BODIES_AT_ONCE)


async def sized_work(deployment: DeploymentState, size: int, work: Callable[..., T], *args: object) -> T:
    """`work(*args)` (pure: parsing, translation) for a body of `size` bytes: at once when it
    is small, else in a worker thread, at most LARGE_BODIES_AT_ONCE at a time."""
    if size < LARGE_BODY:
        return work(*args)
    async with deployment.large_bodies:
        return await asyncio.to_thread(work, *args)


def chat_payload(chat: dict[str, object]) -> bytes:
    """The chat request's bytes. Validation bounds every nesting (anthropic/json_schema.py);
    should a value still be too deep for orjson, the client hears a 400, not a 500."""
    try:
        return orjson.dumps(chat)
    except orjson.JSONEncodeError as exc:
        raise invalid_request(f"the request cannot be forwarded: {exc}") from None

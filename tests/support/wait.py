"""Waiting for a condition with a deadline: the tests' only way to synchronise with the
gateway's tasks (never a sleep of a guessed length)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable


async def until(condition: Callable[[], object], timeout: float = 15.0, what: str = "") -> None:
    """Return as soon as `condition()` is true (awaited when it is a coroutine function);
    fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        await asyncio.sleep(0.01)

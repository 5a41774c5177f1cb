"""Which event loop the benchmark's own processes run on: uvloop when installed, as CaseDesk does.

Only the import is guarded: an ImportError raised while a benchmark runs is that benchmark's
failure, and must not rerun everything on asyncio's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def runner() -> tuple[str, Callable[[Coroutine[Any, Any, T]], T]]:
    """(name, run): uvloop's `run` when uvloop is installed (the `fast` extra), else asyncio's."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return "asyncio", asyncio.run
    return "uvloop", uvloop.run


def run(coro: Coroutine[Any, Any, T]) -> T:
    return runner()[1](coro)

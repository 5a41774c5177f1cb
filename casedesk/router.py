"""Path patterns → handler and path parameters; 404 for unknown paths, 405 for wrong methods.

Patterns are split on "/" and matched segment by segment, exactly: a `{name}` segment takes
one whole non-empty segment, so there is no traversal and no partial match. A trailing `*`
segment takes the rest of the path (used for HEAD probes of a base URL). Each segment is
percent-decoded after the split (RFC 3986 §2.4), so `%2F` is a slash inside a value: the SDK
sends `models.retrieve("hf.co/org/m:Q4")` as `…/models/hf.co%2Forg%2Fm:Q4`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from casedesk.anthropic.errors import ApiError

RouteHandler = Callable[..., Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    methods: frozenset[str]
    segments: tuple[str, ...]
    handler: RouteHandler


@dataclass(frozen=True, slots=True)
class Match:
    handler: RouteHandler
    params: Mapping[str, str]  # (shared by every request on this path: read only)


class Router:
    def __init__(self) -> None:
        self._routes: list[Route] = []
        # A gateway sees a handful of paths over and over (one per deployment and endpoint),
        # and each request is routed twice (its head is checked before its body is read): the
        # matches are remembered, a bounded number, so that unknown paths cannot grow it.
        # (Refusals are raised, so never remembered.)
        self._resolved = functools.lru_cache(maxsize=256)(self._resolve)

    def add(self, methods: str | tuple[str, ...], pattern: str, handler: RouteHandler) -> None:
        names = (methods,) if isinstance(methods, str) else methods
        self._routes.append(Route(frozenset(names), tuple(pattern.strip("/").split("/")), handler))
        self._resolved.cache_clear()

    def resolve(self, method: str, path: str) -> Match:
        """The route for this request; ApiError 404 or 405 (with `allow`) when there is none."""
        return self._resolved(method, path)

    def _resolve(self, method: str, path: str) -> Match:
        parts = path.strip("/").split("/")
        if "" in parts and path.strip("/"):
            raise ApiError(404, f"no route for {path}")
        parts = [unquote(part) for part in parts]  # returns the very string when it has no "%"
        allowed: set[str] = set()
        for route in self._routes:
            params = _match(route.segments, parts)
            if params is None:
                continue
            if method in route.methods:
                return Match(route.handler, params)
            if route.segments[-1] != "*":  # a catch-all never makes a path "known"
                allowed |= route.methods
        if allowed:
            allow = ", ".join(sorted(allowed))
            raise ApiError(405, f"method {method} not allowed on {path}; use {allow}", headers=(("allow", allow),))
        raise ApiError(404, f"no route for {path}")


def _match(segments: tuple[str, ...], parts: list[str]) -> dict[str, Any] | None:
    params: dict[str, str] = {}
    for i, segment in enumerate(segments):
        if segment == "*":
            return params
        if i >= len(parts):
            return None
        part = parts[i]
        if segment.startswith("{") and segment.endswith("}"):
            if not part:
                return None
            params[segment[1:-1]] = part
        elif segment != part:
            return None
    return params if len(parts) == len(segments) else None

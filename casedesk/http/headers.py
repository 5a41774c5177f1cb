"""Header fields as a handler wants them: one place for the joining rule, both directions."""

from __future__ import annotations

from collections.abc import Iterable


def join_headers(fields: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """(name, value) pairs → {lower-case name: value}; repeated fields joined with ", ".

    RFC 9110 §5.3: a repeated field is equivalent to one with the values joined by commas.
    Both callers (h11 on the client side, upstream/framing.py) lower-case names and strip values.
    """
    headers: dict[str, str] = {}
    for name, value in fields:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers

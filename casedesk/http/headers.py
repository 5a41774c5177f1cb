"""Header fields as a handler wants them: one place for the joining rule, both directions."""

from __future__ import annotations

from collections.abc import Iterable


def join_headers(fields: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """h11's (name, value) pairs → {lower-case name: value}; repeated fields joined with ", ".

    RFC 9110 §5.3: a repeated field is equivalent to one with the values joined by commas.
    h11 already lower-cases names and strips values.
    """
    headers: dict[str, str] = {}
    for name, value in fields:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers

"""A tenant's per-minute limits, as data (the limiter and the shared store both read them)."""

from __future__ import annotations

from dataclasses import dataclass

# (bucket name, config key) in the order a refusal names them.
LIMITS = (
    ("requests", "requests_per_minute"),
    ("input_tokens", "input_tokens_per_minute"),
    ("output_tokens", "output_tokens_per_minute"),
)


@dataclass(frozen=True, slots=True)
class Limits:
    """A tenant's per-minute limits; 0 means no limit."""

    requests_per_minute: int = 0
    input_tokens_per_minute: int = 0
    output_tokens_per_minute: int = 0

    def any(self) -> bool:
        return bool(self.requests_per_minute or self.input_tokens_per_minute or self.output_tokens_per_minute)

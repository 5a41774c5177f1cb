"""Each tenant's rate limits (Anthropic's RPM, ITPM, OTPM) as token buckets, in this process.

Pure: every call takes `now` (monotonic seconds). A request is admitted while each of its
tenant's buckets is positive; one request is taken then, its uncached input tokens when they
are known and its output tokens as it ends. So over any window a tenant is admitted at most
its limits plus what the requests in flight when a bucket ran out went on to use.
The buckets outlive a reload (`configure` keeps what was used).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from casedesk.tenancy.bucket import TokenBucket

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


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a tenant's request does not pass now, and when it would."""

    tenant: str
    key: str  # the config key of the exhausted limit, e.g. "input_tokens_per_minute"
    limit: int
    retry_after: int  # whole seconds

    @property
    def bucket(self) -> str:
        return self.key.removesuffix("_per_minute")

    def message(self) -> str:
        return f"{self.key} ({self.limit}) exhausted for tenant {self.tenant!r}; retry after {self.retry_after} s"


class Limiter:
    def __init__(self) -> None:
        self._buckets: dict[str, dict[str, TokenBucket]] = {}

    def configure(self, limits: Mapping[str, Limits], now: float) -> None:
        """Apply a config's limits: a new bucket starts full, a kept one keeps its level."""
        configured: dict[str, dict[str, TokenBucket]] = {}
        for tenant, tenant_limits in limits.items():
            old = self._buckets.get(tenant, {})
            buckets: dict[str, TokenBucket] = {}
            for name, key in LIMITS:
                capacity = getattr(tenant_limits, key)
                if not capacity:
                    continue
                bucket = old.get(name)
                if bucket is None:
                    bucket = TokenBucket.full(capacity, now)
                else:
                    bucket.reconfigure(capacity, now)
                buckets[name] = bucket
            if buckets:
                configured[tenant] = buckets
        self._buckets = configured

    def limited(self, tenant: str) -> bool:
        return tenant in self._buckets

    def refusal(self, tenant: str, now: float) -> Refusal | None:
        """The first of `tenant`'s buckets that is not positive now, or None."""
        for name, key in LIMITS:
            bucket = self._buckets.get(tenant, {}).get(name)
            whole = name == "requests"
            if bucket is not None and not bucket.passes(now, whole):
                return Refusal(tenant, key, int(bucket.capacity), max(1, bucket.retry_after(now, whole)))
        return None

    def admit(self, tenant: str, now: float) -> Refusal | None:
        """Take one request if every bucket is positive; else say which is not."""
        refused = self.refusal(tenant, now)
        if refused is None:
            self._take(tenant, "requests", 1, now)
        return refused

    def seconds_until_admitted(self, tenant: str, now: float) -> float:
        """How long until `admit` would pass (0: now): for callers that wait instead of a 429."""
        buckets = self._buckets.get(tenant, {})
        return max(
            (bucket.seconds_until_passes(now, name == "requests") for name, bucket in buckets.items()), default=0.0
        )

    def charge(self, tenant: str, *, input_tokens: int = 0, output_tokens: int = 0, now: float) -> None:
        if input_tokens:
            self._take(tenant, "input_tokens", input_tokens, now)
        if output_tokens:
            self._take(tenant, "output_tokens", output_tokens, now)

    def _take(self, tenant: str, name: str, amount: int, now: float) -> None:
        bucket = self._buckets.get(tenant, {}).get(name)
        if bucket is not None:
            bucket.take(amount, now)

    def headers(self, tenant: str, now: float, wall: float) -> tuple[tuple[str, str], ...]:
        """Anthropic's anthropic-ratelimit-* headers for `tenant` at `now` (wall: time.time())."""
        buckets = self._buckets.get(tenant)
        if not buckets:
            return ()
        out: list[tuple[str, str]] = []
        for name, _ in LIMITS:
            bucket = buckets.get(name)
            if bucket is not None:
                out.extend(_bucket_headers(name.replace("_", "-"), bucket, now, wall))
        tokens = [buckets[name] for name in ("input_tokens", "output_tokens") if name in buckets]
        if tokens:
            tightest = min(tokens, key=lambda bucket: bucket.level(now))
            out.extend(_bucket_headers("tokens", tightest, now, wall))
        return tuple(out)

    def levels(self, now: float) -> Iterator[tuple[str, str, float]]:
        """(tenant, bucket name, tokens now) for the gauges."""
        for tenant, buckets in self._buckets.items():
            for name, bucket in buckets.items():
                yield tenant, name, bucket.level(now)


def _bucket_headers(name: str, bucket: TokenBucket, now: float, wall: float) -> list[tuple[str, str]]:
    prefix = f"anthropic-ratelimit-{name}-"
    reset = datetime.fromtimestamp(wall + bucket.seconds_until_full(now), timezone.utc)
    return [
        (prefix + "limit", str(int(bucket.capacity))),
        (prefix + "remaining", str(max(0, int(bucket.level(now))))),
        (prefix + "reset", reset.strftime("%Y-%m-%dT%H:%M:%SZ")),
    ]

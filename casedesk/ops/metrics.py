"""Prometheus metrics in the text exposition format (0.0.4), written by hand: a handful of
counters and histograms do not justify a dependency. Updated once per request, never per
token: the inter-token histogram takes each stream's mean gap.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable

from casedesk.ops.accesslog import RequestRecord
from casedesk.ops.process import State

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

Labels = tuple[tuple[str, str], ...]


class Histogram:
    __slots__ = ("buckets", "counts", "total", "count", "last")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0
        self.last = 0.0  # the latest observation

    def observe(self, value: float) -> None:
        index = bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1
        self.last = value


def _histogram(by: dict[Labels, Histogram], labels: Labels, buckets: tuple[float, ...]) -> Histogram:
    """The series' histogram, made on its first observation (setdefault would make one per call)."""
    histogram = by.get(labels)
    if histogram is None:
        histogram = by[labels] = Histogram(buckets)
    return histogram


class ModelStats:
    """One managed model's counters: loads (from its process's transitions), evictions and
    restarts (from the Supervisor's stops)."""

    def __init__(self) -> None:
        self.loads = {"ok": 0, "failed": 0}
        self.load_seconds = Histogram(DURATION_BUCKETS)
        self.evictions = {"lru": 0, "ttl": 0}
        self.restarts = 0
        self._starting_since = 0.0

    def on_transition(self, old: State, new: State) -> None:
        """Subscribed to its process (ops/process.py's TransitionHook)."""
        if new is State.STARTING:
            self._starting_since = time.monotonic()
        elif old is State.STARTING and new is State.READY:
            self.loads["ok"] += 1
            self.load_seconds.observe(time.monotonic() - self._starting_since)
        elif old is State.STARTING:
            self.loads["failed"] += 1

    def stopped(self, reason: str) -> None:
        """The Supervisor stopped the model for `reason` (scheduler.Stop's)."""
        if reason in self.evictions:
            self.evictions[reason] += 1
        elif reason == "exited":
            self.restarts += 1


class Metrics:
    """The process's metrics. Gauges are read at render time from callbacks."""

    def __init__(self) -> None:
        self.requests: defaultdict[Labels, int] = defaultdict(int)
        self.input_tokens: defaultdict[Labels, int] = defaultdict(int)
        self.output_tokens: defaultdict[Labels, int] = defaultdict(int)
        self.prompt_tokens: defaultdict[Labels, int] = defaultdict(int)  # by upstream too
        self.cached_prompt_tokens: defaultdict[Labels, int] = defaultdict(int)
        self.ttft: dict[Labels, Histogram] = {}
        self.inter_token: dict[Labels, Histogram] = {}
        self.duration: dict[Labels, Histogram] = {}
        self.repaired_tool_calls: defaultdict[Labels, int] = defaultdict(int)
        self.gauges: list[tuple[str, str, Callable[[], Iterable[tuple[Labels, float]]]]] = []
        self.counters: list[tuple[str, str, Callable[[], float]]] = []
        self.read_counters: list[tuple[str, str, Callable[[], Iterable[tuple[Labels, float]]]]] = []
        self.read_histograms: list[tuple[str, str, Callable[[], Iterable[tuple[Labels, Histogram]]]]] = []
        # issue 17: usage per tenant (label values from the config only: tenant names, tags)
        self.tenant_requests: defaultdict[Labels, int] = defaultdict(int)
        self.tenant_input_tokens: defaultdict[Labels, int] = defaultdict(int)  # uncached
        self.tenant_cached_tokens: defaultdict[Labels, int] = defaultdict(int)
        self.tenant_output_tokens: defaultdict[Labels, int] = defaultdict(int)
        self.tenant_rate_limited: defaultdict[Labels, int] = defaultdict(int)

    def gauge(self, name: str, help_text: str, read: Callable[[], Iterable[tuple[Labels, float]]]) -> None:
        self.gauges.append((name, help_text, read))

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere (e.g. by the HTTP layer), read at render time."""
        self.counters.append((name, help_text, read))

    def labelled_counter(self, name: str, help_text: str, read: Callable[[], Iterable[tuple[Labels, float]]]) -> None:
        """Counters with labels kept by their owner (e.g. the supervisor's loads), read at render time."""
        self.read_counters.append((name, help_text, read))

    def labelled_histogram(
        self, name: str, help_text: str, read: Callable[[], Iterable[tuple[Labels, Histogram]]]
    ) -> None:
        """Histograms with labels kept by their owner, read at render time."""
        self.read_histograms.append((name, help_text, read))

    def record(
        self,
        deployment: str,
        model: str,
        status: int,
        *,
        duration: float,
        input_tokens: int = 0,
        output_tokens: int = 0,
        ttft: float | None = None,
        upstream: str = "",
        cached_tokens: int = 0,
        repaired_tool_calls: int = 0,
    ) -> None:
        """One finished request (model "" when the request named none that exists)."""
        labels: Labels = (("deployment", deployment), ("model", model))
        if upstream and input_tokens:
            by_upstream: Labels = (*labels, ("upstream", upstream))
            self.prompt_tokens[by_upstream] += input_tokens
            self.cached_prompt_tokens[by_upstream] += cached_tokens
        self.requests[(*labels, ("status", str(status)))] += 1
        _histogram(self.duration, labels, DURATION_BUCKETS).observe(duration)
        if input_tokens:
            self.input_tokens[labels] += input_tokens
        if output_tokens:
            self.output_tokens[labels] += output_tokens
        if repaired_tool_calls:
            self.repaired_tool_calls[labels] += repaired_tool_calls
        if ttft is not None:
            _histogram(self.ttft, labels, LATENCY_BUCKETS).observe(ttft)
            if output_tokens > 1:
                gap = (duration - ttft) / (output_tokens - 1)
                _histogram(self.inter_token, labels, GAP_BUCKETS).observe(gap)

    def record_tenant(self, record: RequestRecord) -> None:
        """One finished request of a named tenant (issue 17)."""
        labels: Labels = (("tenant", record.tenant), ("deployment", record.deployment), ("model", record.tag))
        self.tenant_requests[(*labels, ("status", str(record.status)))] += 1
        uncached = record.input_tokens - record.cached_tokens
        if uncached:
            self.tenant_input_tokens[labels] += uncached
        if record.cached_tokens:
            self.tenant_cached_tokens[labels] += record.cached_tokens
        if record.output_tokens:
            self.tenant_output_tokens[labels] += record.output_tokens
        if record.status == 429 and record.limit:
            self.tenant_rate_limited[(("tenant", record.tenant), ("limit", record.limit))] += 1

    def render(self) -> bytes:
        out: list[str] = []
        _counter(out, "casedesk_requests_total", "Requests answered, by status.", self.requests)
        _counter(out, "casedesk_input_tokens_total", "Prompt tokens (cached ones included).", self.input_tokens)
        _counter(out, "casedesk_output_tokens_total", "Generated tokens.", self.output_tokens)
        _counter(
            out,
            "casedesk_prompt_tokens_total",
            "Prompt tokens each upstream was sent (cached ones included).",
            self.prompt_tokens,
        )
        _counter(
            out,
            "casedesk_cached_prompt_tokens_total",
            "Prompt tokens each upstream served from its prompt cache.",
            self.cached_prompt_tokens,
        )
        _counter(
            out,
            "casedesk_repaired_tool_calls_total",
            "Tool calls the model wrote as JSON text, answered as tool_use blocks.",
            self.repaired_tool_calls,
        )
        for name, help_text, values in (
            ("casedesk_tenant_requests_total", "Requests per tenant, by status.", self.tenant_requests),
            (
                "casedesk_tenant_input_tokens_total",
                "Uncached input tokens per tenant (what its input_tokens_per_minute counts).",
                self.tenant_input_tokens,
            ),
            (
                "casedesk_tenant_cached_input_tokens_total",
                "Input tokens served from the prompt cache, per tenant.",
                self.tenant_cached_tokens,
            ),
            ("casedesk_tenant_output_tokens_total", "Output tokens per tenant.", self.tenant_output_tokens),
            (
                "casedesk_tenant_rate_limited_total",
                "429s per tenant, by the limit that refused.",
                self.tenant_rate_limited,
            ),
        ):
            _counter(out, name, help_text, values)
        _histograms(out, "casedesk_time_to_first_token_seconds", "Request received to first token sent.", self.ttft)
        _histograms(
            out, "casedesk_inter_token_seconds", "Mean gap between tokens, one sample per stream.", self.inter_token
        )
        _histograms(out, "casedesk_request_duration_seconds", "Request received to response complete.", self.duration)
        for name, help_text, read in self.gauges:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge")
            out.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in read())
        for name, help_text, read_total in self.counters:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} counter\n{name} {_number(read_total())}")
        for name, help_text, read in self.read_counters:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} counter")
            out.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in read())
        for name, help_text, read_histograms in self.read_histograms:
            _histograms(out, name, help_text, dict(read_histograms()))
        return ("\n".join(out) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{key}="{_escape(value)}"' for key, value in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _counter(out: list[str], name: str, help_text: str, values: dict[Labels, int]) -> None:
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} counter")
    out.extend(f"{name}{_labels(labels)} {value}" for labels, value in sorted(values.items()))


_INF = 'le="+Inf"'


def _histograms(out: list[str], name: str, help_text: str, histograms: dict[Labels, Histogram]) -> None:
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} histogram")
    for labels, histogram in sorted(histograms.items()):
        cumulative = 0
        for bound, count in zip(histogram.buckets, histogram.counts, strict=True):
            cumulative += count
            le = 'le="%g"' % bound
            out.append(f"{name}_bucket{_labels(labels, le)} {cumulative}")
        out.append(f"{name}_bucket{_labels(labels, _INF)} {histogram.count}")
        out.append(f"{name}_sum{_labels(labels)} {_number(histogram.total)}")
        out.append(f"{name}_count{_labels(labels)} {histogram.count}")

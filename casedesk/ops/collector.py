"""What /metrics reads from the running service at scrape time: admission queues, upstream
health and load, managed models, the HTTP layer's and the logs' counters.

Nothing here is updated per request (ops/metrics.py counts requests); these are read from
their owners when Prometheus asks, so they are never stale and cost nothing in between. The
current gateway is asked for through a callable: a reload swaps it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from casedesk.ops.metrics import Histogram, Labels, Metrics
from casedesk.ops.process import ManagedProcess, State
from casedesk.ops.supervisor import Supervisor
from casedesk.serving import DeploymentState
from casedesk.upstream.balancer import UpstreamState


class ServiceCollector:
    """Registers the service's read-at-scrape-time series on `metrics`."""

    def __init__(
        self,
        metrics: Metrics,
        deployments: Callable[[], Mapping[str, DeploymentState]],
        supervisor: Supervisor,
        write_timeouts: Callable[[], float],
        log_lines_dropped: Callable[[], float],
    ) -> None:
        self._deployments = deployments
        self._supervisor = supervisor
        metrics.gauge("casedesk_in_flight_requests", "Requests in flight, by deployment.", self._in_flight)
        metrics.gauge("casedesk_queued_requests", "Requests waiting for a slot, by deployment.", self._queued)
        metrics.gauge("casedesk_upstream_up", "1 while an upstream is healthy.", self._upstream_up)
        metrics.gauge(
            "casedesk_upstream_in_flight", "Requests in flight per upstream (its load).", self._upstream_in_flight
        )
        metrics.gauge(
            "casedesk_upstream_errors", "Failures seen per upstream (since start or reload).", self._upstream_errors
        )
        metrics.counter(
            "casedesk_write_timeouts_total",
            "Requests ended because the client took nothing for [server] write_timeout seconds.",
            write_timeouts,
        )
        metrics.gauge("casedesk_model_state", "1 for the state each managed llama-server is in.", self._model_states)
        metrics.gauge(
            "casedesk_model_waiting_requests", "Requests waiting for their model to load.", self._model_waiting
        )
        metrics.labelled_counter(
            "casedesk_model_loads_total", "Managed llama-server loads, by result.", self._model_loads
        )
        metrics.labelled_histogram(
            "casedesk_model_load_seconds", "Start of a managed llama-server to healthy.", self._model_load_seconds
        )
        metrics.labelled_counter(
            "casedesk_model_evictions_total",
            "Managed llama-servers stopped to make room (lru) or idle past their ttl.",
            self._model_evictions,
        )
        metrics.labelled_counter(
            "casedesk_model_restarts_total", "Managed llama-servers that exited by themselves.", self._model_restarts
        )
        metrics.counter(
            "casedesk_log_lines_dropped_total",
            "Access-log and log lines dropped because their reader (stdout, the journal) did not keep up.",
            log_lines_dropped,
        )

    def _in_flight(self) -> list[tuple[Labels, float]]:
        return [((("deployment", d),), s.admission.in_flight) for d, s in self._deployments().items()]

    def _queued(self) -> list[tuple[Labels, float]]:
        return [((("deployment", d),), s.admission.queued) for d, s in self._deployments().items()]

    def _upstreams(self) -> list[tuple[Labels, UpstreamState]]:
        return [
            ((("deployment", d), ("model", tag), ("upstream", state.pool.authority)), state)
            for d, deployment in self._deployments().items()
            for tag, model in deployment.models.items()
            for state in model.balancer.states
        ]

    def _upstream_up(self) -> list[tuple[Labels, float]]:
        return [(labels, 1.0 if state.healthy else 0.0) for labels, state in self._upstreams()]

    def _upstream_in_flight(self) -> list[tuple[Labels, float]]:
        return [(labels, state.pool.in_flight) for labels, state in self._upstreams()]

    def _upstream_errors(self) -> list[tuple[Labels, float]]:
        return [(labels, state.errors) for labels, state in self._upstreams()]

    def _models(self) -> list[tuple[Labels, ManagedProcess]]:
        processes = self._supervisor.processes.items()
        return [((("deployment", dep), ("model", tag)), process) for (dep, tag), process in processes]

    def _model_states(self) -> list[tuple[Labels, float]]:
        return [
            ((*labels, ("state", state.value)), 1.0 if process.state is state else 0.0)
            for labels, process in self._models()
            for state in State
            if state is not State.SHUTDOWN
        ]

    def _model_waiting(self) -> list[tuple[Labels, float]]:
        return [(labels, len(process.waiters)) for labels, process in self._models()]

    def _model_loads(self) -> list[tuple[Labels, float]]:
        return [
            ((*labels, ("result", result)), count)
            for labels, process in self._models()
            for result, count in process.loads.items()
        ]

    def _model_load_seconds(self) -> list[tuple[Labels, Histogram]]:
        return [(labels, process.load_seconds) for labels, process in self._models()]

    def _model_evictions(self) -> list[tuple[Labels, float]]:
        return [
            ((*labels, ("reason", reason)), count)
            for labels, process in self._models()
            for reason, count in process.evictions.items()
        ]

    def _model_restarts(self) -> list[tuple[Labels, float]]:
        return [(labels, process.restarts) for labels, process in self._models()]

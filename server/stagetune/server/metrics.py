"""Prometheus metrics of one server, on their own HTTP port (``stagetune serve
--metrics-port``), in the manner of Katib's trial metrics and go-grpc-prometheus.

- Studies, computed at scrape time from the store, never kept apart from it:
  ``stagetune_trials{study,state}``, ``stagetune_study_hypervolume{study}``,
  ``stagetune_study_front_size{study}``, ``stagetune_studies{state}`` and
  ``stagetune_store_up`` (0 when the scrape could not read the store). A scrape costs a
  fixed number of queries whatever the number of trials (``StudyStore.tallies``), plus one
  read of a study's objective values when its count of complete trials changed since the
  last scrape. Per-study series cover every running study and the newest others, up to
  ``max_studies``; ``stagetune_studies`` counts them all. Replicas sharing one database
  report the same study series: aggregate them with ``max``, not ``sum``.
- Events of this process, reported by the trial service (``TrialEvents``):
  ``stagetune_acquire_seconds{outcome}``, ``stagetune_complete_seconds``,
  ``stagetune_rung_decisions_total{decision}``, ``stagetune_lease_expiries_total``,
  ``stagetune_trial_requeues_total``; read from their owners at scrape time:
  ``stagetune_suggestion_pool_misses_total``, ``stagetune_tracking_backlog``,
  ``stagetune_tracking_errors_total``.
- gRPC, with go-grpc-prometheus's names and labels, from an interceptor:
  ``grpc_server_started_total``, ``grpc_server_handled_total{grpc_code}`` (Go's code names:
  ``OK``, ``InvalidArgument``, ``Unavailable``...), ``grpc_server_handling_seconds``. Unary
  calls only (every stagetune method is unary; health Watch and reflection streams are not
  counted). Methods of the served services start at zero, so rates exist from the start.
- The process: ``process_*``, ``python_gc_*``, ``python_info``.

Labels are study, state, outcome, decision and the gRPC service, method and code: never a
trial, worker or anything else a client chooses freely. Each server has its own registry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, get_args
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stagetune.contract.names import STUDY_STATES, TRIAL_STATES
from stagetune.objectives.pareto import non_dominated_ranks
from stagetune.server.storage import StudyStore, StudyTally
from stagetune.server.tracking import Tracker
from stagetune.server.trial_events import AcquireOutcome, TrialEvents

__all__ = ["ServerMetrics", "GrpcServerMetrics", "StudyCollector"]

_log = logging.getLogger(__name__)

# Handing out a trial waits at most for the suggestion pool (10 s) or the database.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _go_code(code: grpc.StatusCode) -> str:
    """Go's name of a status code (codes.Code.String()), as go-grpc-prometheus labels it."""
    special = {grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled"}
    return special.get(code) or "".join(w.capitalize() for w in code.name.split("_"))


_GO_CODE = {code: _go_code(code) for code in grpc.StatusCode}


class GrpcServerMetrics(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """go-grpc-prometheus's server metrics, as an interceptor placed first (outermost), so
    that the code it counts is the one the client gets, authentication refusals included."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self._started = Counter(
            "grpc_server_started", "RPCs started on the server.", labels, registry=registry
        )
        self._handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self._seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of gRPC calls handled by the server.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    def initialize(self, methods: Iterable[tuple[str, str]]) -> None:
        """Start the series of these (service, method) pairs at zero (code OK)."""
        for service, method in methods:
            self._started.labels("unary", service, method)
            self._handled.labels("unary", service, method, "OK")
            self._seconds.labels("unary", service, method)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # unknown methods (client-chosen names) and streams: not counted
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        inner = handler.unary_unary
        started = self._started.labels("unary", service, method)
        seconds = self._seconds.labels("unary", service, method)

        def measured(request: Any, context: grpc.ServicerContext) -> Any:
            started.inc()
            begin = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN  # raised without setting a code
            try:
                response = inner(request, context)
                code = grpc.StatusCode.OK
                return response
            finally:
                seconds.observe(time.perf_counter() - begin)
                # ``code()`` is what abort() or set_code() left (None when neither ran).
                final = getattr(context, "code", lambda: None)()
                self._handled.labels("unary", service, method, _GO_CODE[final or code]).inc()

        return grpc.unary_unary_rpc_method_handler(
            measured,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class StudyCollector(Collector):
    """Study series computed at scrape time from the store (see the module docstring)."""

    def __init__(self, store: StudyStore, max_studies: int = 200) -> None:
        self._store = store
        self._max_studies = max_studies
        # Front size by study, with the count of finished-complete trials it was computed at.
        self._fronts: dict[str, tuple[int, int]] = {}

    def describe(self) -> Iterable[Metric]:
        return list(self._families(up=1))

    def _families(self, up: int) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "stagetune_store_up", "1 if the last scrape read the study store, else 0.", value=up
        )

    def collect(self) -> Iterable[Metric]:
        try:
            tallies = self._store.tallies()
        except Exception as e:  # Unavailable, or worse: the scrape still answers
            _log.warning("metrics scrape could not read the study store: %s", e)
            return list(self._families(up=0))
        trials = GaugeMetricFamily(
            "stagetune_trials", "Trials of a study in each state.", labels=["study", "state"]
        )
        studies = GaugeMetricFamily("stagetune_studies", "Studies in each state.", labels=["state"])
        hypervolume = GaugeMetricFamily(
            "stagetune_study_hypervolume",
            "Hypervolume of the study's Pareto front (its reference point is fixed).",
            labels=["study"],
        )
        front = GaugeMetricFamily(
            "stagetune_study_front_size",
            "Feasible complete trials on the study's Pareto front.",
            labels=["study"],
        )
        by_state = dict.fromkeys(STUDY_STATES.names, 0)
        for tally in tallies:
            by_state[tally.state] = by_state.get(tally.state, 0) + 1
        for state, n in by_state.items():
            studies.add_metric([state], n)
        shown = sorted(tallies, key=lambda t: (t.state != "running", -t.created.timestamp()))
        shown = shown[: self._max_studies]
        for tally in shown:
            name = tally.spec.name
            for trial_state in TRIAL_STATES.names:
                trials.add_metric([name, trial_state], tally.trials.get(trial_state, 0))
            hypervolume.add_metric([name], tally.hypervolume)
            front.add_metric([name], self._front_size(tally))
        kept = {t.spec.name for t in shown}
        self._fronts = {k: v for k, v in self._fronts.items() if k in kept}
        return [*self._families(up=1), studies, trials, hypervolume, front]

    def _front_size(self, tally: StudyTally) -> int:
        """Read the study's objective values only when a trial completed since last time."""
        name = tally.spec.name
        finished = tally.trials["complete"] + tally.trials["infeasible"]
        known = self._fronts.get(name)
        if known is not None and known[0] == finished:
            return known[1]
        values = [v for _, v in self._store.complete_values(name)]
        ranks = non_dominated_ranks(values, tally.spec.directions) if values else []
        size = sum(r == 1 for r in ranks)
        self._fronts[name] = (finished, size)
        return size


class _RuntimeCollector(Collector):
    """Counts other parts keep (the tracker, the suggestion pool), read at scrape time."""

    def __init__(self, tracker: Tracker, pool_misses: Callable[[], int] | None) -> None:
        self._tracker = tracker
        self._pool_misses = pool_misses

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "stagetune_tracking_backlog",
            "Tracking events not yet written to MLflow.",
            value=self._tracker.backlog(),
        )
        yield CounterMetricFamily(
            "stagetune_tracking_errors",
            "MLflow calls that failed (logged and dropped; the study store is unaffected).",
            value=self._tracker.errors,
        )
        if self._pool_misses is not None:
            yield CounterMetricFamily(
                "stagetune_suggestion_pool_misses",
                "New trials handed out with no suggestion ready (the acquire waited).",
                value=self._pool_misses(),
            )

    def describe(self) -> Iterable[Metric]:
        return list(self.collect())


class ServerMetrics(TrialEvents):
    """The registry of one server, the trial service's events it counts, the gRPC
    interceptor (``grpc``) and the HTTP endpoint (``serve``, ``close``)."""

    def __init__(
        self,
        store: StudyStore,
        tracker: Tracker,
        *,
        pool_misses: Callable[[], int] | None = None,
        max_studies: int = 200,
    ) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self._acquire = Histogram(
            "stagetune_acquire_seconds",
            "Time to answer a worker's acquire, by outcome (trial, no_work, error).",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        for outcome in get_args(AcquireOutcome):
            self._acquire.labels(outcome)
        self._complete = Histogram(
            "stagetune_complete_seconds",
            "Time to record a completed trial (its front and hypervolume included).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._rungs = Counter(
            "stagetune_rung_decisions",
            "Rung reports answered, by decision (continue, stop).",
            ["decision"],
            registry=registry,
        )
        for decision in ("continue", "stop"):
            self._rungs.labels(decision)
        self._expired = Counter(
            "stagetune_lease_expiries",
            "Attempts failed by the reaper because their lease ran out.",
            registry=registry,
        )
        self._requeued = Counter(
            "stagetune_trial_requeues",
            "Failed attempts whose params were queued again as a new attempt.",
            registry=registry,
        )
        registry.register(StudyCollector(store, max_studies))
        registry.register(_RuntimeCollector(tracker, pool_misses))
        self.grpc = GrpcServerMetrics(registry)
        self._http: WSGIServer | None = None

    # ------------------------------------------------------------ TrialEvents

    def acquired(self, seconds: float, outcome: AcquireOutcome) -> None:
        self._acquire.labels(outcome).observe(seconds)

    def completed(self, seconds: float) -> None:
        self._complete.observe(seconds)

    def rung_decided(self, stop: bool) -> None:
        self._rungs.labels("stop" if stop else "continue").inc()

    def lease_expired(self) -> None:
        self._expired.inc()

    def requeued(self) -> None:
        self._requeued.inc()

    # ------------------------------------------------------------ the endpoint

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) in a daemon thread;
        returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

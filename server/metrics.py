"""Every Prometheus series the server exports, declared once.

Each server instance owns its own CollectorRegistry (not the process-global one), so tests can
run several servers in one process and each /metrics shows only its own server. Names follow
Prometheus conventions: prefix feedloop_, base units (seconds, rows), _total for counters, and no
per-request or per-user labels (label values come from small fixed sets).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS_ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
RATING_BUCKETS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
SWAP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Tallies:
    """Plain counts for ModelAdmin.GetStatus (cheaper to read than the Prometheus series)."""

    generations_served: int = 0
    feedback_accepted: int = 0
    feedback_duplicates: int = 0
    swaps_succeeded: int = 0
    swaps_refused: int = 0


class BatchHistogram(Collector):
    """A histogram over one label with a fixed set of values, observed a batch at a time.

    The feedback writer records every rating of a group commit at once: one lock for the batch
    instead of prometheus_client's per-observation locks and bucket walk, on a thread that
    shares the GIL with the event loop. Exposed exactly like a
    Histogram with that label (_bucket with le, _sum, _count).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        label_values: Sequence[str],
        buckets: Sequence[float],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self._bounds = [float(b) for b in buckets]
        if self._bounds != sorted(self._bounds):
            raise ValueError("buckets must be in increasing order")
        if not self._bounds or self._bounds[-1] != math.inf:
            self._bounds.append(math.inf)
        self._lock = threading.Lock()
        # Per label value: observations per bucket (not cumulative), and their sum.
        self._counts = {value: [0] * len(self._bounds) for value in label_values}
        self._sums = dict.fromkeys(label_values, 0.0)
        registry.register(self)

    def observe_many(self, label_value: str, values: Sequence[float]) -> None:
        bounds = self._bounds
        slots = [bisect.bisect_left(bounds, v) for v in values]  # first bound >= v: its le
        total = math.fsum(values)
        with self._lock:
            counts = self._counts[label_value]
            for i in slots:
                counts[i] += 1
            self._sums[label_value] += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            snapshot = {k: (list(v), self._sums[k]) for k, v in self._counts.items()}
        for value, (counts, total) in snapshot.items():
            cumulative, buckets = 0, []
            for bound, n in zip(self._bounds, counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            # Not add_metric's own _count and _sum: it leaves both out when a bucket bound is
            # negative (an OpenMetrics rule), and these ratings go down to -1.
            family.add_metric([value], buckets, None)
            labels = {self.label: value}
            family.samples.append(Sample(f"{self.name}_count", labels, cumulative))
            family.samples.append(Sample(f"{self.name}_sum", labels, total))
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tallies = Tallies()
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Counter(
            "feedloop_requests",
            "RPCs answered, by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "feedloop_request_duration_seconds",
            "Time from receiving an RPC to answering it",
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "feedloop_batch_queue_wait_seconds",
            "Time a Generate request waited in the batcher before its batch started",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_rows = Histogram(
            "feedloop_batch_rows",
            "Rows (candidates) per batched forward pass",
            buckets=BATCH_BUCKETS_ROWS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "feedloop_batch_duration_seconds",
            "Time of one batched forward pass",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge(
            "feedloop_batch_queue_depth", "Generate requests waiting for the batcher", registry=r
        )
        self.dropped = Counter(
            "feedloop_batch_dropped_requests",
            "Requests dropped before compute, by reason (deadline, cancelled)",
            ["reason"],
            registry=r,
        )
        self.tokens_generated = Counter(
            "feedloop_tokens_generated",
            "Output tokens sampled (end-of-phrase included)",
            registry=r,
        )
        self.generations_served = Counter(
            "feedloop_generations_served", "Candidates returned to clients", registry=r
        )
        self.generations_logged = Counter(
            "feedloop_generations_logged", "Generations committed to the replay store", registry=r
        )
        self.feedback_events = Counter(
            "feedloop_feedback_events",
            "Feedback events by kind and outcome (accepted, duplicate, invalid, not_found, error)",
            ["kind", "outcome"],
            registry=r,
        )
        self.ratings = BatchHistogram(
            "feedloop_feedback_rating_normalised",
            "Accepted ratings normalised to [-1, 1], by whether the rated generation came from "
            "the live version or an earlier one",
            "slot",
            ("live", "previous"),
            RATING_BUCKETS,
            registry=r,
        )
        self.live_version = Gauge(
            "feedloop_live_model_version_number",
            "Number of the live model version (v0003: 3)",
            registry=r,
        )
        self.live_info = Info("feedloop_live_model", "The live model version", registry=r)
        self.loaded_versions = Gauge(
            "feedloop_loaded_model_versions", "Model versions held in memory", registry=r
        )
        self.swaps = Counter(
            "feedloop_model_swaps",
            "Model versions made live (the first load included) or refused, by result",
            ["result"],
            registry=r,
        )
        self.swap_duration = Histogram(
            "feedloop_model_swap_duration_seconds",
            "Load + verify + warm-up time of a new live version",
            buckets=SWAP_BUCKETS_S,
            registry=r,
        )
        self.model_process_restarts = Counter(
            "feedloop_model_process_restarts",
            "Times the model process died and was started again",
            registry=r,
        )
        self.store_write_duration = Histogram(
            "feedloop_store_write_duration_seconds",
            "Time of one group commit to the replay store, by table",
            ["table"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.store_write_errors = Counter(
            "feedloop_store_write_errors", "Failed group commits, by table", ["table"], registry=r
        )
        self.store_buffer_depth = Gauge(
            "feedloop_store_buffer_rows",
            "Rows waiting for their group commit, by table",
            ["table"],
            registry=r,
        )
        self.auth_denied = Counter(
            "feedloop_auth_denied",
            "Calls refused by auth or rate limit, by reason",
            ["reason"],
            registry=r,
        )
        for table in ("generations", "feedback"):
            self.store_buffer_depth.labels(table)
            self.store_write_duration.labels(table)
            self.store_write_errors.labels(table)
        for result in ("succeeded", "refused"):
            self.swaps.labels(result)
        self._http: WSGIServer | None = None

    # -- helpers that keep Tallies and the series in step ----------------------------------------

    def swap_done(self, version: str, duration_s: float) -> None:
        self.swaps.labels("succeeded").inc()
        self.swap_duration.observe(duration_s)
        with self._lock:
            self.tallies.swaps_succeeded += 1

    def swap_refused(self) -> None:
        self.swaps.labels("refused").inc()
        with self._lock:
            self.tallies.swaps_refused += 1

    def set_live(self, version: str) -> None:
        digits = "".join(ch for ch in version if ch.isdigit())
        self.live_version.set(int(digits) if digits else 0)
        self.live_info.info({"version": version})

    def served(self, candidates: int, tokens: int) -> None:
        self.generations_served.inc(candidates)
        self.tokens_generated.inc(tokens)
        with self._lock:
            self.tallies.generations_served += candidates

    def feedback_outcome(self, kind: str, outcome: str, n: int = 1) -> None:
        self.feedback_events.labels(kind, outcome).inc(n)
        if outcome in ("accepted", "duplicate"):
            with self._lock:
                if outcome == "accepted":
                    self.tallies.feedback_accepted += n
                else:
                    self.tallies.feedback_duplicates += n

    # -- the /metrics endpoint -------------------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        """Start /metrics on its own thread; returns the bound port (port 0 picks one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        """Stop /metrics: returns once its thread has seen the request (at most half a second,
        the library's poll interval)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

"""Every Prometheus series the server exports, declared once.

Each server instance owns its own CollectorRegistry (not the process-global one), so tests can
run several servers in one process and each /metrics shows only its own server. Names follow
Prometheus conventions: prefix feedloop_, base units (seconds, rows), _total for counters, and no
per-request or per-user labels (label values come from small fixed sets, or, for model versions,
from the few versions this server has loaded).
"""

from __future__ import annotations

import bisect
import logging
import math
import shutil
import ssl
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from feedloop.core.diversity import RecentDiversity
from feedloop.server.metrics_http import MetricsCredentials, serve_metrics

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
# The server's diversity gauges read this many of the newest policy-served phrases.
DIVERSITY_WINDOW_PHRASES = 1024
# The version label of feedback on generations of versions this server has not loaded.
OTHER_VERSION = "other"


@dataclass
class Tallies:
    """Plain counts for ModelAdmin.GetStatus (cheaper to read than the Prometheus series)."""

    generations_served: int = 0
    feedback_accepted: int = 0
    feedback_duplicates: int = 0
    swaps_succeeded: int = 0
    swaps_refused: int = 0


class VersionFeedback(Collector):
    """Online feedback by the model version that served each generation.

    Two families: `feedloop_feedback_rating_normalised` (a histogram of accepted ratings
    normalised to [-1, 1], label `version`) and `feedloop_feedback_version_wins_total`
    (comparisons won, labels `winner` and `loser`, both versions). Label values stay bounded:
    the versions passed to `track` (those this server has loaded) have series of their own,
    every other version counts under version "other", and a version that is no longer tracked
    loses its series. A version on trial is just one more loaded version.

    The feedback writer records a group commit at once: one lock for the group instead of
    prometheus_client's per-observation locks and bucket walk, on a thread that shares the GIL
    with the event loop.
    """

    RATINGS = "feedloop_feedback_rating_normalised"
    WINS = "feedloop_feedback_version_wins"

    def __init__(
        self, *, registry: CollectorRegistry, buckets: Sequence[float] = RATING_BUCKETS
    ) -> None:
        self._bounds = [float(b) for b in buckets]
        if self._bounds != sorted(self._bounds):
            raise ValueError("buckets must be in increasing order")
        if not self._bounds or self._bounds[-1] != math.inf:
            self._bounds.append(math.inf)
        self._lock = threading.Lock()
        # Per label value: ratings per bucket (not cumulative), and their sum.
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._wins: dict[tuple[str, str], int] = {}
        self.track(())
        registry.register(self)

    def track(self, versions: Collection[str]) -> None:
        """Give these versions series of their own from now on, and drop every other's."""
        labels = [*versions, OTHER_VERSION]
        with self._lock:
            self._counts = {v: self._counts.get(v) or [0] * len(self._bounds) for v in labels}
            self._sums = {v: self._sums.get(v, 0.0) for v in labels}
            # Every pair exists from the start, so that increase() sees the first win.
            self._wins = {
                (winner, loser): self._wins.get((winner, loser), 0)
                for winner in labels
                for loser in labels
                if winner != loser
            }

    def observe(
        self, ratings: Sequence[tuple[str, float]], wins: Sequence[tuple[str, str]]
    ) -> None:
        """Count one group's accepted ratings, (version, normalised rating) each, and its
        comparisons, (winner version, loser version) each."""
        bounds = self._bounds
        slots = [bisect.bisect_left(bounds, value) for _, value in ratings]  # first bound >= v
        with self._lock:
            counts, sums = self._counts, self._sums
            for (version, value), slot in zip(ratings, slots, strict=True):
                label = version if version in counts else OTHER_VERSION
                counts[label][slot] += 1
                sums[label] += value
            for winner, loser in wins:
                pair = (
                    winner if winner in counts else OTHER_VERSION,
                    loser if loser in counts else OTHER_VERSION,
                )
                # A pair on one label (one version, or two untracked ones) compares nothing.
                if pair[0] != pair[1]:
                    self._wins[pair] += 1

    def collect(self) -> Iterator[HistogramMetricFamily | CounterMetricFamily]:
        ratings, wins = self._families()
        with self._lock:
            histograms = {v: (list(c), self._sums[v]) for v, c in self._counts.items()}
            won = dict(self._wins)
        for version, (counts, total) in histograms.items():
            cumulative, buckets = 0, []
            for bound, n in zip(self._bounds, counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            # Not add_metric's own _count and _sum: it leaves both out when a bucket bound is
            # negative (an OpenMetrics rule), and these ratings go down to -1.
            ratings.add_metric([version], buckets, None)
            labels = {"version": version}
            ratings.samples.append(Sample(f"{self.RATINGS}_count", labels, cumulative))
            ratings.samples.append(Sample(f"{self.RATINGS}_sum", labels, total))
        for (winner, loser), n in won.items():
            wins.add_metric([winner, loser], n)
        yield ratings
        yield wins

    def describe(self) -> Iterator[HistogramMetricFamily | CounterMetricFamily]:
        yield from self._families()

    def _families(self) -> tuple[HistogramMetricFamily, CounterMetricFamily]:
        return (
            HistogramMetricFamily(
                self.RATINGS,
                "Accepted ratings normalised to [-1, 1], by the model version that served the "
                'rated generation (versions this server has not loaded: "other")',
                labels=["version"],
            ),
            CounterMetricFamily(
                self.WINS,
                "Accepted comparisons between generations of two model versions, by the "
                "preferred (winner) and the rejected (loser) version",
                labels=["winner", "loser"],
            ),
        )


log = logging.getLogger(__name__)


class StorageUsage(Collector):
    """What the server's data takes on disk and what its disks have left, read when scraped (on
    the /metrics thread, never the event loop): the replay store's and the registry's bytes, and
    each volume's free and total bytes (the data directory, and the store's and the registry's
    directories when they are files on this machine). A source that fails to answer leaves its
    series out of that scrape."""

    def __init__(self) -> None:
        self._store_bytes: Callable[[], int] | None = None
        self._registry_bytes: Callable[[], int] | None = None
        self._volumes: dict[str, Path] = {}

    def watch(
        self,
        store_bytes: Callable[[], int],
        registry_bytes: Callable[[], int],
        volumes: dict[str, Path],
    ) -> None:
        self._store_bytes, self._registry_bytes = store_bytes, registry_bytes
        self._volumes = dict(volumes)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        for family, source in zip(
            families[:2], (self._store_bytes, self._registry_bytes), strict=True
        ):
            if source is not None:
                try:
                    family.add_metric([], float(source()))
                except Exception as exc:  # a scrape must not fail for one source
                    log.warning("%s not measured: %s", family.name, exc)
        free, total = families[2:]
        for volume, path in self._volumes.items():
            try:
                usage = shutil.disk_usage(path)
            except OSError as exc:
                log.warning("disk usage of %s (%s) not measured: %s", volume, path, exc)
                continue
            free.add_metric([volume, str(path)], float(usage.free))
            total.add_metric([volume, str(path)], float(usage.total))
        yield from families

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        volume = ["volume", "path"]
        return (
            GaugeMetricFamily("feedloop_store_bytes", "Bytes the replay store takes on disk"),
            GaugeMetricFamily(
                "feedloop_registry_bytes", "Bytes the model registry's versions take"
            ),
            GaugeMetricFamily(
                "feedloop_disk_free_bytes",
                "Free bytes (for an unprivileged writer) on the volume holding each of the "
                "server's directories",
                labels=volume,
            ),
            GaugeMetricFamily(
                "feedloop_disk_total_bytes", "Size of that volume in bytes", labels=volume
            ),
        )


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # process_* (memory, CPU seconds, open fds) and python_info, as every Prometheus client
        # exports them: a private registry gets them only when asked.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
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
            "Requests dropped because their caller had gone, by reason: deadline, cancelled "
            "(before compute); deadline_after_compute, cancelled_after_compute (the model ran, "
            "but nothing was logged or counted as served)",
            ["reason"],
            registry=r,
        )
        self.nonfinite_logprobs = Counter(
            "feedloop_nonfinite_logprobs",
            "Generations refused (not served, not logged) because a log-probability the model "
            "returned was not finite: an invariant of sampling broke; never expected to fire",
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
        self.version_feedback = VersionFeedback(registry=r)
        self.storage = StorageUsage()
        r.register(self.storage)
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
        self.shadow_scored = Counter(
            "feedloop_shadow_scored_generations",
            "Live generations scored by the version on shadow trial, and stored",
            registry=r,
        )
        self.shadow_dropped = Counter(
            "feedloop_shadow_dropped_generations",
            "Live generations sampled for shadow scoring but not scored, by reason (queue_full, "
            "model_failed, store_failed, shutdown)",
            ["reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "feedloop_rate_limited",
            "Calls refused by their key's rate limit, by method; counted here instead of in "
            "feedloop_requests, where they would read as server errors",
            ["method"],
            registry=r,
        )
        self.auth_denied = Counter(
            "feedloop_auth_denied",
            "Calls refused by auth or rate limit, by reason",
            ["reason"],
            registry=r,
        )
        self.human_eval_verdicts = Counter(
            "feedloop_human_eval_verdicts",
            "Human evaluation verdicts received, by choice (a, b, tie, both_bad) and outcome",
            ["choice", "outcome"],
            registry=r,
        )
        # Set whenever a verdict on the pair is stored or its report is read; only for pairs of
        # versions this replica holds loaded, so the label values stay bounded.
        self.human_eval_win_rate = Gauge(
            "feedloop_human_eval_win_rate",
            "Human evaluation: version_a's win rate over version_b (ties and both-bad count "
            "half), with its Wilson interval bounds (bound: mean, low, high)",
            ["version_a", "version_b", "bound"],
            registry=r,
        )
        self.human_eval_pair_verdicts = Gauge(
            "feedloop_human_eval_pair_verdicts",
            "Human evaluation: verdicts stored on version_a against version_b",
            ["version_a", "version_b"],
            registry=r,
        )
        self.explore_requests = Counter(
            "feedloop_explore_requests",
            "Generate requests by exploration arm: exploration (served with the explore_* "
            "sampling parameters), older_version (explored by an older version at the "
            "request's own parameters), policy (eligible, served as asked), ineligible (they "
            "set sampling parameters or pinned a version)",
            ["arm"],
            registry=r,
        )
        self.explore_share = Gauge(
            "feedloop_explore_share",
            "Configured share of eligible Generate requests explored",
            registry=r,
        )
        for arm in ("exploration", "older_version", "policy", "ineligible"):
            self.explore_requests.labels(arm)
        self.served_diversity = RecentDiversity(DIVERSITY_WINDOW_PHRASES)
        self.served_entropy = Gauge(
            "feedloop_served_sampled_entropy_nats",
            f"Mean -log p(phrase) of the last {DIVERSITY_WINDOW_PHRASES} phrases the policy "
            "served (exploration left out): the entropy of what users are shown",
            registry=r,
        )
        self.served_distinct_share = Gauge(
            "feedloop_served_distinct_phrase_share",
            f"Distinct phrases / phrases among the last {DIVERSITY_WINDOW_PHRASES} the policy "
            "served (exploration left out): falls when the policy collapses onto a few phrases",
            registry=r,
        )
        for table in ("generations", "feedback", "shadow_scores"):
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

    def set_loaded_versions(self, versions: Collection[str]) -> None:
        """The versions held in memory now: each has feedback series of its own."""
        self.loaded_versions.set(len(versions))
        self.version_feedback.track(versions)

    def served(self, candidates: int, tokens: int) -> None:
        self.generations_served.inc(candidates)
        self.tokens_generated.inc(tokens)
        with self._lock:
            self.tallies.generations_served += candidates

    def observe_served_phrases(self, phrases: Sequence[tuple[str, float]]) -> None:
        """(text, sequence log-prob) of phrases the policy served, for the diversity gauges."""
        with self._lock:
            for text, logprob in phrases:
                self.served_diversity.add(text, logprob)
            figures = self.served_diversity.figures()
        self.served_entropy.set(figures.sampled_entropy_nats)
        self.served_distinct_share.set(figures.distinct_phrase_share)

    def feedback_outcome(self, kind: str, outcome: str, n: int = 1) -> None:
        self.feedback_events.labels(kind, outcome).inc(n)
        if outcome in ("accepted", "duplicate"):
            with self._lock:
                if outcome == "accepted":
                    self.tallies.feedback_accepted += n
                else:
                    self.tallies.feedback_duplicates += n

    def human_evaluation(
        self, version_a: str, version_b: str, verdicts: int, rate: float, low: float, high: float
    ) -> None:
        """A pair's latest human evaluation (call only for loaded versions: bounded labels)."""
        for bound, value in (("mean", rate), ("low", low), ("high", high)):
            self.human_eval_win_rate.labels(version_a, version_b, bound).set(value)
        self.human_eval_pair_verdicts.labels(version_a, version_b).set(verdicts)

    # -- the /metrics endpoint -------------------------------------------------------------------

    def serve_http(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        credentials: MetricsCredentials | None = None,
    ) -> int:
        """Start /metrics on its own thread (HTTPS with ssl_context, asking for credentials when
        given); returns the bound port (port 0 picks one)."""
        self._http = serve_metrics(
            self.registry, host, port, ssl_context=ssl_context, credentials=credentials
        )
        return int(self._http.server_port)

    def stop_http(self) -> None:
        """Stop /metrics: returns once its thread has seen the request (at most half a second,
        the library's poll interval)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

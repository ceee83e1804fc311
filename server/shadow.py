"""Shadow scoring: the version on shadow trial scores a sample of live traffic and serves none.

Once the replies of a batch the live version served are on their way, the batcher offers the
batch's generation records here (`offer`); for `share` of those requests (LiveModel's Shadow),
drawn at random, the records join a bounded queue. One thread sends the queue in batches to the
model process, which computes the shadow version's log-probability of every logged output token
under the generation's own sampling parameters (Policy.score, the counterpart of the logged
behaviour log-probabilities, so their difference is the exact log importance ratio), whenever
no batch to sample waits there. The thread then writes the batch's scores to the replay store's
shadow_scores in one transaction.

Nothing here reaches a reply, and serving never waits on it: a request that finds the queue
full is dropped and counted, and so is a batch whose scoring or write fails. Shadow scores are
evidence for a decision, not anyone's data: losing a few costs precision, while retrying would
cost serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout

from feedloop.core.sampling import SamplingParams
from feedloop.core.store.base import SERVED_LIVE, GenerationRecord, ReplayStore, ShadowScore
from feedloop.server.errors import ServiceError
from feedloop.server.live_model import LiveModel
from feedloop.server.metrics import ServerMetrics
from feedloop.server.model_client import ModelProcessClient

log = logging.getLogger("feedloop.server.shadow")

# A score runs only while no sample waits, so under saturating load it may wait a while; past
# this the model process is taken to have lost it (the batcher's stall timeout restarts a hung one).
SCORE_TIMEOUT_S = 60.0


class ShadowScorer:
    def __init__(
        self,
        live_model: LiveModel,
        model_client: ModelProcessClient,
        store: ReplayStore,
        metrics: ServerMetrics,
        *,
        capacity: int,
        batch_max: int,
    ) -> None:
        self.live_model = live_model
        self.model_client = model_client
        self.store = store
        self.metrics = metrics
        self.capacity = capacity
        self.batch_max = batch_max
        self._cond = threading.Condition()
        # One entry per sampled request: (shadow version, its live generations).
        self._queue: deque[tuple[str, list[GenerationRecord]]] = deque()
        self._rows = 0  # generations queued or being scored
        self._stopping = False
        self._depth = metrics.store_buffer_depth.labels("shadow_scores")
        self._duration = metrics.store_write_duration.labels("shadow_scores")
        self._errors = metrics.store_write_errors.labels("shadow_scores")
        self._thread = threading.Thread(target=self._run, name="feedloop-shadow", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Generations waiting for their shadow scores (queued or being scored)."""
        return self._rows

    def offer(self, records: Sequence[GenerationRecord]) -> None:
        """Queue a share of these requests' live generations for scoring (never blocks)."""
        shadow = self.live_model.shadow
        if shadow is None:
            return
        requests: dict[str, list[GenerationRecord]] = {}
        for record in records:
            if record.served_as == SERVED_LIVE:
                requests.setdefault(record.request_id, []).append(record)
        sampled = [generations for generations in requests.values() if shadow.samples()]
        if not sampled:
            return
        version, dropped = shadow.model.version, 0
        with self._cond:
            reason = "shutdown" if self._stopping else "queue_full"
            for generations in sampled:
                if self._stopping or self._rows + len(generations) > self.capacity:
                    dropped += len(generations)
                    continue
                self._queue.append((version, generations))
                self._rows += len(generations)
            self._cond.notify()
            self._depth.set(self._rows)
        if dropped:
            self.metrics.shadow_dropped.labels(reason).inc(dropped)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the batch being scored, drop (and count) what still waits, stop the thread.
        Call before the model process stops, after the batcher has stopped offering."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)

    # -- the scoring thread -----------------------------------------------------------------------

    def _take(self) -> tuple[str, list[GenerationRecord]] | None:
        """The next batch: up to batch_max generations of one shadow version (None: stop)."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                queued = sum(len(generations) for _, generations in self._queue)
                if queued:
                    self.metrics.shadow_dropped.labels("shutdown").inc(queued)
                self._queue.clear()
                self._rows = 0
                self._depth.set(0)
                return None
            version = self._queue[0][0]
            batch: list[GenerationRecord] = []
            while self._queue and self._queue[0][0] == version:
                generations = self._queue[0][1]
                if batch and len(batch) + len(generations) > self.batch_max:
                    break
                self._queue.popleft()
                batch += generations
            return version, batch

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            try:
                self._score(*taken)
            except Exception:  # the thread must outlive any one batch
                log.exception("shadow scoring failed")
                self.metrics.shadow_dropped.labels("model_failed").inc(len(taken[1]))
            with self._cond:
                self._rows -= len(taken[1])
                self._depth.set(self._rows)

    def _score(self, version: str, batch: list[GenerationRecord]) -> None:
        future = self.model_client.score(
            version,
            [r.prompt_ids for r in batch],
            [r.output_ids for r in batch],
            [SamplingParams.from_dict(r.sampling) for r in batch],
        )
        try:
            logprobs, _ = future.result(SCORE_TIMEOUT_S)
        except (ServiceError, FutureTimeout) as exc:
            log.warning(
                "shadow version %s could not score %d generations: %s", version, len(batch), exc
            )
            self.metrics.shadow_dropped.labels("model_failed").inc(len(batch))
            return
        created_at = time.time()
        scores = [
            ShadowScore(record.generation_id, version, token_logprobs, created_at)
            for record, token_logprobs in zip(batch, logprobs, strict=True)
        ]
        started = time.perf_counter()
        try:
            self.store.append_shadow_scores(scores)
        except Exception as exc:  # any store failure: these scores are lost, serving is not
            self._errors.inc()
            log.warning("could not store %d shadow scores of %s: %s", len(scores), version, exc)
            self.metrics.shadow_dropped.labels("store_failed").inc(len(scores))
            return
        self._duration.observe(time.perf_counter() - started)
        self.metrics.shadow_scored.inc(len(scores))

"""The generation log: a group-commit writer of served generations to the replay store.

The batcher hands over every batch's records; one writer thread commits whatever has
accumulated in one `append_generations` transaction, so a slow commit simply makes the next one
bigger. The buffer is bounded: when it holds `capacity` rows, Generate answers UNAVAILABLE
(checked before compute) instead of growing memory. Records stay visible here until committed,
so feedback on a generation still in the buffer is found (`lookup`) and can wait for its commit
(`wait_committed`) before the feedback itself is written. The ids of recently committed
generations are remembered too (bounded), so validating feedback rarely reads the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from feedloop.core.errors import InvalidRecordError
from feedloop.core.store.base import GenerationRecord, ReplayStore, has_finite_logprobs
from feedloop.server.errors import Unavailable
from feedloop.server.metrics import ServerMetrics

log = logging.getLogger("feedloop.server.generation_log")
RETRY_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0)
# Committed generations remembered for feedback validation: about 200 bytes each.
RECENT_CAPACITY = 100_000


class GenerationRef(NamedTuple):
    """What feedback validation needs of a generation."""

    request_id: str
    model_version: str
    client_id: str  # the tenant it was served to
    reply_id: str  # the server-issued reply that carried it ("" for old rows)

    @classmethod
    def of(cls, record: GenerationRecord) -> GenerationRef:
        return cls(record.request_id, record.model_version, record.client_id, record.reply_id)

    @property
    def reply(self) -> str:
        """The reply it came from: the server's id, or for rows stored before replies had
        one, the request id the client chose (the best those rows can say)."""
        return self.reply_id or f"request:{self.request_id}"


class GenerationLog:
    def __init__(
        self, store: ReplayStore, metrics: ServerMetrics, *, capacity: int, batch_max: int
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.capacity = capacity
        self.batch_max = batch_max
        self._cond = threading.Condition()
        self._queue: list[GenerationRecord] = []
        # Every record not yet committed (queued or being written), by generation id.
        self._pending: dict[str, GenerationRecord] = {}
        # Recently committed generations (generations never change once written).
        self._recent: OrderedDict[str, GenerationRef] = OrderedDict()
        self._stopping = False
        # True while the last commit attempt failed (the writer is retrying): waiting for a
        # commit then would only hold the caller until its deadline.
        self._failing = False
        self._depth = metrics.store_buffer_depth.labels("generations")
        self._duration = metrics.store_write_duration.labels("generations")
        self._errors = metrics.store_write_errors.labels("generations")
        self._thread = threading.Thread(
            target=self._run, name="feedloop-generation-log", daemon=True
        )
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._pending)

    def check_room(self) -> None:
        """Raise Unavailable when the buffer is full (the store is not keeping up)."""
        if len(self._pending) >= self.capacity:
            raise Unavailable(
                f"the generation log is full ({self.capacity} rows waiting for the replay "
                f"store); retry later"
            )

    def add(self, records: Sequence[GenerationRecord]) -> None:
        with self._cond:
            for record in records:
                self._pending[record.generation_id] = record
            self._queue.extend(records)
            self._cond.notify_all()
        self._depth.set(len(self._pending))

    def lookup(self, generation_ids: Iterable[str]) -> tuple[dict[str, GenerationRef], set[str]]:
        """What this log knows of these ids, and which of them are not committed yet."""
        found: dict[str, GenerationRef] = {}
        buffered: set[str] = set()
        with self._cond:
            for gid in generation_ids:
                record = self._pending.get(gid)
                if record is not None:
                    found[gid] = GenerationRef.of(record)
                    buffered.add(gid)
                else:
                    ref = self._recent.get(gid)
                    if ref is not None:
                        found[gid] = ref
        return found, buffered

    def wait_committed(self, generation_ids: Iterable[str], timeout_s: float) -> None:
        """Block until none of these generations is still waiting for its commit."""
        ids = list(generation_ids)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while any(gid in self._pending for gid in ids):
                remaining = deadline - time.monotonic()
                if self._failing or remaining <= 0:
                    raise Unavailable(
                        "the generations this names are not stored yet (the replay store is "
                        "failing); retry later"
                    )
                self._cond.wait(remaining)

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything added so far is committed; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stop(self, timeout_s: float) -> None:
        """Commit what is buffered (up to timeout_s), then stop the writer."""
        if not self.flush(timeout_s):
            log.error("%d generations could not be written before shutdown", len(self._pending))
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=max(1.0, timeout_s))

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._queue[: self.batch_max]
                del self._queue[: self.batch_max]
            self._write(batch)
            with self._cond:
                recent = self._recent
                for record in batch:
                    self._pending.pop(record.generation_id, None)
                    recent[record.generation_id] = GenerationRef.of(record)
                while len(recent) > RECENT_CAPACITY:
                    recent.popitem(last=False)
                self._cond.notify_all()
            self._depth.set(len(self._pending))
            self.metrics.generations_logged.inc(len(batch))

    def _write(self, batch: list[GenerationRecord]) -> None:
        """Commit one batch, retrying while the store is unavailable (the buffer keeps it)."""
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                self.store.append_generations(batch)
            except InvalidRecordError as exc:
                # Retrying cannot help a row the store refuses: keep the others. The batcher
                # refuses such rows before they get here, so this is a second line of defence.
                bad = [record for record in batch if not has_finite_logprobs(record)]
                log.error("the store refused %d generations: %s", len(bad), exc)
                self.metrics.nonfinite_logprobs.inc(len(bad))
                batch = [record for record in batch if has_finite_logprobs(record)]
                if not bad:  # a refusal this log does not know how to mend: never loop on it
                    return
                continue
            except Exception as exc:  # any failure keeps the rows buffered
                self._errors.inc()
                with self._cond:
                    self._failing = True
                    self._cond.notify_all()  # waiters fail fast instead of timing out
                if self._stopping:
                    log.error("dropping %d generations at shutdown: %s", len(batch), exc)
                    return
                wait_s = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                log.warning("generation log write failed (retry in %.2fs): %s", wait_s, exc)
                attempt += 1
                time.sleep(wait_s)
                continue
            self._duration.observe(time.perf_counter() - started)
            self._failing = False
            return

"""The dynamic batcher: concurrent Generate calls grouped into batched forward passes.

The event loop appends a job to a bounded queue and awaits its future; ONE dispatcher thread
takes up to max_batch_size rows (a request counts num_candidates rows), waiting at most
max_queue_delay_ms after the oldest job arrived for company, and sends them to the model
process (model_client.py). While a batch computes, new jobs pile up, so under load batches fill
without any waiting at all.

Two batches may be out at once (PIPELINE_DEPTH): one computing, the next already waiting in the
model process's pipe, so the model never idles while this process turns the previous batch into
replies. That finishing work (response protos, generation records, resolving the futures with
a single call into the loop) runs on the model client's reader thread, off the event loop.

Per batch the dispatcher reads the live model and the canary once, and routes each job to one
version: the one it pins, else the canary for the canary's share of jobs (LiveModel's Canary),
else the live one. Jobs are sent as one batch per version, so every batch, and so every reply, is
served by exactly one version, and a swap or a trial's end lands between batches. Jobs whose
deadline passed or that were cancelled are dropped before they are sent; one whose caller left
while the model ran is neither logged nor counted as served (nobody received it, so nobody can
rate it). A request whose samples carry a non-finite log-probability is refused the same way:
the store would refuse the rows, and training would divide by them. Once a batch's replies
are on their way, its records go to the shadow scorer (shadow.py), which scores a share of the
live ones with the version on shadow trial, if there is one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from feedloop.core.policy import SampledOutput, SampleRequest
from feedloop.core.sampling import SamplingParams
from feedloop.core.store.base import (
    SERVED_CANARY,
    SERVED_EXPLORATION,
    SERVED_LIVE,
    SERVED_PINNED,
    GenerationRecord,
    has_finite_logprobs,
)
from feedloop.server.errors import (
    DeadlineExceeded,
    NonFiniteOutput,
    Overloaded,
    ServiceError,
    Unavailable,
)
from feedloop.server.generation_log import GenerationLog
from feedloop.server.live_model import LiveModel, LoadedModel
from feedloop.server.metrics import ServerMetrics
from feedloop.server.model_client import ModelProcessClient
from feedloop.server.replies import generate_reply, new_generation_ids
from feedloop.server.shadow import ShadowScorer
from feedloop.v1 import feedloop_pb2 as pb

log = logging.getLogger("feedloop.server.batcher")

PIPELINE_DEPTH = 2  # sends out at once: one computing, a full one queued behind it
STALL_TIMEOUT_S = 60.0  # every slot held this long: the model process has stopped answering


@dataclass(eq=False, slots=True)
class GenerateJob:
    """One validated Generate request on its way through the batcher."""

    prompt: str
    params: SamplingParams  # seed already resolved (never 0)
    num_candidates: int
    request_id: str
    client_id: str
    pinned_version: str | None
    routing_key: str  # "" for none: a canary split draws at random
    deadline: float | None  # time.monotonic() after which the caller has given up
    return_token_logprobs: bool = False  # the reply's candidates carry per-token log-probs
    end_user: str = ""  # the app's end-user key, stored with each generation ("" for none)
    # Chosen for exploration (params are already the exploration ones): served by live, never
    # by a canary, so a trial's evidence compares the two versions' own policies.
    explore: bool = False
    # The older version chosen to serve this explored request with its own parameters
    # (core/exploration.py); None: live at the exploration parameters.
    explore_version: str | None = None
    future: asyncio.Future[Any] | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    served_as: str = SERVED_LIVE  # set when the dispatcher routes it


class Batcher:
    def __init__(
        self,
        live_model: LiveModel,
        model_client: ModelProcessClient,
        generation_log: GenerationLog,
        shadow_scorer: ShadowScorer,
        metrics: ServerMetrics,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
    ) -> None:
        self.live_model = live_model
        self.model_client = model_client
        self.generation_log = generation_log
        self.shadow_scorer = shadow_scorer
        self.metrics = metrics
        self.max_batch_rows = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self._jobs: collections.deque[GenerateJob] = collections.deque()
        self._rows = 0
        self._last_rows = 0  # rows of the previous batch
        self._cond = threading.Condition()
        self._stopping = False
        self._in_flight = 0  # sends not yet answered by the model process
        self._unfinished = 0  # sends whose replies are not all delivered yet
        self._last_reply_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._jobs)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="feedloop-batcher", daemon=True)
        self._thread.start()

    async def generate(self, job: GenerateJob) -> pb.GenerateResponse:
        """Queue job and wait for its reply (raises ServiceError subclasses)."""
        if self._stopping:
            raise Unavailable("the server is shutting down")
        if len(self._jobs) >= self.max_queue_size:
            raise Overloaded(
                f"the generation queue is full ({self.max_queue_size} requests); retry later"
            )
        assert self._loop is not None
        future = self._loop.create_future()
        job.future = future
        with self._cond:
            self._jobs.append(job)
            self._rows += job.num_candidates
            if len(self._jobs) == 1 or self._rows >= self.max_batch_rows:
                self._cond.notify()  # otherwise the dispatcher waits on a clock or a reply
        try:
            return await future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            job.cancelled = True  # the dispatcher drops it if it has not started it yet
            raise

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish every queued job and deliver every reply, then stop the dispatcher."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        deadline = time.monotonic() + timeout_s
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        with self._cond:
            self._cond.wait_for(
                lambda: self._unfinished == 0, max(0.0, deadline - time.monotonic())
            )

    # -- the dispatcher thread --------------------------------------------------------------------

    def _take_batch(self) -> list[GenerateJob]:
        """The next batch to send ([] once stopping with nothing left)."""
        with self._cond:
            while True:
                if self._stopping and not self._jobs:
                    return []
                busy = self._in_flight > 0
                if self._jobs and not busy:
                    break
                if (
                    self._jobs
                    and self._rows >= self.max_batch_rows
                    and self._in_flight < PIPELINE_DEPTH
                ):
                    break  # a full batch: queue it behind the one computing, no gap between
                # While the model computes, a partial batch sent now would only wait in its
                # queue; gathered here, it takes in whoever arrives until the model is free.
                self._cond.wait(1.0)
                if busy and time.monotonic() - self._last_reply_at > STALL_TIMEOUT_S:
                    self.model_client.kill()  # its sends fail, and answer, when it dies
            close_at = self._jobs[0].enqueued_at + self.max_queue_delay_s
            # Wait for company only when there is concurrency to batch: after a batch of one
            # row (a lone caller), waiting would add max_queue_delay_ms to every request.
            wait = self._last_rows > 1 and self._in_flight == 0
            while wait and self._rows < self.max_batch_rows and not self._stopping:
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[GenerateJob] = []
            rows = 0
            while self._jobs:
                job = self._jobs[0]
                if batch and rows + job.num_candidates > self.max_batch_rows:
                    break
                self._jobs.popleft()
                rows += job.num_candidates
                batch.append(job)
            self._rows -= rows
            self._last_rows = rows
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            self.metrics.queue_depth.set(len(self._jobs))
            try:
                self._dispatch(batch)
            except Exception:
                log.exception("batch failed")
                self._deliver([(job, ServiceError("generation failed")) for job in batch])

    def _replied(self) -> None:
        """A send is answered (or failed): the model process has room again."""
        with self._cond:
            self._in_flight -= 1
            self._last_reply_at = time.monotonic()
            self._cond.notify_all()

    def _delivered(self) -> None:
        """A send's replies are with the event loop (what stop() waits for)."""
        with self._cond:
            self._unfinished -= 1
            self._cond.notify_all()

    def _dispatch(self, batch: list[GenerateJob]) -> None:
        """Send the batch's live jobs, one group per model version; answer the rest now."""
        now = time.monotonic()
        results: list[tuple[GenerateJob, Any]] = []
        live, canary = self.live_model.live, self.live_model.canary
        groups: dict[str, tuple[LoadedModel, list[GenerateJob]]] = {}
        for job in batch:
            gone = _gone(job, now)
            if gone is not None:
                self.metrics.dropped.labels(gone).inc()
                if gone == "deadline":
                    results.append((job, DeadlineExceeded("deadline passed while queued")))
                continue
            self.metrics.queue_wait.observe(now - job.enqueued_at)
            try:
                if job.pinned_version:
                    model: LoadedModel | None = self.live_model.get(job.pinned_version)
                    job.served_as = SERVED_PINNED
                elif job.explore_version is not None:
                    model = self.live_model.loaded(job.explore_version)
                    # Evicted since it was chosen: live serves the request as asked, as policy.
                    job.served_as = SERVED_EXPLORATION if model is not None else SERVED_LIVE
                    model = model or live
                elif job.explore:
                    model, job.served_as = live, SERVED_EXPLORATION
                elif canary is not None and canary.serves(job.routing_key):
                    model, job.served_as = canary.model, SERVED_CANARY
                else:
                    model = live
            except ServiceError as exc:
                results.append((job, exc))
                continue
            if model is None:
                results.append((job, Unavailable("no model is loaded yet")))
                continue
            groups.setdefault(model.version, (model, []))[1].append(job)
        self._deliver(results)
        if not groups:
            return
        with self._cond:
            if not self._in_flight:
                self._last_reply_at = time.monotonic()  # the stall clock starts now
            self._in_flight += len(groups)  # one send per version
            self._unfinished += len(groups)
        for model, jobs in groups.values():
            self._send(model, jobs)

    def _send(self, model: LoadedModel, jobs: list[GenerateJob]) -> None:
        try:
            prompt_ids = [model.encode_prompt(job.prompt) for job in jobs]
            requests = [
                SampleRequest(ids, job.params, job.num_candidates)
                for ids, job in zip(prompt_ids, jobs, strict=True)
            ]
            self.metrics.batch_rows.observe(sum(job.num_candidates for job in jobs))
            future = self.model_client.sample(model.version, requests)
        except Exception:
            log.exception("could not send a batch for model version %s", model.version)
            self._deliver([(job, ServiceError("generation failed")) for job in jobs])
            self._replied()
            self._delivered()
            return
        future.add_done_callback(lambda done: self._finish(model, jobs, prompt_ids, done))

    def _finish(
        self,
        model: LoadedModel,
        jobs: list[GenerateJob],
        prompt_ids: list[list[int]],
        done: Future[Any],
    ) -> None:
        """Runs on the model client's reader thread when the model process has answered."""
        self._replied()  # the next batch may go out while this one is finished here
        records: list[GenerationRecord] = []
        try:
            outputs, compute_s = done.result()
            self.metrics.batch_duration.observe(compute_s)
            results, records = self._replies(model, jobs, prompt_ids, outputs)
        except ServiceError as exc:
            log.warning("generation with model version %s failed: %s", model.version, exc)
            results = [(job, exc) for job in jobs]
        except Exception:  # one version's failure must not fail the other groups
            log.exception("generation with model version %s failed", model.version)
            results = [(job, ServiceError("generation failed")) for job in jobs]
        self._deliver(results)
        # Once the replies are on their way, and before stop() may count them delivered.
        self.shadow_scorer.offer(records)
        self._delivered()

    def _replies(
        self,
        model: LoadedModel,
        jobs: list[GenerateJob],
        prompt_ids: list[list[int]],
        outputs: list[list[SampledOutput]],
    ) -> tuple[list[tuple[GenerateJob, Any]], list[GenerationRecord]]:
        """Each job's reply, once the generation records (returned too) are with the log."""
        created_at = time.time()
        # One draw for every candidate's generation id and every reply's id.
        ids = iter(new_generation_ids(sum(len(samples) for samples in outputs) + len(jobs)))
        records: list[GenerationRecord] = []
        results: list[tuple[GenerateJob, Any]] = []
        now = time.monotonic()
        for job, job_prompt_ids, samples in zip(jobs, prompt_ids, outputs, strict=True):
            generation_ids = [next(ids) for _ in samples]
            reply_id = next(ids)
            gone = _gone(job, now)
            if gone is not None:
                self.metrics.dropped.labels(f"{gone}_after_compute").inc()
                results.append((job, DeadlineExceeded(f"the caller had gone ({gone})")))
                continue
            texts = [model.tokenizer.decode(sample.phrase_ids) for sample in samples]
            job_records = GenerationRecord.from_samples(
                samples,
                generation_ids=generation_ids,
                texts=texts,
                request_id=job.request_id,
                prompt=job.prompt,
                prompt_ids=job_prompt_ids,
                params=job.params,
                model_version=model.version,
                client_id=job.client_id,
                created_at=created_at,
                served_as=job.served_as,
                end_user=job.end_user,
                reply_id=reply_id,
            )
            if not all(map(has_finite_logprobs, job_records)):
                self.metrics.nonfinite_logprobs.inc(len(job_records))
                log.error(
                    "model version %s returned a non-finite log-probability (request %r): "
                    "not served, not logged",
                    model.version,
                    job.request_id[:32],
                )
                results.append((job, NonFiniteOutput("the model returned a non-finite number")))
                continue
            records += job_records
            reply = generate_reply(
                job.request_id,
                model.version,
                job.served_as,
                job.params.seed,
                samples,
                generation_ids=generation_ids,
                texts=texts,
                tokenizer=model.tokenizer,
                token_logprobs=job.return_token_logprobs,
                reply_id=reply_id,
            )
            results.append((job, reply))
        self.metrics.observe_served_phrases(
            [
                (r.text, sum(r.behaviour_logprobs))
                for r in records
                if r.served_as in (SERVED_LIVE, SERVED_CANARY)
            ]
        )
        # Logged before the replies go out: a client can only rate what the log already holds
        # (in its buffer or in the store).
        self.generation_log.add(records)
        self.metrics.served(len(records), sum(len(r.output_ids) for r in records))
        return results, records

    def _deliver(self, results: list[tuple[GenerateJob, Any]]) -> None:
        if results and self._loop is not None:
            # RuntimeError: the loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_resolve, results)


def _gone(job: GenerateJob, now: float) -> str | None:
    """Why job's caller no longer waits for it ("cancelled", "deadline"), or None."""
    if job.cancelled or (job.future is not None and job.future.cancelled()):
        return "cancelled"
    if job.deadline is not None and now >= job.deadline:
        return "deadline"
    return None


def _resolve(results: list[tuple[GenerateJob, Any]]) -> None:
    """Runs on the loop: one call resolves a whole batch's futures."""
    for job, outcome in results:
        future = job.future
        if future is None or future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

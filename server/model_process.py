"""The model process: the server's policies live and sample here, outside the server's GIL.

`feedloop serve` runs the gRPC event loop, the writers and the model in one Python process would
share one interpreter lock: every torch op of a batch hands the lock back and must win it again
from the event loop, so a batch took about twice as long inside the server as alone and the
server never used more than one core. Here the model has its own process and its own lock; the
server sends it batches over a pipe and gets samples back (see model_client.py for that side).

The protocol is tuples over a multiprocessing Connection, every request `(op, call_id, ...)`:

    (LOAD, id, version, checkpoint_dir)  -> (id, OK, (manifest, tokenizer)) or (id, REFUSED, why)
    (SAMPLE, id, version, [SampleRequest]) -> (id, OK, ([[SampledOutput]], seconds))
                                             or (id, NOT_LOADED | FAILED, why)
    (SCORE, id, version, [prompt ids], [output ids], [SamplingParams])
                                          -> (id, OK, ([[log-prob per token]], seconds))
                                             or (id, NOT_LOADED | FAILED, why)
    (EVICT, 0, version)                   -> no reply
    (STOP, 0)                             -> the process exits (as it does when the pipe closes)

Samples are computed in arrival order on the main thread; loads (read, verify every checksum and
tensor, warm up) run on a loader thread, so a swap does not stall the batches being served. A
version is sampled from only after its load has replied OK. Scores (a shadow version's
log-probabilities of outputs served by another) serve no caller waiting for a reply, so they
run on the main thread only while no other message waits in the pipe: a batch to sample never
queues behind them for longer than the one score in progress.

A LoRA adapter (core/hf_lora.py) is loaded over a resident base: the process keeps each Hugging
Face base it has loaded (`bases`, by content digest: a full version it served, or the base an
adapter named) while a loaded version uses it, and an adapter's policy shares that base's
tensors, so a swap to an adapter reads, verifies and loads only the adapter's few MB; the base
stays where it is. An eviction that leaves a base unused drops it (a replica that moved to
another base over months does not keep every old one in memory).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.errors import CheckpointError
from feedloop.core.policy import Policy, SampleRequest
from feedloop.core.sampling import SamplingParams

LOAD, SAMPLE, SCORE, EVICT, STOP = "load", "sample", "score", "evict", "stop"
OK, REFUSED, NOT_LOADED, FAILED = "ok", "refused", "not-loaded", "failed"

log = logging.getLogger("feedloop.server.model_process")


def warm_up(policy: Policy) -> None:
    """One small sample call: the first pass allocates, so users never pay for it."""
    prompt = policy.encode_prompt("warm up")
    policy.sample([SampleRequest(prompt, SamplingParams(max_tokens=4, seed=1), 2)])


class _Models:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.policies: dict[str, Policy] = {}  # written by the loader, read by the main thread
        self.bases: dict[str, Any] = {}  # LoRA bases by digest; the loader's alone
        self._send_lock = threading.Lock()

    def reply(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    def load(self, call_id: int, version: str, directory: str) -> None:
        try:
            policy, manifest = load_checkpoint(Path(directory), bases=self.bases)
            warm_up(policy)
        except (CheckpointError, ValueError, RuntimeError, OSError) as exc:
            self.reply((call_id, REFUSED, str(exc)))
            return
        except Exception as exc:  # never leave the server waiting for an answer
            self.reply((call_id, REFUSED, f"{type(exc).__name__}: {exc}"))
            return
        self.policies[version] = policy
        self.reply((call_id, OK, (manifest, policy.tokenizer)))

    def drop_unused_bases(self) -> None:
        """Forget the bases no loaded version uses (after an eviction): an adapter names its
        base by digest, a full version holds the base's model itself. Runs on the loader thread,
        which alone touches `bases`, so no load is between reading and extending it."""
        loaded = list(self.policies.values())
        for digest, base in list(self.bases.items()):
            model = base.model
            if not any(
                getattr(p, "base_digest", None) == digest or getattr(p, "model", None) is model
                for p in loaded
            ):
                del self.bases[digest]

    def sample(self, call_id: int, version: str, requests: list[SampleRequest]) -> None:
        self._compute(call_id, version, "sampling", lambda policy: policy.sample(requests))

    def score(
        self,
        call_id: int,
        version: str,
        prompts: list[list[int]],
        outputs: list[list[int]],
        params: list[SamplingParams],
    ) -> None:
        self._compute(
            call_id, version, "scoring", lambda policy: policy.score(prompts, outputs, params)
        )

    def _compute(
        self, call_id: int, version: str, action: str, work: Callable[[Policy], Any]
    ) -> None:
        """Reply with work's result on a loaded version and the seconds it took."""
        policy = self.policies.get(version)
        if policy is None:
            self.reply((call_id, NOT_LOADED, f"model version {version} is not loaded"))
            return
        started = time.perf_counter()
        try:
            result = work(policy)
        except Exception as exc:
            log.exception("%s with %s failed", action, version)
            self.reply((call_id, FAILED, f"{type(exc).__name__}: {exc}"))
            return
        self.reply((call_id, OK, (result, time.perf_counter() - started)))


def serve_models(conn: Connection, torch_threads: int) -> None:
    """The model process's main loop; returns (the process exits) on STOP or when the pipe closes.

    The server owns this process's lifetime. A Ctrl-C or a SIGTERM sent to the whole process
    group is the server's to act on: it drains, and closes the pipe only once the batches in
    flight are answered. If the server dies, the pipe closes and this process ends with it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(torch_threads)
    models = _Models(conn)
    loader = ThreadPoolExecutor(1, thread_name_prefix="feedloop-model-load")
    scores: deque[tuple[Any, ...]] = deque()  # SCORE calls not yet computed
    try:
        while True:
            try:
                if scores and not conn.poll():
                    models.score(*scores.popleft())
                    continue
                message = conn.recv()
            except (EOFError, OSError):
                return
            op = message[0]
            if op == SAMPLE:
                models.sample(*message[1:])
            elif op == SCORE:
                scores.append(message[1:])
            elif op == LOAD:
                loader.submit(models.load, *message[1:])
            elif op == EVICT:
                models.policies.pop(message[2], None)
                if models.bases:
                    loader.submit(models.drop_unused_bases)
            elif op == STOP:
                while scores:  # answer what was sent, as STOP promises
                    models.score(*scores.popleft())
                return
    finally:
        loader.shutdown(wait=False, cancel_futures=True)

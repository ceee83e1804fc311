"""The server's handle on its model process: load versions, sample batches, survive a crash.

Calls go out as messages on one pipe (model_process.py has the protocol) and come back as
concurrent.futures.Future results, resolved by a reader thread. Done-callbacks therefore run on
that thread: the batcher finishes a batch there (replies, generation log) while the model
process already computes the next one.

If the model process dies (killed, out of memory), every call in flight fails with UNAVAILABLE,
the death is counted and logged, and a new process is started at once (no more often than once
per RESTART_INTERVAL_S) and given back every version it held, so the server heals by itself.

The process is started from a fork server that has already imported torch and the policy code:
the first start costs an interpreter and the imports (a second or two), later ones a fork.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from feedloop.core.checkpoint import Manifest
from feedloop.core.errors import CheckpointError
from feedloop.core.policy import SampledOutput, SampleRequest
from feedloop.core.sampling import SamplingParams
from feedloop.core.tokenizer import Tokenizer
from feedloop.server import model_process
from feedloop.server.errors import ServiceError, Unavailable
from feedloop.server.metrics import ServerMetrics

log = logging.getLogger("feedloop.server.model_client")

RESTART_INTERVAL_S = 1.0
LOAD_TIMEOUT_S = 120.0  # reading, verifying and warming up a checkpoint


def _context() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["feedloop.server.model_process"])
    return context


class ModelProcessClient:
    def __init__(self, metrics: ServerMetrics, *, torch_threads: int) -> None:
        self.metrics = metrics
        self.torch_threads = torch_threads
        self._context = _context()
        self._lock = threading.Lock()  # guards everything below; sends happen under it
        self._conn: Connection | None = None
        self._process: Any = None
        self._incarnation = 0
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
        self._held: OrderedDict[str, Path] = OrderedDict()  # versions loaded, to restore
        self._stopping = False
        self._last_start = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the model process (blocking: the first start imports torch over there)."""
        self._spawn()

    def _spawn(self) -> None:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=model_process.serve_models,
            args=(child_conn, self.torch_threads),
            name="feedloop-model",
            daemon=True,
        )
        self._last_start = time.monotonic()
        process.start()
        child_conn.close()
        with self._lock:
            if self._stopping:  # stop() came while a crashed process was being replaced
                parent_conn.close()  # the new process sees the pipe close and exits
                return
            self._incarnation += 1
            self._conn, self._process = parent_conn, process
            incarnation = self._incarnation
        threading.Thread(
            target=self._read,
            args=(parent_conn, incarnation),
            name="feedloop-model-reader",
            daemon=True,
        ).start()
        log.info("model process %d started", process.pid)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the model process to exit once it has answered what it was sent; wait for it."""
        with self._lock:
            self._stopping = True
            conn, process = self._conn, self._process
            if conn is not None:
                with contextlib.suppress(OSError):  # already gone
                    conn.send((model_process.STOP, 0))
        if process is not None:
            process.join(timeout_s)
            if process.is_alive():
                log.error("model process %d did not exit; killing it", process.pid)
                process.kill()
                process.join(5.0)
        if conn is not None:
            conn.close()

    def kill(self) -> None:
        """Kill the model process (it is restarted): for a process that stopped answering."""
        process = self._process
        if process is not None and process.is_alive():
            log.error("killing the model process %d: a batch got no answer", process.pid)
            process.kill()

    # -- calls -------------------------------------------------------------------------------

    def _call(self, op: str, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            conn = self._conn
            if conn is None:
                future.set_exception(Unavailable("the model process is restarting; retry"))
                return future
            call_id = next(self._ids)
            self._pending[call_id] = future
            try:
                conn.send((op, call_id, *args))
            except OSError:
                del self._pending[call_id]
                future.set_exception(Unavailable("the model process is restarting; retry"))
        return future

    def sample(
        self, version: str, requests: list[SampleRequest]
    ) -> Future[list[list[SampledOutput]]]:
        """Sample a batch with one version; the future raises ServiceError on failure."""
        return self._call(model_process.SAMPLE, version, requests)

    def score(
        self,
        version: str,
        prompts: list[list[int]],
        outputs: list[list[int]],
        params: list[SamplingParams],
    ) -> Future[tuple[list[list[float]], float]]:
        """Per-token log-probabilities of outputs under one version, each with its sampling
        params (Policy.score), and the seconds it took; computed when no sample waits.
        The future raises ServiceError on failure."""
        return self._call(model_process.SCORE, version, prompts, outputs, params)

    def load(self, version: str, directory: Path) -> tuple[Manifest, Tokenizer]:
        """Load, verify and warm up a version over there (blocking).

        Raises CheckpointError if the checkpoint is refused, ServiceError if the process failed.
        """
        future = self._call(model_process.LOAD, version, str(directory))
        try:
            manifest, tokenizer = future.result(LOAD_TIMEOUT_S)
        except FutureTimeout:
            with self._lock:  # no answer will come for it any more
                self._pending = {k: f for k, f in self._pending.items() if f is not future}
            raise Unavailable(f"loading {version} took over {LOAD_TIMEOUT_S:.0f} s") from None
        with self._lock:
            self._held[version] = Path(directory)
            self._held.move_to_end(version)
        return manifest, tokenizer

    def evict(self, version: str) -> None:
        with self._lock:
            self._held.pop(version, None)
            if self._conn is not None:
                with contextlib.suppress(OSError):  # gone; its successor will not hold it
                    self._conn.send((model_process.EVICT, 0, version))

    # -- answers -----------------------------------------------------------------------------

    def _read(self, conn: Connection, incarnation: int) -> None:
        while True:
            try:
                call_id, status, payload = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._pending.pop(call_id, None)
            if future is None:
                continue
            if status == model_process.OK:
                future.set_result(payload)
            elif status == model_process.REFUSED:
                future.set_exception(CheckpointError(payload))
            elif status == model_process.NOT_LOADED:
                future.set_exception(Unavailable(f"{payload} in the model process; retry"))
            else:
                future.set_exception(ServiceError(f"generation failed: {payload}"))
        self._lost(incarnation)

    def _lost(self, incarnation: int) -> None:
        """The pipe closed: the process exited. Fail what it held; restart unless stopping."""
        with self._lock:
            if incarnation != self._incarnation:
                return
            pending, self._pending = self._pending, {}
            self._conn = None
            stopping = self._stopping
            process = self._process
        for future in pending.values():
            future.set_exception(Unavailable("the model process exited; retry"))
        if stopping:
            return
        if process is not None:
            process.join(1.0)
        log.error(
            "the model process exited (code %s) with %d calls in flight; restarting it",
            getattr(process, "exitcode", None),
            len(pending),
        )
        self.metrics.model_process_restarts.inc()
        wait_s = self._last_start + RESTART_INTERVAL_S - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)
        self._spawn()
        with self._lock:
            held = list(reversed(self._held.items()))  # newest (the live one) first
        for version, directory in held:
            try:
                self.load(version, directory)
            except CheckpointError as exc:  # the files went bad since: never servable again
                log.error("could not reload %s into the new model process: %s", version, exc)
                with self._lock:
                    self._held.pop(version, None)
            except ServiceError as exc:  # this process died too: its successor reloads all
                log.error("reloading %s was interrupted: %s", version, exc)
                return

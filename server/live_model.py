"""The live model and its hot swap: load, verify and warm up off the event loop, then swap.

A background thread watches the registry's live pointer. A new live version is loaded in the
model process (model_client.py) with `load_checkpoint` (which verifies checksums, shapes,
vocabulary and finite weights) and warmed up with one sample call there; only then is it
published to the batcher here by replacing one reference. The
batcher reads that reference once per batch, so a swap lands between batches and each batch is
served by exactly one version. A checkpoint that fails verification is refused, counted, logged
and recorded in the registry history; the old version keeps serving. The last `keep_versions`
versions stay loaded so that requests pinned to a recent version can still be served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from feedloop.core.checkpoint import Manifest
from feedloop.core.errors import CheckpointError, RegistryError
from feedloop.core.policy import nonempty_prompt
from feedloop.core.registry import REFUSED, Decision, LivePointer, ModelRegistry
from feedloop.core.tokenizer import Tokenizer
from feedloop.server.errors import NotFound, ServiceError
from feedloop.server.metrics import ServerMetrics
from feedloop.server.model_client import ModelProcessClient

log = logging.getLogger("feedloop.server.live_model")

# How long one wait_for_change call blocks. PostgreSQL wakes it at once by NOTIFY and a
# directory registry polls inside it, so this only bounds how often the watch loop turns.
WATCH_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class LoadedModel:
    """A version loaded in the model process, as this process knows it."""

    version: str
    tokenizer: Tokenizer
    manifest: Manifest
    loaded_at: float  # Unix seconds

    def encode_prompt(self, prompt: str) -> list[int]:
        return nonempty_prompt(self.tokenizer.encode(prompt))


class LiveModel:
    def __init__(
        self,
        registry: ModelRegistry,
        model_client: ModelProcessClient,
        metrics: ServerMetrics,
        *,
        keep_versions: int,
    ) -> None:
        self.registry = registry
        self.model_client = model_client
        self.metrics = metrics
        self.keep_versions = keep_versions
        self._lock = threading.Lock()  # guards _loaded; _live is swapped by one assignment
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._live: LoadedModel | None = None
        self._seen: str | None = None  # last live version acted on (loaded or refused)
        self._pointer: LivePointer | None = None  # the registry's pointer as last read
        self._stop = threading.Event()
        self._swap_lock = threading.Lock()  # held by the watcher while it swaps
        self._thread: threading.Thread | None = None

    # -- reading (any thread) ------------------------------------------------------------------

    @property
    def live(self) -> LoadedModel | None:
        return self._live

    def get(self, version: str) -> LoadedModel:
        """A loaded version, for a pinned request; NotFound names what is loaded."""
        model = self._loaded.get(version)
        if model is None:
            raise NotFound(
                f"model_version {version!r} is not loaded on this server "
                f"(loaded: {', '.join(self.loaded_versions()) or 'none'})"
            )
        return model

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    # -- swapping (background thread; blocking) ------------------------------------------------

    def swap_to(self, version: str) -> bool:
        """Load, verify and warm up `version`, then make it live. False if it was refused."""
        previous, self._seen = self._seen, version
        started = time.perf_counter()
        with self._lock:
            model = self._loaded.get(version)
        if model is None:
            try:
                manifest, tokenizer = self.model_client.load(
                    version, self.registry.checkpoint_dir(version)
                )
            except (CheckpointError, RegistryError) as exc:
                self._refuse(version, exc)
                return False
            except ServiceError as exc:  # the model process failed, not the checkpoint
                if self._live is None:
                    raise  # at start-up: nothing to fall back on, the server cannot start
                log.error("could not load model version %s, will retry: %s", version, exc)
                self._seen = previous
                return False
            model = LoadedModel(version, tokenizer, manifest, time.time())
        with self._lock:
            self._loaded[version] = model
            self._loaded.move_to_end(version)
            evicted = []
            while len(self._loaded) > self.keep_versions:
                evicted.append(self._loaded.popitem(last=False)[0])  # the live one is newest
            self._live = model
            loaded = len(self._loaded)
        for old in evicted:
            self.model_client.evict(old)
        self.metrics.swap_done(version, time.perf_counter() - started)
        self.metrics.set_live(version)
        self.metrics.loaded_versions.set(loaded)
        log.info("serving model version %s", version)
        return True

    def _refuse(self, version: str, exc: BaseException) -> None:
        self.metrics.swap_refused()
        serving = self._live.version if self._live else "none"
        log.error("refused model version %s (still serving %s): %s", version, serving, exc)
        try:
            self.registry.record(
                Decision(version, REFUSED, f"server refused to load: {exc}", {"serving": serving})
            )
        except (RegistryError, OSError) as record_exc:
            log.error("could not record the refusal of %s: %s", version, record_exc)

    def load_initial(self) -> LoadedModel:
        """Load the registry's live version at start-up.

        If it fails verification (refused and recorded), fall back along the live pointer's
        rollback stack, newest first: one bad publication plus a restart must not take every
        replica down. Raises when no version there can be served.
        """
        pointer = self.registry.pointer()
        if pointer.live is None:
            raise RegistryError("the registry has no live version")
        for version in dict.fromkeys([pointer.live, *reversed(pointer.previous)]):
            if self.swap_to(version):
                if version != pointer.live:
                    log.error(
                        "the live version %s was refused; serving the last good version %s",
                        pointer.live,
                        version,
                    )
                self._seen = pointer.live  # the watcher waits for the pointer to move on
                assert self._live is not None
                return self._live
        raise CheckpointError(
            f"the live version {pointer.live} and every earlier live version failed "
            f"verification (see log)"
        )

    def start_watching(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="feedloop-swap", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self._pointer = self.registry.wait_for_change(self._pointer, WATCH_TIMEOUT_S)
            except Exception as exc:  # a backend error must not end the watch
                if self._stop.is_set():
                    return  # the registry was closed under us at shutdown
                log.warning("registry watch failed, retrying: %s", exc)
                self._stop.wait(1.0)
                continue
            with self._swap_lock:
                if self._stop.is_set():
                    return
                version = self._pointer.live
                if version is not None and version != self._seen:
                    self.swap_to(version)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop watching; waits for a swap in progress, not for the watch call (a daemon)."""
        self._stop.set()
        if self._swap_lock.acquire(timeout=timeout_s):
            self._swap_lock.release()

"""The live model, the canary beside it, and their hot swap: load, verify and warm up off the
event loop, then swap.

A background thread watches the registry's live pointer. A new live version is loaded in the
model process (model_client.py) with `load_checkpoint` (which verifies checksums, shapes,
vocabulary and finite weights) and warmed up with one sample call there; only then is it
published to the batcher here by replacing one reference. The
batcher reads that reference once per batch, so a swap lands between batches and each batch is
served by exactly one version. A checkpoint that fails verification is refused, counted, logged
and recorded in the registry history; the old version keeps serving. The last `keep_versions`
versions stay loaded so that requests pinned to a recent version can still be served.

A canary trial's version is loaded and warmed up the same way and published beside the live one
(`canary`, one reference too); the batcher routes its share of the unpinned requests to it. When
the trial ends the reference is cleared, and requests already routed to it are still served by
it: it stays loaded like any recent version. A shadow trial serves nothing and loads nothing here.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from feedloop.core.checkpoint import Manifest
from feedloop.core.errors import CheckpointError, RegistryError
from feedloop.core.policy import nonempty_prompt
from feedloop.core.registry import CANARY, REFUSED, Decision, LivePointer, ModelRegistry, Trial
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


@dataclass(frozen=True)
class Canary:
    """The version on canary trial, loaded, and the share of unpinned requests it serves."""

    model: LoadedModel
    share: float

    def serves(self, routing_key: str) -> bool:
        """Whether this request goes to the canary: by a stable hash of its routing key (the same
        key lands on the same side for the whole trial; the version salts the hash, so the same
        users are not every trial's canaries), or at random without a key."""
        if not routing_key:
            return random.random() < self.share
        salted = f"{self.model.version}\0{routing_key}".encode()
        draw = int.from_bytes(hashlib.blake2b(salted, digest_size=8).digest(), "big")
        return draw < self.share * 2**64


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
        self._lock = threading.Lock()  # guards _loaded; _live and _canary: one assignment each
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._live: LoadedModel | None = None
        self._canary: Canary | None = None
        self._refused_trial: str | None = None  # a trial version that failed to load, once
        self._seen: str | None = None  # last live version acted on (loaded or refused)
        self._pointer: LivePointer | None = None  # the registry's pointer as last read
        self._stop = threading.Event()
        self._swap_lock = threading.Lock()  # held by the watcher while it swaps
        self._thread: threading.Thread | None = None

    # -- reading (any thread) ------------------------------------------------------------------

    @property
    def live(self) -> LoadedModel | None:
        return self._live

    @property
    def canary(self) -> Canary | None:
        return self._canary

    @property
    def pointer(self) -> LivePointer | None:
        """The registry's pointer as the watcher last read it (None before its first read)."""
        return self._pointer

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

    def _load(self, version: str) -> LoadedModel | None:
        """The version loaded (verified, warmed up) in the model process; None if refused.
        Raises ServiceError when the model process failed rather than the checkpoint."""
        with self._lock:
            model = self._loaded.get(version)
        if model is not None:
            return model
        try:
            manifest, tokenizer = self.model_client.load(
                version, self.registry.checkpoint_dir(version)
            )
        except (CheckpointError, RegistryError) as exc:
            self._refuse(version, exc)
            return None
        return LoadedModel(version, tokenizer, manifest, time.time())

    def _hold(self, model: LoadedModel) -> None:
        """Keep model as the most recently used and evict the oldest beyond keep_versions, never
        the live version or the canary (call after publishing model as either)."""
        with self._lock:
            self._loaded[model.version] = model
            self._loaded.move_to_end(model.version)
            serving = {model.version, *(m.version for m in self._serving())}
            evicted = []
            for version in list(self._loaded):
                if len(self._loaded) <= self.keep_versions:
                    break
                if version not in serving:
                    del self._loaded[version]
                    evicted.append(version)
            loaded = list(self._loaded)
        for old in evicted:
            self.model_client.evict(old)
        self.metrics.set_loaded_versions(loaded)

    def _serving(self) -> list[LoadedModel]:
        canary = self._canary
        return [m for m in (self._live, canary.model if canary else None) if m is not None]

    def swap_to(self, version: str) -> bool:
        """Load, verify and warm up `version`, then make it live. False if it was refused."""
        previous, self._seen = self._seen, version
        started = time.perf_counter()
        try:
            model = self._load(version)
        except ServiceError as exc:  # the model process failed, not the checkpoint
            if self._live is None:
                raise  # at start-up: nothing to fall back on, the server cannot start
            log.error("could not load model version %s, will retry: %s", version, exc)
            self._seen = previous
            return False
        if model is None:
            return False
        self._live = model
        self._hold(model)
        self.metrics.swap_done(version, time.perf_counter() - started)
        self.metrics.set_live(version)
        log.info("serving model version %s", version)
        return True

    def follow_trial(self, trial: Trial | None) -> None:
        """Serve the registry's canary trial beside the live version, or stop serving one."""
        if trial is None or trial.mode != CANARY or trial.version == self._seen:
            self._canary = None
            return
        current = self._canary
        if current is not None and current.model.version == trial.version:
            if current.share != trial.share:
                self._canary = Canary(current.model, trial.share)
            return
        if trial.version == self._refused_trial:
            return
        try:
            model = self._load(trial.version)
        except ServiceError as exc:
            log.error("could not load canary version %s, will retry: %s", trial.version, exc)
            return
        if model is None:
            self._refused_trial = trial.version
            self._canary = None
            return
        self._canary = Canary(model, trial.share)
        self._hold(model)
        log.info("serving model version %s as canary, share %g", model.version, trial.share)

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
                self.follow_trial(self._pointer.trial)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop watching; waits for a swap in progress, not for the watch call (a daemon)."""
        self._stop.set()
        if self._swap_lock.acquire(timeout=timeout_s):
            self._swap_lock.release()

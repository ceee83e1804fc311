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

A trial's version is loaded and warmed up the same way and published beside the live one (one
reference too): a canary (`canary`), to which the batcher routes its share of the unpinned
requests, or a shadow (`shadow`), which serves nothing and scores its share of the live
requests (shadow.py). When the trial ends the reference is cleared; work already routed to the
version still completes with it: it stays loaded like any recent version.

The older versions that serve a part of the exploration share (feedloop.core.exploration: the
root of live's lineage and the latest earlier live versions) are loaded and warmed up the same
way whenever the pointer moves, held beside live (never evicted while they explore), and
published as one tuple that the Generation service reads for each explored request, in turn.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from feedloop.core.checkpoint import Manifest
from feedloop.core.errors import CheckpointError, RegistryError
from feedloop.core.exploration import exploration_versions
from feedloop.core.policy import nonempty_prompt
from feedloop.core.registry import CANARY, REFUSED, Decision, LivePointer, ModelRegistry, Trial
from feedloop.core.tokenizer import Tokenizer
from feedloop.server.errors import (
    MODEL_VERSION,
    FailedPrecondition,
    NotFound,
    ServiceError,
    quote,
)
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
        return nonempty_prompt(self.tokenizer.encode_prompt(prompt))


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


@dataclass(frozen=True)
class Shadow:
    """The version on shadow trial, loaded, and the share of live requests it scores."""

    model: LoadedModel
    share: float

    def samples(self) -> bool:
        """Whether to score this request: at random (no user sees the result, so nothing needs
        to stick to a key)."""
        return random.random() < self.share


class LiveModel:
    def __init__(
        self,
        registry: ModelRegistry,
        model_client: ModelProcessClient,
        metrics: ServerMetrics,
        *,
        keep_versions: int,
        explore_versions: int = 0,
    ) -> None:
        self.registry = registry
        self.model_client = model_client
        self.metrics = metrics
        self.keep_versions = keep_versions
        self.explore_versions = explore_versions  # older versions held to explore with
        self._explorers: tuple[LoadedModel, ...] = ()
        self._explorers_for: tuple[object, ...] | None = None  # the pointer they were chosen for
        self._explorer_turn = itertools.count()
        # Guards _loaded; _live, _canary and _shadow change by one assignment each.
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._live: LoadedModel | None = None
        self._canary: Canary | None = None
        self._shadow: Shadow | None = None
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
    def shadow(self) -> Shadow | None:
        return self._shadow

    @property
    def explorers(self) -> tuple[LoadedModel, ...]:
        """The older versions held to serve the version part of the exploration share."""
        return self._explorers

    def next_explorer(self) -> LoadedModel | None:
        """The older version whose turn it is to serve an explored request (None: none held)."""
        explorers = self._explorers
        if not explorers:
            return None
        return explorers[next(self._explorer_turn) % len(explorers)]

    def loaded(self, version: str) -> LoadedModel | None:
        """A loaded version, or None (it may have been evicted since it was chosen)."""
        return self._loaded.get(version)

    @property
    def pointer(self) -> LivePointer | None:
        """The registry's pointer as the watcher last read it (None before its first read)."""
        return self._pointer

    def get(self, version: str) -> LoadedModel:
        """A loaded version, for a pinned request; NotFound names what is loaded.
        FailedPrecondition for the version on shadow trial: nothing it generates reaches a user."""
        shadow = self._shadow
        if shadow is not None and shadow.model.version == version:
            raise FailedPrecondition(
                f"model_version {quote(version)} is on shadow trial: it scores traffic and "
                "serves none"
            )
        model = self._loaded.get(version)
        if model is None:
            raise NotFound(
                f"model_version {quote(version)} is not loaded on this server "
                f"(loaded: {', '.join(self.loaded_versions()) or 'none'})",
                field="model_version",
                resource=(MODEL_VERSION, version),
            )
        return model

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def servable(self) -> list[LoadedModel]:
        """The loaded versions a request may be served by (all but the one on shadow trial)."""
        shadow = self._shadow
        with self._lock:
            models = list(self._loaded.values())
        return [m for m in models if shadow is None or m.version != shadow.model.version]

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
        the live version or the trial's (call after publishing model as either)."""
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
        trial = self._canary or self._shadow
        serving = [m for m in (self._live, trial.model if trial else None) if m is not None]
        return serving + list(self._explorers)

    def swap_to(self, version: str) -> bool:
        """Load, verify and warm up `version`, then make it live. False if it was refused."""
        previous, self._seen = self._seen, version
        started = time.perf_counter()
        try:
            model = self._load(version)
        except ServiceError as exc:  # the model process failed, not the checkpoint
            if self._live is None:
                raise  # at start-up: nothing to fall back on, the server cannot start
            log.error(
                "could not load model version %s, will retry: %s",
                version,
                exc,
                extra={"version": version},
            )
            self._seen = previous
            return False
        if model is None:
            return False
        self._live = model
        self._hold(model)
        self.metrics.swap_done(version, time.perf_counter() - started)
        self.metrics.set_live(version)
        log.info("serving model version %s", version, extra={"version": version})
        return True

    def follow_trial(self, trial: Trial | None) -> None:
        """Load the registry's trial version and serve it as a canary or score with it in
        shadow beside the live version, or stop when there is no trial."""
        if trial is None or trial.version == self._seen:
            self._canary = self._shadow = None
            return
        current = self._canary or self._shadow
        held = current is not None and current.model.version == trial.version
        if current is not None and held:
            model = current.model
        elif trial.version == self._refused_trial:
            return
        else:
            try:
                loaded = self._load(trial.version)
            except ServiceError as exc:
                log.error("could not load trial version %s, will retry: %s", trial.version, exc)
                return
            if loaded is None:
                self._refused_trial = trial.version
                self._canary = self._shadow = None
                return
            model = loaded
        if trial.mode == CANARY:
            self._canary, self._shadow = Canary(model, trial.share), None
        else:
            self._shadow, self._canary = Shadow(model, trial.share), None
        if not held:
            self._hold(model)
            log.info(
                "model version %s on %s trial, share %g", model.version, trial.mode, trial.share
            )

    def follow_exploration(self, pointer: LivePointer) -> None:
        """Load the older versions that explore for this pointer (core.exploration's choice)
        and hold them; nothing when the pointer's live, stack and trial are as last time."""
        key = (pointer.live, pointer.previous, pointer.trial.version if pointer.trial else None)
        if self.explore_versions <= 0 or pointer.live is None or key == self._explorers_for:
            return
        try:
            wanted = exploration_versions(
                pointer.live,
                pointer.previous,
                self.registry.lineage_root(pointer.live),
                self.registry.versions(),
                self.explore_versions,
                exclude=[key[2]] if key[2] else [],
            )
        except RegistryError as exc:
            log.warning("could not choose the versions to explore with, will retry: %s", exc)
            return
        models = []
        for version in wanted:
            try:
                model = self._load(version)
            except ServiceError as exc:
                log.error("could not load %s to explore with, will retry: %s", version, exc)
                return
            if model is not None:
                models.append(model)
        self._explorers, self._explorers_for = tuple(models), key
        for model in models:
            self._hold(model)
        if models:
            log.info("exploring with %s", ", ".join(m.version for m in models))

    def load_version(self, version: str) -> list[str]:
        """Load a published version beside the live one for requests that name it (an operator's
        ModelAdmin.LoadVersion; blocking); the versions loaded after. FailedPrecondition when
        its checkpoint is refused (recorded like any refusal); the registry's errors else."""
        self.registry.manifest(version)  # UnknownVersionError (NOT_FOUND) before any loading
        model = self._load(version)
        if model is None:
            raise FailedPrecondition(
                f"version {version!r}: its checkpoint was refused (see the registry history)"
            )
        self._hold(model)
        return self.loaded_versions()

    def _refuse(self, version: str, exc: BaseException) -> None:
        self.metrics.swap_refused()
        serving = self._live.version if self._live else "none"
        log.error(
            "refused model version %s (still serving %s): %s",
            version,
            serving,
            exc,
            extra={"version": version},
        )
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
                self.follow_exploration(self._pointer)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop watching; waits for a swap in progress, not for the watch call (a daemon)."""
        self._stop.set()
        if self._swap_lock.acquire(timeout=timeout_s):
            self._swap_lock.release()

"""The model registry's interface: published versions, the live pointer, and the history of
every decision.

Backends: a local directory
(`feedloop.core.registry.directory`, the embedded default) and PostgreSQL
(`feedloop.core.registry.postgres`), opened by `feedloop.core.registry.factory.open_registry`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feedloop.core.checkpoint import Manifest
from feedloop.core.registry.pointer import (
    CANARY,
    PROMOTED,
    Decision,
    LivePointer,
    Transition,
    to_live,
    to_paused,
    to_rolled_back,
    to_trial,
    to_trial_end,
)


def version_name(number: int) -> str:
    return f"v{number:04d}"


class ModelRegistry(ABC):
    """Where the trainer publishes and the server finds what to serve."""

    # How often wait_for_change re-reads the pointer (each backend sets its own).
    poll_interval_s: float

    @abstractmethod
    def publish(
        self,
        checkpoint_dir: Path,
        *,
        reason: str = "",
        details: dict[str, Any] | None = None,
        make_live: bool = False,
    ) -> str:
        """Copy a verified checkpoint in as the next version; optionally make it live."""

    @abstractmethod
    def versions(self) -> list[str]:
        """Published versions, oldest first."""

    @abstractmethod
    def manifest(self, version: str) -> Manifest: ...

    @abstractmethod
    def checkpoint_dir(self, version: str) -> Path:
        """A local directory holding the version's checkpoint files (not yet verified)."""

    @abstractmethod
    def pointer(self) -> LivePointer: ...

    def live(self) -> str | None:
        return self.pointer().live

    @abstractmethod
    def _change(self, transition: Transition, *, published: str | None = None) -> LivePointer:
        """Apply a transition to the current pointer in one crash-safe step under the writers'
        lock: check that `published` (when given) is a published version (UnknownVersionError),
        write the new pointer if it differs, append the decisions, and return the new pointer.
        A transition that raises changes nothing."""

    def set_live(
        self,
        version: str,
        *,
        reason: str = "",
        action: str = PROMOTED,
        expect_live: str | None = None,
    ) -> LivePointer:
        """Make a published version live; the old live one goes on the rollback stack. Making the
        trial's version live ends the trial. expect_live, when given, must be the live version
        (LiveChanged otherwise)."""
        return self._change(
            lambda current: to_live(current, version, reason, action, expect_live),
            published=version,
        )

    def rollback(self, *, reason: str = "") -> LivePointer:
        """Make the previously live version live again (ending the trial if it is that one)."""
        return self._change(lambda current: to_rolled_back(current, reason))

    def start_trial(
        self,
        version: str,
        *,
        mode: str = CANARY,
        share: float,
        reason: str = "",
        expect_live: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> LivePointer:
        """Put a published version on trial beside the live one; the decision records it.

        ValueError for a share outside [0, 1] or an unknown mode, UnknownVersionError for an
        unpublished version, TrialError if a trial is running or the version is live,
        LiveChanged if expect_live is given and is not the live version.
        """
        return self._change(
            lambda current: to_trial(
                current, version, mode, share, reason, expect_live, details or {}
            ),
            published=version,
        )

    def end_trial(
        self,
        *,
        promote: bool,
        reason: str = "",
        details: dict[str, Any] | None = None,
        expect_version: str | None = None,
    ) -> LivePointer:
        """End the trial: promote its version to live (the old live one goes on the rollback
        stack) or roll it back (live unchanged). TrialError when none is running, LiveChanged if
        expect_version is given and is not the trial's version."""
        return self._change(
            lambda current: to_trial_end(current, promote, reason, details or {}, expect_version)
        )

    def set_paused(self, paused: bool, *, reason: str = "") -> LivePointer:
        """Pause or resume the trainer's publication (nothing changes when it already is)."""
        return self._change(lambda current: to_paused(current, paused, reason))

    @abstractmethod
    def record(self, decision: Decision) -> None:
        """Append a decision to the history (refusals of candidates that were never published)."""

    @abstractmethod
    def history(self, limit: int | None = None) -> list[Decision]:
        """Decisions, newest first."""

    def wait_for_change(self, last_seen: LivePointer | None, timeout_s: float) -> LivePointer:
        """Block up to timeout_s until the pointer (live version, trial or pause) differs from
        last_seen; return the current pointer. This default re-reads it every poll interval."""
        return self._wait_polling(last_seen, timeout_s, time.sleep)

    def _wait_polling(
        self, last_seen: LivePointer | None, timeout_s: float, pause: Callable[[float], None]
    ) -> LivePointer:
        """Re-read the pointer until it differs from last_seen or timeout_s passes, calling
        pause(seconds) in between: a backend with notifications returns from it early."""
        deadline = time.monotonic() + timeout_s
        while True:
            pointer = self.pointer()
            remaining = deadline - time.monotonic()
            if pointer != last_seen or remaining <= 0:
                return pointer
            pause(min(self.poll_interval_s, remaining))

    def close(self) -> None:  # noqa: B027 - optional for backends that hold no resources
        pass

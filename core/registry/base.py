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
    PRUNED,
    Decision,
    LivePointer,
    Transition,
    to_live,
    to_paused,
    to_rolled_back,
    to_trial,
    to_trial_end,
)
from feedloop.core.registry.retention import (
    PrunePlan,
    RegistrySnapshot,
    RetentionPolicy,
    lineage_root,
    plan_prune,
)

# Plans a prune from the registry's state read under its writers' lock.
Planner = Callable[[RegistrySnapshot], PrunePlan]


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
        """Published versions that can be served (not pruned), oldest first."""

    @abstractmethod
    def pruned_versions(self) -> list[str]:
        """Published versions whose weights retention deleted, oldest first."""

    @abstractmethod
    def manifest(self, version: str) -> Manifest:
        """A published version's manifest (a pruned version's too: manifests stay)."""

    @abstractmethod
    def checkpoint_dir(self, version: str) -> Path:
        """A local directory holding the version's checkpoint files (not yet verified).
        UnknownVersionError for an unpublished version, PrunedVersionError for a pruned one."""

    @abstractmethod
    def size_bytes(self) -> int:
        """Bytes of checkpoint files the registry holds."""

    def lineage_root(self, version: str) -> str:
        """The oldest published ancestor of version (through pruned versions too)."""
        parents = {
            v: self.manifest(v).parent_version for v in self.versions() + self.pruned_versions()
        }
        return lineage_root(version, parents)

    # -- pins and retention --------------------------------------------------------------------

    @abstractmethod
    def pins(self) -> list[str]:
        """Pinned versions, oldest first: retention never prunes them."""

    @abstractmethod
    def _set_pinned(self, version: str, pinned: bool, reason: str) -> bool:
        """Under the writers' lock: pin or unpin a published version and record the decision;
        False (nothing recorded) when it already was. UnknownVersionError for an unpublished
        version; PrunedVersionError when pinning a pruned one."""

    def pin(self, version: str, *, reason: str = "") -> bool:
        """Keep version's weights whatever retention says; False if it already was pinned."""
        return self._set_pinned(version, True, reason)

    def unpin(self, version: str, *, reason: str = "") -> bool:
        """Let retention prune version again; False if it was not pinned."""
        return self._set_pinned(version, False, reason)

    @abstractmethod
    def _prune(self, planner: Planner, *, dry_run: bool, reason: str) -> PrunePlan:
        """Under the writers' lock: plan from the current state and, unless dry_run, delete the
        planned versions' weights crash-safely, recording a PRUNED decision for each."""

    def prune(
        self,
        policy: RetentionPolicy,
        *,
        reference: str | None = None,
        dry_run: bool = False,
        reason: str = "retention",
    ) -> PrunePlan:
        """Delete the weights of every version the policy does not keep (see
        feedloop.core.registry.retention); reference: a version the caller's KL leash uses,
        kept too. The plan is made under the writers' lock, so a version made live or put on
        trial meanwhile is never pruned. Returns the plan (what was, or would be, pruned)."""
        return self._prune(
            lambda snapshot: plan_prune(snapshot, policy, reference),
            dry_run=dry_run,
            reason=reason,
        )

    @staticmethod
    def _pruned_decision(version: str, reason: str, freed_bytes: int) -> Decision:
        return Decision(version, PRUNED, reason, {"freed_bytes": freed_bytes})

    @abstractmethod
    def pointer(self) -> LivePointer: ...

    def live(self) -> str | None:
        return self.pointer().live

    @abstractmethod
    def _change(self, transition: Transition, *, published: str | None = None) -> LivePointer:
        """Apply a transition to the current pointer in one crash-safe step under the writers'
        lock: check that `published` (when given) is a published version (UnknownVersionError),
        that the new pointer's live and trial versions still have their weights
        (PrunedVersionError: a rollback to a pruned version), write the new pointer if it
        differs, append the decisions, and return the new pointer. A transition that raises
        changes nothing."""

    def set_live(
        self,
        version: str,
        *,
        reason: str = "",
        action: str = PROMOTED,
        expect_live: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> LivePointer:
        """Make a published version live; the old live one goes on the rollback stack. Making the
        trial's version live ends the trial. expect_live, when given, must be the live version
        (LiveChanged otherwise). details: the decision's figures, recorded with it."""
        return self._change(
            lambda current: to_live(current, version, reason, action, expect_live, details),
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

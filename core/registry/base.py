"""The model registry's interface: published versions, the live pointer, and the history of
every decision.

Backends: a local directory
(`feedloop.core.registry.directory`, the embedded default) and PostgreSQL
(`feedloop.core.registry.postgres`), opened by `feedloop.core.registry.factory.open_registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feedloop.core.checkpoint import Manifest

PUBLISHED, PROMOTED, REFUSED, ROLLED_BACK = "published", "promoted", "refused", "rolled_back"
ACTIONS = (PUBLISHED, PROMOTED, REFUSED, ROLLED_BACK)
# How many earlier live versions a rollback can go back to.
ROLLBACK_DEPTH = 20


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def version_name(number: int) -> str:
    return f"v{number:04d}"


@dataclass(frozen=True)
class Decision:
    """One entry of the registry's history."""

    version: str
    action: str
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=now_iso)


@dataclass(frozen=True)
class LivePointer:
    live: str | None
    previous: tuple[str, ...] = ()  # earlier live versions, oldest first: the rollback stack


class ModelRegistry(ABC):
    """Where the trainer publishes and the server finds what to serve."""

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
    def set_live(self, version: str, *, reason: str = "", action: str = PROMOTED) -> LivePointer:
        """Make a published version live; the old live one goes on the rollback stack."""

    @abstractmethod
    def rollback(self, *, reason: str = "") -> LivePointer:
        """Make the previously live version live again."""

    @abstractmethod
    def record(self, decision: Decision) -> None:
        """Append a decision to the history (refusals of candidates that were never published)."""

    @abstractmethod
    def history(self, limit: int | None = None) -> list[Decision]:
        """Decisions, newest first."""

    @abstractmethod
    def wait_for_change(self, last_seen: str | None, timeout_s: float) -> str | None:
        """Block up to timeout_s until the live version differs from last_seen; return it."""

    def close(self) -> None:  # noqa: B027 - optional for backends that hold no resources
        pass

"""The embedded model registry: a local directory, shared by the processes of one machine.

Layout:
    versions/v0001/   one verified checkpoint per published version (never modified again, but
                      for retention: a PRUNED marker, then its weights deleted; the manifest stays)
    LIVE              {"live": "v0003", "previous": ["v0001", "v0002"], "trial": {...} or null,
                      "paused": false}: the atomic pointer
    PINNED            ["v0002"]: the pinned versions (absent: none)
    history.jsonl     one decision per line (published, promoted, refused, rolled_back, ...)
    .staging/         where a publish is written before its atomic rename into versions/
    .lock             flock serialising writers (server replicas and the trainer)

A publish writes into .staging, fsyncs, and renames into versions/ in one step, so a reader
never sees a half-written version and a publish killed at any instant leaves the registry valid
and the live version unchanged.

Pruning a version writes its PRUNED marker atomically first: from then on it is pruned (not
listed, not servable), and deleting its weight files is only cleanup, finished on the next open
or prune should a crash interrupt it. So a prune killed at any instant leaves every version
either whole and servable or pruned, and the pointer (changed under the same lock, and never to a
pruned version) always names whole ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from feedloop.core.checkpoint import (
    MANIFEST,
    Manifest,
    fsync_dir,
    needed_base,
    provided_base,
    read_manifest,
    verify_files,
    write_manifest,
)
from feedloop.core.errors import PrunedVersionError, RegistryError, UnknownVersionError
from feedloop.core.registry.base import ModelRegistry, Planner, version_name
from feedloop.core.registry.pointer import (
    ACTIONS,
    PINNED,
    PROMOTED,
    PUBLISHED,
    UNPINNED,
    Decision,
    LivePointer,
    Transition,
    now_iso,
    pointer_from_dict,
    pointer_to_dict,
    to_live,
)
from feedloop.core.registry.retention import (
    PrunePlan,
    RegistrySnapshot,
    VersionFacts,
    base_provider,
)

_VERSION_RE = re.compile(r"^v(\d{4,})$")
# In a version's folder: retention pruned it (written before any of its weights is deleted).
PRUNED_MARKER = "PRUNED"


class DirectoryRegistry(ModelRegistry):
    # A wait for a pointer change re-reads one small file this often.
    DEFAULT_POLL_INTERVAL_S = 0.1

    def __init__(self, root: Path, *, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> None:
        self.root = Path(root)
        self.poll_interval_s = poll_interval_s
        self._versions_dir = self.root / "versions"
        self._staging = self.root / ".staging"
        for d in (self.root, self._versions_dir, self._staging):
            d.mkdir(parents=True, exist_ok=True)
        with self._locked():
            # Leftovers of publishes killed before their rename; safe to drop under the lock.
            for leftover in self._staging.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
            self._finish_pruning()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- versions ------------------------------------------------------------------------------

    def _numbered(self) -> list[tuple[int, str, Path]]:
        """Every published version's (number, name, folder), pruned ones included, in order."""
        found = []
        for entry in self._versions_dir.iterdir():
            m = _VERSION_RE.match(entry.name)
            if m and (entry / MANIFEST).is_file():
                found.append((int(m.group(1)), entry.name, entry))
        return sorted(found)

    def versions(self) -> list[str]:
        return [name for _, name, path in self._numbered() if not _is_pruned(path)]

    def pruned_versions(self) -> list[str]:
        return [name for _, name, path in self._numbered() if _is_pruned(path)]

    def _version_path(self, version: str) -> Path:
        path = self._versions_dir / version
        if not _VERSION_RE.match(version) or not (path / MANIFEST).is_file():
            raise UnknownVersionError(f"no version {version!r} in the registry at {self.root}")
        return path

    def checkpoint_dir(self, version: str) -> Path:
        path = self._version_path(version)
        if _is_pruned(path):
            raise PrunedVersionError(
                f"{version} was pruned by the registry's retention: its weights are deleted, so "
                "it cannot be served, tried or pinned; choose a version `feedloop models` lists"
            )
        return path

    def manifest(self, version: str) -> Manifest:
        return read_manifest(self._version_path(version))

    def backup(self, destination: Path) -> list[str]:
        """Copy the registry to destination (a new folder), consistently while it is in use; the
        versions copied.

        Under the writers' lock, so no publish, pointer change or prune lands halfway: a
        version's folder never changes once published (only a prune deletes its weights, under
        this lock), so a plain copy of each folder, the pointer, the pins and the history is a
        consistent snapshot. Pruned versions travel as their manifest and marker. Files are
        copied, not linked: a backup must survive the disk it came from.
        """
        destination = Path(destination)
        if destination.exists() and any(destination.iterdir()):
            raise RegistryError(f"backup destination {destination} is not empty")
        copied = []
        with self._locked():
            (destination / "versions").mkdir(parents=True, exist_ok=True)
            for _, name, path in self._numbered():
                target = destination / "versions" / name
                target.mkdir()
                for f in path.iterdir():
                    if f.is_file():
                        shutil.copy2(f, target / f.name)
                copied.append(name)
            for name in ("LIVE", "PINNED", "history.jsonl"):
                if (self.root / name).is_file():
                    shutil.copy2(self.root / name, destination / name)
        for copy in [*destination.rglob("*")]:
            if copy.is_file():
                with open(copy, "rb") as handle:
                    os.fsync(handle.fileno())
        for folder in [destination / "versions", *(destination / "versions").iterdir()]:
            fsync_dir(folder)
        fsync_dir(destination)
        return copied

    def size_bytes(self) -> int:
        folders = [path for _, _, path in self._numbered()]
        return sum(f.stat().st_size for path in folders for f in path.iterdir() if f.is_file())

    def publish(
        self,
        checkpoint_dir: Path,
        *,
        reason: str = "",
        details: dict[str, Any] | None = None,
        make_live: bool = False,
    ) -> str:
        source = Path(checkpoint_dir)
        manifest = read_manifest(source)
        verify_files(source, manifest)
        with self._locked():
            needs = needed_base(manifest)
            if needs is not None and base_provider(needs, self._snapshot().versions) is None:
                raise RegistryError(
                    f"{source}: a LoRA adapter over base {needs[:12]}…, which is not in the "
                    f"registry at {self.root}: publish its base (the full checkpoint) first"
                )
            existing = self._numbered()
            number = existing[-1][0] + 1 if existing else 1
            version = version_name(number)
            staging = self._staging / uuid.uuid4().hex
            try:
                staging.mkdir()
                for name in manifest.files:
                    shutil.copyfile(source / name, staging / name)
                    with (staging / name).open("rb") as f:
                        os.fsync(f.fileno())
                write_manifest(staging, manifest.with_version(version))
                fsync_dir(staging)
                os.rename(staging, self._versions_dir / version)
            except BaseException:
                # A failed copy (a full disk, say) must not keep its space: a long-running
                # trainer would never get it back, and every later publish would fail too.
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_dir(self._versions_dir)
            self._append(Decision(version, PUBLISHED, reason, details or {}))
            if make_live:
                self._change_locked(
                    lambda current: to_live(current, version, reason, PROMOTED, None), version
                )
        return version

    # -- the live pointer ----------------------------------------------------------------------

    def pointer(self) -> LivePointer:
        try:
            data = json.loads((self.root / "LIVE").read_text(encoding="utf-8"))
            return pointer_from_dict(data)
        except FileNotFoundError:
            return LivePointer(None)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"{self.root / 'LIVE'}: unreadable live pointer: {exc}") from exc

    def _change_locked(self, transition: Transition, published: str | None) -> LivePointer:
        if published is not None:
            self.checkpoint_dir(published)  # raises for an unknown or pruned version
        current = self.pointer()
        pointer, decisions = transition(current)
        for serving in (pointer.live, pointer.trial.version if pointer.trial else None):
            if serving is not None:
                self.checkpoint_dir(serving)  # a rollback to a pruned version is refused
        if pointer != current:
            _write_json(self.root / "LIVE", pointer_to_dict(pointer))
        for decision in decisions:
            self._append(decision)
        return pointer

    def _change(self, transition: Transition, *, published: str | None = None) -> LivePointer:
        with self._locked():
            return self._change_locked(transition, published)

    # -- pins and retention --------------------------------------------------------------------

    def pins(self) -> list[str]:
        try:
            pinned = json.loads((self.root / "PINNED").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{self.root / 'PINNED'}: unreadable pins: {exc}") from exc
        return sorted(pinned, key=lambda v: (len(v), v))

    def _set_pinned(self, version: str, pinned: bool, reason: str) -> bool:
        with self._locked():
            if pinned:
                self.checkpoint_dir(version)  # unknown or pruned: refused
            else:
                self._version_path(version)
            current = set(self.pins())
            if (version in current) == pinned:
                return False
            wanted = current | {version} if pinned else current - {version}
            _write_json(self.root / "PINNED", sorted(wanted, key=lambda v: (len(v), v)))
            self._append(Decision(version, PINNED if pinned else UNPINNED, reason))
            return True

    def _snapshot(self) -> RegistrySnapshot:
        facts = {}
        for _, name, path in self._numbered():
            manifest = read_manifest(path)
            facts[name] = VersionFacts(
                manifest.parent_version,
                manifest.training_summary or {},
                _is_pruned(path),
                provided_base(manifest),
                needed_base(manifest),
            )
        return RegistrySnapshot(facts, self.pointer(), frozenset(self.pins()))

    def _prune(self, planner: Planner, *, dry_run: bool, reason: str) -> PrunePlan:
        with self._locked():
            self._finish_pruning()
            plan = planner(self._snapshot())
            if dry_run:
                return plan
            for version in plan.prune:
                path = self._versions_dir / version
                freed = sum(f.stat().st_size for f in _weight_files(path))
                # The commit point: once the marker is durable, the version is pruned.
                _write_json(path / PRUNED_MARKER, {"at": now_iso(), "reason": reason})
                self._append(self._pruned_decision(version, reason, freed))
                _delete_weights(path)
        return plan

    def _finish_pruning(self) -> None:
        """Delete what a prune interrupted by a crash left of its versions' weights."""
        for _, _, path in self._numbered():
            if _is_pruned(path):
                _delete_weights(path)

    # -- history -------------------------------------------------------------------------------

    def _append(self, decision: Decision) -> None:
        with open(self.root / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(decision), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def record(self, decision: Decision) -> None:
        if decision.action not in ACTIONS:
            raise ValueError(f"unknown action {decision.action!r}")
        with self._locked():
            self._append(decision)

    def history(self, limit: int | None = None) -> list[Decision]:
        try:
            lines = (self.root / "history.jsonl").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        decisions = []
        for line in lines:
            try:
                decisions.append(Decision(**json.loads(line)))
            except (ValueError, TypeError):
                continue  # a line torn by a crash mid-append; every whole line is kept
        decisions.reverse()
        return decisions[:limit] if limit else decisions


def _is_pruned(path: Path) -> bool:
    return (path / PRUNED_MARKER).is_file()


def _weight_files(path: Path) -> list[Path]:
    return [f for f in path.iterdir() if f.name not in (MANIFEST, PRUNED_MARKER) and f.is_file()]


def _delete_weights(path: Path) -> None:
    for f in _weight_files(path):
        f.unlink(missing_ok=True)
    fsync_dir(path)


def _write_json(target: Path, data: Any) -> None:
    """Replace target with data as JSON in one atomic, durable step."""
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)

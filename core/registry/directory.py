"""The embedded model registry: a local directory, shared by the processes of one machine.

Layout:
    versions/v0001/   one verified checkpoint per published version (never modified again)
    LIVE              {"live": "v0003", "previous": ["v0001", "v0002"], "trial": {...} or null,
                      "paused": false}: the atomic pointer
    history.jsonl     one decision per line (published, promoted, refused, rolled_back, ...)
    .staging/         where a publish is written before its atomic rename into versions/
    .lock             flock serialising writers (server replicas and the trainer)

A publish writes into .staging, fsyncs, and renames into versions/ in one step, so a reader
never sees a half-written version and a publish killed at any instant leaves the registry valid
and the live version unchanged.
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
    read_manifest,
    verify_files,
    write_manifest,
)
from feedloop.core.errors import RegistryError, UnknownVersionError
from feedloop.core.registry.base import ModelRegistry, version_name
from feedloop.core.registry.pointer import (
    ACTIONS,
    PROMOTED,
    PUBLISHED,
    Decision,
    LivePointer,
    Transition,
    pointer_from_dict,
    pointer_to_dict,
    to_live,
)

_VERSION_RE = re.compile(r"^v(\d{4,})$")


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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- versions ------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        found = []
        for entry in self._versions_dir.iterdir():
            m = _VERSION_RE.match(entry.name)
            if m and (entry / MANIFEST).is_file():
                found.append((int(m.group(1)), entry.name))
        return [name for _, name in sorted(found)]

    def checkpoint_dir(self, version: str) -> Path:
        path = self._versions_dir / version
        if not _VERSION_RE.match(version) or not path.is_dir():
            raise UnknownVersionError(f"no version {version!r} in the registry at {self.root}")
        return path

    def manifest(self, version: str) -> Manifest:
        return read_manifest(self.checkpoint_dir(version))

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
            existing = self.versions()
            number = int(existing[-1][1:]) + 1 if existing else 1
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

    def _write_pointer(self, pointer: LivePointer) -> None:
        tmp = self.root / "LIVE.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(pointer_to_dict(pointer), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "LIVE")
        fsync_dir(self.root)

    def _change_locked(self, transition: Transition, published: str | None) -> LivePointer:
        if published is not None:
            self.checkpoint_dir(published)  # raises for an unknown version
        current = self.pointer()
        pointer, decisions = transition(current)
        if pointer != current:
            self._write_pointer(pointer)
        for decision in decisions:
            self._append(decision)
        return pointer

    def _change(self, transition: Transition, *, published: str | None = None) -> LivePointer:
        with self._locked():
            return self._change_locked(transition, published)

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

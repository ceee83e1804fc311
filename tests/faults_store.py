"""Store faults on demand: a disk that fills up (a small tmpfs, or SQLite's page quota where
mounting is not allowed), and a replay store that is slow to write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from feedloop.core.errors import StoreUnavailableError
from feedloop.core.human_eval import VerdictRecord
from feedloop.core.store.base import (
    ErasureRecord,
    ErasureTarget,
    FeedbackRecord,
    GenerationRecord,
    PrunedRows,
    ReplayStore,
    ShadowScore,
)
from feedloop.core.store.outcomes import JudgedGeneration
from feedloop.core.store.sqlite import SQLiteStore

FILL_CHUNK_BYTES = 64 * 1024


class SmallDisk:
    """A directory on a tmpfs of size_bytes that can be filled up and freed again."""

    def __init__(self, root: Path, size_bytes: int) -> None:
        self.root = root
        self.size_bytes = size_bytes
        self._filler = root / "filler.bin"

    @staticmethod
    def can_mount() -> bool:
        return os.geteuid() == 0 and os.path.exists("/proc/filesystems")

    def mount(self) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes}", "tmpfs", str(self.root)],
            capture_output=True,
            text=True,
        )
        return result.returncode == 0

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], capture_output=True)

    def fill(self) -> int:
        """Write a filler file until the disk is full; returns the bytes written."""
        written = 0
        with open(self._filler, "ab", buffering=0) as f:
            for chunk in (FILL_CHUNK_BYTES, 4096, 512):
                while True:
                    try:
                        written += f.write(b"\0" * chunk) or 0
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._filler.unlink()


@contextlib.contextmanager
def small_disk(root: Path, size_bytes: int) -> Iterator[SmallDisk | None]:
    """A mounted SmallDisk, or None where this process may not mount (use the quota instead)."""
    disk = SmallDisk(root, size_bytes)
    if not (SmallDisk.can_mount() and disk.mount()):
        yield None
        return
    try:
        yield disk
    finally:
        disk.free()
        disk.unmount()


class QuotaDisk:
    """The fallback: SQLite's max_page_count makes the store 'full' at its current size."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    def fill(self) -> int:
        size = self.store.path.stat().st_size
        self.store.set_max_size_bytes(size)
        return size

    def free(self) -> None:
        self.store.set_max_size_bytes(None)


class SlowStore(ReplayStore):
    """A real store whose writes take write_delay_s longer (a slow or overloaded disk), and
    fail with StoreUnavailableError while `down` is set (an outage: database gone, NFS hung).
    """

    def __init__(self, inner: ReplayStore, write_delay_s: float = 0.0) -> None:
        self.inner = inner
        self.write_delay_s = write_delay_s
        self.down = False
        self.largest_feedback_batch = 0
        self.largest_generation_batch = 0
        self._lock = threading.Lock()

    def _slow(self) -> None:
        time.sleep(self.write_delay_s)
        if self.down:
            raise StoreUnavailableError("injected outage: the replay store is unreachable")

    def append_generations(self, records: Sequence[GenerationRecord]) -> None:
        with self._lock:
            self.largest_generation_batch = max(self.largest_generation_batch, len(records))
        self._slow()
        self.inner.append_generations(records)

    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[bool]:
        with self._lock:
            self.largest_feedback_batch = max(self.largest_feedback_batch, len(records))
        self._slow()
        return self.inner.insert_feedback(records)

    def append_shadow_scores(self, scores: Sequence[ShadowScore]) -> None:
        self._slow()
        self.inner.append_shadow_scores(scores)

    def shadow_scores(self, version: str, generation_ids: Sequence[str]) -> dict[str, ShadowScore]:
        return self.inner.shadow_scores(version, generation_ids)

    def get_feedback(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], FeedbackRecord]:
        return self.inner.get_feedback(keys)

    def get_generations(self, generation_ids: Sequence[str]) -> dict[str, GenerationRecord]:
        return self.inner.get_generations(generation_ids)

    def generations_after(self, seq: int, limit: int) -> list[GenerationRecord]:
        return self.inner.generations_after(seq, limit)

    def sample_generations(self, before_seq: int, n: int, seed: int) -> list[GenerationRecord]:
        return self.inner.sample_generations(before_seq, n, seed)

    def feedback_after(self, seq: int, limit: int) -> list[FeedbackRecord]:
        return self.inner.feedback_after(seq, limit)

    def feedback_for(self, generation_ids: Sequence[str]) -> list[FeedbackRecord]:
        return self.inner.feedback_for(generation_ids)

    def judged_generations(
        self, since: float, until: float | None = None
    ) -> list[JudgedGeneration]:
        return self.inner.judged_generations(since, until)

    def size_bytes(self) -> int:
        return self.inner.size_bytes()

    def max_seq(self) -> tuple[int, int]:
        return self.inner.max_seq()

    def counts(self) -> Any:
        return self.inner.counts()

    def get_cursor(self, name: str) -> dict[str, Any] | None:
        return self.inner.get_cursor(name)

    def set_cursor(self, name: str, value: dict[str, Any]) -> None:
        self.inner.set_cursor(name, value)

    def erase_client(self, client_id: str, *, requested_by: str, now: float) -> ErasureRecord:
        self._slow()
        return self.inner.erase_client(client_id, requested_by=requested_by, now=now)

    def erasures(self) -> list[ErasureRecord]:
        return self.inner.erasures()

    def erase_rows(
        self, target: ErasureTarget, *, requested_by: str, now: float, archive_rows: int
    ) -> ErasureRecord:
        return self.inner.erase_rows(
            target, requested_by=requested_by, now=now, archive_rows=archive_rows
        )

    def generation_ages(
        self, after_seq: int, upto_seq: int, limit: int
    ) -> list[tuple[int, str, float]]:
        return self.inner.generation_ages(after_seq, upto_seq, limit)

    def delete_pruned(
        self, generation_ids: Sequence[str], events: Sequence[FeedbackRecord], archive: str | None
    ) -> PrunedRows:
        self._slow()
        return self.inner.delete_pruned(generation_ids, events, archive)

    def register_archive(self, path: str, now: float) -> None:
        self.inner.register_archive(path, now)

    def maintenance_lock(self) -> contextlib.AbstractContextManager[None]:
        return self.inner.maintenance_lock()

    def archives(self) -> list[str]:
        return self.inner.archives()

    def cursors(self) -> dict[str, dict[str, Any]]:
        return self.inner.cursors()

    def insert_verdict(self, record: VerdictRecord) -> bool:
        self._slow()
        return self.inner.insert_verdict(record)

    def verdicts_between(self, version_a: str, version_b: str) -> list[VerdictRecord]:
        return self.inner.verdicts_between(version_a, version_b)

    def iter_export(self) -> Iterator[dict[str, Any]]:
        return self.inner.iter_export()

    def schema_version(self) -> int:
        return self.inner.schema_version()

    def close(self) -> None:
        self.inner.close()


def postgres_cluster() -> tuple[str, str] | None:
    """(version, cluster name) of the local PostgreSQL cluster, or None without pg_ctlcluster."""
    base = Path("/etc/postgresql")
    if not base.is_dir():
        return None
    for version in sorted(os.listdir(base)):
        if (base / version / "main").is_dir():
            return version, "main"
    return None


def pg_ctlcluster(action: str) -> subprocess.CompletedProcess[str]:
    cluster = postgres_cluster()
    assert cluster is not None
    return subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, action],
        capture_output=True,
        text=True,
        timeout=120,
    )

"""Archive files: the rows retention deletes from the replay store, kept off the hot store.

An archive is gzip-compressed JSON Lines in the format of `feedloop store export`: one row per
generation with every logged field (prompt, tokens, behaviour and policy log-probabilities,
sampling, version, client, end user) and a "feedback" list of every event that names it, so the
archive is lossless and any tool that reads an export reads it. An event naming several archived
generations is repeated in each one's row (as in an export); readers key events by event_id.

Each retention batch is appended as one gzip member, fsynced before the store deletes the rows
(gzip readers read concatenated members as one stream). A pruner killed between the two leaves
rows both archived and still stored: the next run archives them again, so a reader deduplicates
by generation_id. The store records every archive file it wrote (`ReplayStore.archives`), and an
erasure rewrites each one without the erased identity's rows (`erase_from_archives`).
"""

from __future__ import annotations

import gzip
import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ARCHIVE_SUFFIX = ".jsonl.gz"


def fsync_dir(path: Path) -> None:
    """Make a file's creation or rename in this directory durable (the checkpoint module has the
    same, but importing it would pull torch into every store tool)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


class ArchiveWriter:
    """One archive file in `directory`, named by the UTC time it was started; batches appended."""

    def __init__(self, directory: Path, now: float) -> None:
        self.directory = directory
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        self.path = directory / f"feedloop-archive-{stamp}-{uuid.uuid4().hex[:8]}{ARCHIVE_SUFFIX}"

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append rows as one gzip member, durably; the number written."""
        lines = [_line(row) for row in rows]
        if not lines:
            return 0
        created = not self.path.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as out:
            out.write(gzip.compress("".join(lines).encode("utf-8"), compresslevel=6))
            out.flush()
            os.fsync(out.fileno())
        if created:
            fsync_dir(self.directory)
        return len(lines)


def read_archive(path: Path) -> list[dict[str, Any]]:
    """Every row of an archive file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _without(
    row: dict[str, Any], client_id: str, end_user: str
) -> tuple[dict[str, Any] | None, int]:
    """The row with the identity's data removed (None: the whole row is theirs); rows removed."""
    if client_id and row.get("client_id") == client_id:
        return None, 1 + len(row.get("feedback", []))
    if end_user and row.get("end_user") == end_user:
        return None, 1 + len(row.get("feedback", []))
    events = row.get("feedback", [])
    if client_id:
        kept = [e for e in events if e.get("client_id") != client_id]
        if len(kept) != len(events):
            return {**row, "feedback": kept}, len(events) - len(kept)
    return row, 0


def erase_from_archives(paths: Sequence[str], *, client_id: str = "", end_user: str = "") -> int:
    """Rewrite each archive file without the client's (or end user's) generations and the
    events the client sent or that name those generations; rows removed.

    Each file is rewritten beside itself, fsynced and renamed over the old one, so a crash
    leaves either the old file or the new one. A file that no longer exists (an operator moved
    or deleted it) holds nothing to erase here and is skipped.
    """
    removed = 0
    for name in paths:
        path = Path(name)
        try:
            rows = read_archive(path)
        except FileNotFoundError:
            continue
        kept: list[dict[str, Any]] = []
        removed_here = 0
        for row in rows:
            rest, gone = _without(row, client_id, end_user)
            removed_here += gone
            if rest is not None:
                kept.append(rest)
        if not removed_here:
            continue
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "wb") as out:
            out.write(gzip.compress("".join(_line(r) for r in kept).encode("utf-8")))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        removed += removed_here
    return removed

"""Store retention: which generations and feedback events the replay store may delete, and a
pruner that deletes them in small batches (optionally archiving them first).

The trainer only ever reads recent windows, so old rows are dead weight, but some old-looking
rows are still needed. Whatever the policy says, a row is kept while it is:
    in the current window   past the trainer's cursor (every cursor in the store that carries
                            `generation_seq`/`feedback_seq`; the lowest wins): the next round's
                            window, its join window (the trainer moves its generation cursor
                            past a generation only once its join window has passed) and the gate's
                            held-out share of it, which is a split of that window
    young                   created (generation) or received (event) less than `min_age_s`
                            ago: a generation whose feedback may still arrive, and the feedback
                            the online evaluation reads (the trainer's decision_lookback_s, a
                            day by default; a trial's and a watch's feedback, 30 min each)
    named by a kept event   a generation some kept event names (so no kept event names a
                            deleted generation; rewards and the reward model read both)
A store with no trainer cursor yet has trained on nothing: nothing is deleted.

Age-based (`retain_s`): generations older than it go, with the events naming them. Size-based
(`retain_max_bytes`, SQLite): while the live data (pages in use) is over the limit, the oldest
unprotected generations go, whatever their age. Both: whichever deletes more.

A round in progress is safe too: it read its window (and its replay sample, which may include
rows being pruned: those it already holds in memory) before it trains, and the cursor it
persists afterwards only moves forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from feedloop.core.store.archive import ArchiveWriter
from feedloop.core.store.base import FeedbackRecord, PrunedRows, ReplayStore
from feedloop.core.store.schema import export_row

DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class StoreRetentionPolicy:
    """What the replay store keeps. Unset limits: no limit of that kind.

    min_age_s defaults to a day: the trainer's online evaluation reads a day of ratings
    (decision_lookback_s), and feedback on a generation a day old is rare.
    """

    retain_s: float | None = None
    retain_max_bytes: int | None = None
    min_age_s: float = DAY_S
    batch_generations: int = 500
    pause_s: float = 0.05

    def __post_init__(self) -> None:
        if self.retain_s is None and self.retain_max_bytes is None:
            raise ValueError("set retain_days or retain_max_gb (or both)")
        if not self.min_age_s >= 0:
            raise ValueError(f"retain_min_age_h must be >= 0, got {self.min_age_s / 3600:g}")
        if self.retain_s is not None:
            if not self.retain_s > 0:
                raise ValueError(f"retain_days must be > 0, got {self.retain_s / DAY_S:g}")
            if self.retain_s < self.min_age_s:
                raise ValueError(
                    f"retain_days {self.retain_s / DAY_S:g} would delete data younger than the "
                    f"protected {self.min_age_s / 3600:g} h (retain_min_age_h): the current "
                    "window, generations whose feedback may still arrive and the feedback the "
                    "online evaluation reads; keep at least that much"
                )
        if self.retain_max_bytes is not None and self.retain_max_bytes <= 0:
            raise ValueError(f"retain_max_gb must be > 0, got {self.retain_max_bytes / 1e9:g}")
        if self.batch_generations < 1:
            raise ValueError(f"batch_generations must be >= 1, got {self.batch_generations}")
        if self.pause_s < 0:
            raise ValueError(f"pause_s must be >= 0, got {self.pause_s}")


@dataclass(frozen=True)
class Horizon:
    """The highest seqs the trainer has consumed: rows past them are its current window."""

    generation_seq: int
    feedback_seq: int


def trainer_horizon(store: ReplayStore) -> Horizon | None:
    """The lowest of the trainer cursors in the store; None when there is none."""
    cursors = [
        value
        for value in store.cursors().values()
        if "generation_seq" in value and "feedback_seq" in value
    ]
    if not cursors:
        return None
    return Horizon(
        min(int(c["generation_seq"]) for c in cursors),
        min(int(c["feedback_seq"]) for c in cursors),
    )


@dataclass
class PruneReport:
    rows: PrunedRows = field(default_factory=PrunedRows)
    batches: int = 0
    archived: int = 0
    archive: str | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    reclaimed_bytes: int = 0
    stopped: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        archived = f", {self.archived} rows archived to {self.archive}" if self.archive else ""
        return (
            f"pruned {self.rows.generations} generations, {self.rows.feedback} feedback events, "
            f"{self.rows.shadow_scores} shadow scores in {self.batches} batches{archived}; "
            f"store {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB "
            f"({self.seconds:.1f} s); stopped: {self.stopped}"
        )


class StorePruner:
    """Deletes what the policy lets go, a batch at a time (see the module docstring).

    Each batch holds the store's maintenance lock over its read, archive and delete (so an
    erasure never runs between them), deletes in one short transaction, then sleeps pause_s so
    writers (the server's group commits) pass between batches.
    """

    def __init__(
        self,
        store: ReplayStore,
        policy: StoreRetentionPolicy,
        *,
        archive_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if policy.retain_max_bytes is not None and store.used_bytes() is None:
            raise ValueError(
                "retain_max_gb needs a store that can tell its live data from free space "
                "(SQLite); on PostgreSQL use retain_days (a DELETE's space stays in the table "
                "for reuse, so its size would never come down)"
            )
        self.store = store
        self.policy = policy
        self.archive_dir = archive_dir
        self.clock = clock
        self.sleep = sleep

    def _over_size(self) -> bool:
        limit = self.policy.retain_max_bytes
        used = self.store.used_bytes()
        return limit is not None and used is not None and used > limit

    def run_once(self) -> PruneReport:
        """One pass: batches until nothing more may go; then the space is given back."""
        started = time.monotonic()
        report = PruneReport(bytes_before=self.store.size_bytes())
        now = self.clock()
        horizon = trainer_horizon(self.store)
        if horizon is None:
            report.stopped = "no trainer cursor in the store: nothing has been trained on"
        else:
            report.stopped = self._batches(horizon, now, report)
        if report.batches:
            report.reclaimed_bytes = self.store.reclaim_space()
        report.bytes_after = self.store.size_bytes()
        report.seconds = time.monotonic() - started
        return report

    def _batches(self, horizon: Horizon, now: float, report: PruneReport) -> str:
        policy = self.policy
        young = now - policy.min_age_s
        writer = ArchiveWriter(self.archive_dir, now) if self.archive_dir is not None else None
        after_seq = 0
        while True:
            over_size = self._over_size()
            if policy.retain_s is None and not over_size:
                return "the store is under its size limit"
            cutoff = young if over_size else now - policy.retain_s  # type: ignore[operator]
            with self.store.maintenance_lock():
                candidates = self.store.generation_ages(
                    after_seq, horizon.generation_seq, policy.batch_generations
                )
                old = []
                for seq, generation_id, created_at in candidates:
                    if created_at >= cutoff:
                        break  # seqs follow time: everything after is as young
                    old.append((seq, generation_id))
                if not old:
                    if not candidates:
                        return "reached the trainer's current window"
                    return "reached data younger than the retention" + (
                        " (protected: younger than retain_min_age_h)" if over_size else ""
                    )
                after_seq = old[-1][0]
                doomed, events = self._doomed([gid for _, gid in old], horizon, young)
                if writer is not None and doomed:
                    if report.archive is None:
                        self.store.register_archive(str(writer.path), now)
                        report.archive = str(writer.path)
                    report.archived += writer.append(self._archive_rows(doomed, events))
                rows = self.store.delete_pruned(doomed, events, report.archive)
            report.rows += rows
            report.batches += 1
            if policy.pause_s:
                self.sleep(policy.pause_s)

    def _doomed(
        self, generation_ids: list[str], horizon: Horizon, young: float
    ) -> tuple[list[str], list[FeedbackRecord]]:
        """Of these old, consumed generations: those no kept event names, and the events that
        go with them (every event naming one, all of them consumed and old)."""
        events = self.store.feedback_for(generation_ids)
        kept_events = [e for e in events if e.seq > horizon.feedback_seq or e.received_at >= young]
        blocked = {gid for e in kept_events for gid in e.generation_ids}
        doomed = [gid for gid in generation_ids if gid not in blocked]
        doomed_set = set(doomed)
        kept_seqs = {e.seq for e in kept_events}
        going = [
            e
            for e in events
            if e.seq not in kept_seqs and any(gid in doomed_set for gid in e.generation_ids)
        ]
        return doomed, going

    def _archive_rows(self, doomed: list[str], events: list[FeedbackRecord]) -> list[dict]:
        generations = self.store.get_generations(doomed)
        by_generation: dict[str, list[FeedbackRecord]] = {}
        for event in events:
            for gid in dict.fromkeys(event.generation_ids):
                by_generation.setdefault(gid, []).append(event)
        return [
            export_row(generations[gid], by_generation.get(gid, []))
            for gid in doomed
            if gid in generations
        ]

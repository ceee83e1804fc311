"""What the demo measures while it runs: traffic, feedback, true reward per model version, swaps
and the trainer's rounds. Thread-safe: user threads record, the display thread reads."""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

ROUND_RE = re.compile(r"^feedloop train: round (?P<round>\S+): (?P<outcome>\w+)(?P<rest>.*)$")


@dataclass
class VersionStats:
    """The true reward (the simulated users' hidden preference) of one version's candidates."""

    version: str
    first_seen_s: float
    requests: int = 0
    candidates: int = 0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0

    def add(self, rewards: list[float]) -> None:
        self.requests += 1
        self.candidates += len(rewards)
        self.reward_sum += sum(rewards)
        self.reward_sq_sum += sum(r * r for r in rewards)

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.candidates if self.candidates else math.nan

    @property
    def stderr(self) -> float:
        """Standard error of the mean reward (candidates treated as independent draws)."""
        n = self.candidates
        if n < 2:
            return math.inf
        variance = max(self.reward_sq_sum / n - self.mean_reward**2, 0.0) * n / (n - 1)
        return math.sqrt(variance / n)


class Served(NamedTuple):
    """One answered request: when (seconds since start), by which version, why that version
    (live, canary or pinned), and the mean true reward of its candidates."""

    at_s: float
    version: str
    reward: float
    served_as: str = "live"


class Answered(NamedTuple):
    """Every answered request, exploration included: what users were served over time (the
    mean true reward of its candidates) and the feedback events it brought."""

    at_s: float
    reward: float
    feedback_events: int
    served_as: str


@dataclass(frozen=True)
class Swap:
    at_s: float
    previous: str
    live: str


@dataclass(frozen=True)
class Round:
    at_s: float
    number: str
    outcome: str  # published, refused, skipped, aborted, abandoned, failed
    detail: str


@dataclass
class DemoStats:
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    feedback_events: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    versions: dict[str, VersionStats] = field(default_factory=dict)
    samples: list[Served] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    taste_changes: list[tuple[float, str]] = field(default_factory=list)  # (at_s, preference)
    answered: list[Answered] = field(default_factory=list)
    # The trainer's drift lines (a change of taste detected), with when the demo saw them.
    drift_lines: list[tuple[float, str]] = field(default_factory=list)
    # Replies the server served for exploration (served_as "exploration"): the live version at
    # the server's exploration parameters, kept out of the versions' figures, which are the
    # policies' own; its mean beside theirs is exploration's cost in served reward.
    exploration: VersionStats = field(default_factory=lambda: VersionStats("exploration", 0.0))
    live_version: str = ""
    initial_version: str = ""
    _recent: deque[tuple[float, int, int]] = field(default_factory=deque)
    # When each version's latest run of live-served replies began (a canary's replies and an
    # earlier stint as live do not count): a swap seen late by the status poll is dated by it.
    _live_run_started: dict[str, float] = field(default_factory=dict)
    _last_live_served: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def record_request(
        self, version: str, rewards: list[float], feedback_events: int, served_as: str = "live"
    ) -> None:
        now = self.elapsed_s()
        with self._lock:
            self.requests += 1
            self.feedback_events += feedback_events
            self._recent.append((now, 1, feedback_events))
            if rewards:
                self.answered.append(
                    Answered(now, sum(rewards) / len(rewards), feedback_events, served_as)
                )
            if served_as == "exploration":
                self.exploration.add(rewards)
                return
            stats = self.versions.get(version)
            if stats is None:
                stats = self.versions[version] = VersionStats(version, now)
            stats.add(rewards)
            if rewards:
                self.samples.append(Served(now, version, sum(rewards) / len(rewards), served_as))
            if served_as == "live" and version != self._last_live_served:
                self._live_run_started[version] = now
                self._last_live_served = version

    def record_error(self, code: str) -> None:
        with self._lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    def observe_live(self, version: str) -> None:
        """The live version as the server reports it; a change is a swap."""
        with self._lock:
            if not self.initial_version:
                self.initial_version = version
            if self.live_version and version != self.live_version:
                # Replies from the new version may arrive before the poll notices the swap: date
                # it by the new version's current run of live replies, if one began since the
                # last swap (a version rolled back to, or a canary promoted, was seen before).
                now = self.elapsed_s()
                last_swap_s = self.swaps[-1].at_s if self.swaps else 0.0
                started = self._live_run_started.get(version, now)
                at_s = started if last_swap_s <= started <= now else now
                self.swaps.append(Swap(at_s, self.live_version, version))
            self.live_version = version

    def observe_taste_change(self, preference: str) -> None:
        with self._lock:
            self.taste_changes.append((self.elapsed_s(), preference))

    def observe_trainer_line(self, line: str) -> None:
        if line.startswith("feedloop train: drift:"):
            with self._lock:
                self.drift_lines.append((self.elapsed_s(), line.removeprefix("feedloop train: ")))
            return
        match = ROUND_RE.match(line)
        if match:
            with self._lock:
                self.rounds.append(
                    Round(self.elapsed_s(), match["round"], match["outcome"], match["rest"].strip())
                )

    def rates_per_s(self, window_s: float = 5.0) -> tuple[float, float]:
        """Requests and feedback events per second over the last window_s seconds."""
        now = self.elapsed_s()
        with self._lock:
            while self._recent and self._recent[0][0] < now - window_s:
                self._recent.popleft()
            requests = sum(r for _, r, _ in self._recent)
            events = sum(e for _, _, e in self._recent)
        span_s = min(window_s, max(now, 1e-3))
        return requests / span_s, events / span_s

    def round_counts(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for r in self.rounds:
                counts[r.outcome] = counts.get(r.outcome, 0) + 1
            return counts

    def snapshot_versions(self) -> list[VersionStats]:
        with self._lock:
            return sorted(
                (
                    VersionStats(**{k: getattr(v, k) for k in v.__dataclass_fields__})
                    for v in self.versions.values()
                ),
                key=lambda v: v.version,
            )

"""What a run served, judged on the users' taste of the moment: pure functions over the demo's
record (requests served, swaps of the live version, changes of taste).

A version's true reward is a property of the version and of the taste it is judged on, so each
phase (the stretch between two taste changes) is judged on its own: a version's reward in a
phase is the mean true reward of the requests it served in that phase, canary requests included.
The live version at a moment is the one the server reported live (the swaps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from feedloop.demo.tracker import Answered, Served, Swap


@dataclass(frozen=True)
class Phase:
    start_s: float
    end_s: float
    preference: str


@dataclass(frozen=True)
class VersionInPhase:
    version: str
    requests: int
    mean_reward: float
    first_served_s: float


@dataclass(frozen=True)
class Regression:
    """The longest stretch during which the live version's reward stayed more than `threshold`
    below the best version seen so far in the phase (0 s when it never did)."""

    threshold: float
    longest_s: float
    at_s: float  # where that stretch began (nan when there is none)
    worst_gap: float  # the largest gap seen at any moment (0 when live was always the best)


def phases_of(
    start_preference: str, taste_changes: Sequence[tuple[float, str]], end_s: float
) -> list[Phase]:
    """The run cut at each taste change."""
    starts = [(0.0, start_preference), *taste_changes]
    return [
        Phase(at_s, starts[i + 1][0] if i + 1 < len(starts) else end_s, preference)
        for i, (at_s, preference) in enumerate(starts)
    ]


def versions_in(phase: Phase, samples: Sequence[Served]) -> dict[str, VersionInPhase]:
    """Each version that served in the phase, with its mean true reward there."""
    sums: dict[str, list[float]] = {}
    for s in samples:
        if phase.start_s <= s.at_s < phase.end_s:
            entry = sums.setdefault(s.version, [0.0, 0.0, s.at_s])
            entry[0] += s.reward
            entry[1] += 1
            entry[2] = min(entry[2], s.at_s)
    return {v: VersionInPhase(v, int(n), total / n, first) for v, (total, n, first) in sums.items()}


def live_at(initial: str, swaps: Sequence[Swap], at_s: float) -> str:
    """The version live at a moment, from the first live version and the swaps after it."""
    live = initial
    for swap in sorted(swaps, key=lambda w: w.at_s):
        if swap.at_s > at_s:
            break
        live = swap.live
    return live


def live_reward_timeline(
    samples: Sequence[Served], bucket_s: float, end_s: float
) -> list[tuple[float, float, int]]:
    """(bucket start, mean true reward of live-served requests, requests) per bucket_s."""
    buckets = max(1, math.ceil(end_s / bucket_s))
    sums = [[0.0, 0] for _ in range(buckets)]
    for s in samples:
        if s.served_as == "live" and 0 <= s.at_s < end_s:
            bucket = sums[min(int(s.at_s // bucket_s), buckets - 1)]
            bucket[0] += s.reward
            bucket[1] += 1
    return [
        (i * bucket_s, total / n if n else math.nan, int(n)) for i, (total, n) in enumerate(sums)
    ]


def regression(
    phases: Sequence[Phase],
    samples: Sequence[Served],
    initial: str,
    swaps: Sequence[Swap],
    *,
    threshold: float = 0.05,
    min_requests: int = 40,
    step_s: float = 1.0,
) -> Regression:
    """Scan the run every step_s: the gap between the best version served so far in the phase
    (with at least min_requests there) and the live version; the longest stretch above threshold.
    A live version with too few requests in the phase to be judged counts as no gap."""
    longest, longest_at, run_start, worst = 0.0, math.nan, None, 0.0
    for phase in phases:
        versions = {
            v: stats
            for v, stats in versions_in(phase, samples).items()
            if stats.requests >= min_requests
        }
        t = phase.start_s
        while t < phase.end_s:
            seen = [s.mean_reward for s in versions.values() if s.first_served_s <= t]
            live = versions.get(live_at(initial, swaps, t))
            gap = max(seen) - live.mean_reward if seen and live is not None else 0.0
            worst = max(worst, gap)
            if gap > threshold:
                run_start = t if run_start is None else run_start
                if t + step_s - run_start > longest:
                    longest, longest_at = t + step_s - run_start, run_start
            else:
                run_start = None
            t += step_s
        run_start = None  # a stretch does not carry over a change of taste
    return Regression(threshold, longest, longest_at, worst)


# -- what users were served, over time (issue 21's drift figures) -------------------------------


@dataclass(frozen=True)
class Bucket:
    """Requests answered in [start_s, end_s), exploration included: their mean true reward
    (nan without requests) and the feedback events they brought."""

    start_s: float
    end_s: float
    mean_reward: float
    requests: int
    feedback_events: int


def served_buckets(
    answered: Sequence[Answered], start_s: float, end_s: float, bucket_s: float
) -> list[Bucket]:
    """What users were served in consecutive buckets from start_s (the last one may be short)."""
    if bucket_s <= 0:
        raise ValueError(f"bucket_s must be positive, got {bucket_s}")
    count = max(0, math.ceil((end_s - start_s) / bucket_s - 1e-9))
    sums = [[0.0, 0, 0] for _ in range(count)]
    for a in answered:
        if start_s <= a.at_s < end_s:
            entry = sums[min(int((a.at_s - start_s) // bucket_s), count - 1)]
            entry[0] += a.reward
            entry[1] += 1
            entry[2] += a.feedback_events
    return [
        Bucket(
            start_s + i * bucket_s,
            min(end_s, start_s + (i + 1) * bucket_s),
            total / n if n else math.nan,
            int(n),
            int(events),
        )
        for i, (total, n, events) in enumerate(sums)
    ]


def served_mean(answered: Sequence[Answered], start_s: float, end_s: float) -> float:
    """Mean true reward of what users were served in [start_s, end_s) (nan when nothing)."""
    rewards = [a.reward for a in answered if start_s <= a.at_s < end_s]
    return sum(rewards) / len(rewards) if rewards else math.nan


@dataclass(frozen=True)
class Reached:
    """When the served rate first reached a level after a change: seconds from the change to
    the end of the first bucket at or above it, and the feedback events until then; None for
    both when it did not within the measured span (`within_s`)."""

    level: float
    after_s: float | None
    events: int | None
    within_s: float

    def describe(self) -> str:
        if self.after_s is None:
            return f"{self.level:.3f} not reached in {self.within_s:.0f} s"
        return f"{self.level:.3f} reached after {self.after_s:.0f} s and {self.events:,} events"


def first_reaching(buckets: Sequence[Bucket], level: float) -> Reached:
    """The first bucket (of those after a change, the first starting at it) whose mean reaches
    level."""
    if not buckets:
        return Reached(level, None, None, 0.0)
    start = buckets[0].start_s
    events = 0
    for b in buckets:
        events += b.feedback_events
        if b.requests and b.mean_reward >= level:
            return Reached(level, b.end_s - start, events, buckets[-1].end_s - start)
    return Reached(level, None, None, buckets[-1].end_s - start)


@dataclass(frozen=True)
class Below:
    """How the served rate stood against a level after a change: the worst bucket, the longest
    run of consecutive buckets below the level and all buckets below it, in seconds."""

    level: float
    worst: float
    worst_at_s: float  # seconds from the change to the worst bucket's start
    longest_s: float
    total_s: float


def time_below(buckets: Sequence[Bucket], level: float) -> Below:
    measured = [b for b in buckets if b.requests]
    if not measured:
        return Below(level, math.nan, math.nan, 0.0, 0.0)
    start = buckets[0].start_s
    worst = min(measured, key=lambda b: b.mean_reward)
    longest = run = total = 0.0
    for b in buckets:
        if b.requests and b.mean_reward < level:
            run += b.end_s - b.start_s
            total += b.end_s - b.start_s
            longest = max(longest, run)
        elif b.requests:
            run = 0.0
    return Below(level, worst.mean_reward, worst.start_s - start, longest, total)

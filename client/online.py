"""The online report's results (ModelAdmin.GetOnlineReport): users' feedback by model version,
each figure with its confidence sequence, as plain frozen dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from feedloop.client.types import TrialInfo, time_of
from feedloop.v1 import feedloop_pb2 as pb


@dataclass(frozen=True)
class OnlineEstimate:
    """A mean and the interval [low, high] that covers the true value at level 1 - alpha at
    every count at once (a confidence sequence), so it may be watched as it narrows."""

    count: int  # rated generations, or pairs for a win rate
    mean: float | None  # None without observations
    low: float
    high: float

    @classmethod
    def from_proto(cls, estimate: pb.OnlineEstimate) -> OnlineEstimate:
        mean = None if estimate.count == 0 or math.isnan(estimate.mean) else estimate.mean
        return cls(estimate.count, mean, estimate.low, estimate.high)


@dataclass(frozen=True)
class VersionOnline:
    """What users' feedback in the window says about one version."""

    version: str
    role: str  # "live", the trial's mode ("canary" or "shadow"), or "" for neither
    rating: OnlineEstimate  # mean rating normalised to [-1, 1], one per rated generation
    win_rates: dict[str, OnlineEstimate]  # share of pairs won, by opponent version
    # The ratings discounted by age when the report was asked with a half-life (None without):
    # the weighted mean, with its discounted confidence sequence.
    recent_rating: OnlineEstimate | None = None

    @classmethod
    def from_proto(cls, report: pb.VersionOnlineReport, trial: TrialInfo | None) -> VersionOnline:
        role = "live" if report.live else (trial.mode if report.on_trial and trial else "")
        recent = report.recent_rating if report.HasField("recent_rating") else None
        return cls(
            report.version,
            role,
            OnlineEstimate.from_proto(report.rating),
            {w.opponent_version: OnlineEstimate.from_proto(w.estimate) for w in report.win_rates},
            None if recent is None else OnlineEstimate.from_proto(recent),
        )


@dataclass(frozen=True)
class TrialComparisonInfo:
    """The trial against live on the ratings since the trial began (what the trainer judges)."""

    trial_version: str
    live_version: str
    trial_age_s: float
    trial_rating: OnlineEstimate
    live_rating: OnlineEstimate
    difference: OnlineEstimate  # trial minus live
    shadow: ShadowEstimateInfo | None = None  # a shadow trial's off-policy estimate


@dataclass(frozen=True)
class ShadowEstimateInfo:
    """A shadow version's mean rating, off-policy, from the rated live generations it scored:
    `low` holds at every look at 1 - alpha (clipped importance sampling); `mean` is the
    self-normalised point estimate (None without scores)."""

    count: int
    low: float
    mean: float | None
    live_mean: float | None
    effective_count: float
    clipped_share: float
    max_weight: float

    @classmethod
    def from_proto(cls, e: pb.ShadowOffPolicyEstimate) -> ShadowEstimateInfo:
        def number(x: float) -> float | None:
            return None if e.count == 0 or math.isnan(x) else x

        return cls(
            e.count,
            e.low,
            number(e.mean),
            number(e.live_mean),
            e.effective_count,
            e.clipped_share,
            e.max_weight,
        )


@dataclass(frozen=True)
class OnlineReportResult:
    since: datetime | None  # the window: feedback received in [since, until)
    until: datetime | None
    alpha: float
    versions: tuple[VersionOnline, ...]  # live first, then the trial, then newest first
    live_version: str
    trial: TrialInfo | None
    trial_comparison: TrialComparisonInfo | None

    @classmethod
    def from_proto(cls, reply: pb.OnlineReport) -> OnlineReportResult:
        trial = TrialInfo.from_proto(reply.trial, reply.HasField("trial"))
        comparison = None
        if reply.HasField("trial_comparison"):
            c = reply.trial_comparison
            comparison = TrialComparisonInfo(
                c.trial_version,
                c.live_version,
                c.trial_age_s,
                OnlineEstimate.from_proto(c.trial_rating),
                OnlineEstimate.from_proto(c.live_rating),
                OnlineEstimate.from_proto(c.difference),
                ShadowEstimateInfo.from_proto(c.shadow) if c.HasField("shadow") else None,
            )
        return cls(
            since=time_of(reply.since, reply.HasField("since")),
            until=time_of(reply.until, reply.HasField("until")),
            alpha=reply.alpha,
            versions=tuple(VersionOnline.from_proto(v, trial) for v in reply.versions),
            live_version=reply.live_version,
            trial=trial,
            trial_comparison=comparison,
        )


def online_report_request(
    window_s: float | None,
    alpha: float | None,
    versions: Sequence[str],
    half_life_s: float | None = None,
) -> pb.GetOnlineReportRequest:
    """None: the server's default (the last hour, alpha 0.05, no discounted rating)."""
    return pb.GetOnlineReportRequest(
        window_s=window_s or 0.0,
        alpha=alpha or 0.0,
        versions=list(versions),
        half_life_s=half_life_s or 0.0,
    )

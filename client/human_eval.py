"""Human evaluation through the client: verdicts to send (Feedback.SubmitVerdict) and the report
(ModelAdmin.GetHumanEvaluation), as plain frozen dataclasses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from feedloop.client.types import new_event_id
from feedloop.v1 import feedloop_pb2 as pb

# A verdict's choice by name: A better, B better, a tie, both bad.
CHOICES = {
    "a": pb.VERDICT_CHOICE_A,
    "b": pb.VERDICT_CHOICE_B,
    "tie": pb.VERDICT_CHOICE_TIE,
    "both_bad": pb.VERDICT_CHOICE_BOTH_BAD,
}


@dataclass(frozen=True)
class Verdict:
    """One rater's blind verdict on version A's and version B's candidates for one prompt."""

    session_id: str
    version_a: str
    generation_id_a: str
    version_b: str
    generation_id_b: str
    choice: str  # "a", "b", "tie" or "both_bad"
    a_shown_left: bool
    verdict_id: str | None = None  # made (uuid4) before the first attempt when None

    def to_proto(self) -> pb.EvaluationVerdict:
        if self.choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {self.choice!r}")
        return pb.EvaluationVerdict(
            verdict_id=self.verdict_id or new_event_id(),
            session_id=self.session_id,
            version_a=self.version_a,
            generation_id_a=self.generation_id_a,
            version_b=self.version_b,
            generation_id_b=self.generation_id_b,
            choice=CHOICES[self.choice],
            a_shown_left=self.a_shown_left,
        )


@dataclass(frozen=True)
class EvaluationTally:
    """Verdicts on A against B and A's win rate (ties and both-bads count half) with its Wilson
    interval at level 1 - alpha; rater "" for the overall tally."""

    rater: str
    verdicts: int
    a_wins: int
    b_wins: int
    ties: int
    both_bad: int
    a_win_rate: float | None  # None without verdicts
    low: float
    high: float
    a_shown_left: int

    @classmethod
    def from_proto(cls, t: pb.HumanEvaluationTally) -> EvaluationTally:
        rate = None if t.verdicts == 0 or math.isnan(t.a_win_rate) else t.a_win_rate
        return cls(
            t.rater,
            t.verdicts,
            t.a_wins,
            t.b_wins,
            t.ties,
            t.both_bad,
            rate,
            t.low,
            t.high,
            t.a_shown_left,
        )


@dataclass(frozen=True)
class HumanEvaluationResult:
    version_a: str
    version_b: str
    alpha: float
    overall: EvaluationTally
    raters: tuple[EvaluationTally, ...]
    sessions: int

    @classmethod
    def from_proto(cls, reply: pb.HumanEvaluationReport) -> HumanEvaluationResult:
        return cls(
            reply.version_a,
            reply.version_b,
            reply.alpha,
            EvaluationTally.from_proto(reply.overall),
            tuple(EvaluationTally.from_proto(t) for t in reply.raters),
            reply.sessions,
        )


def _rate(t: EvaluationTally) -> str:
    if t.a_win_rate is None:
        return "-"
    return f"{t.a_win_rate:.3f} [{t.low:.3f}, {t.high:.3f}]"


def human_evaluation_text(result: HumanEvaluationResult) -> str:
    """The `feedloop human-eval` table: overall first, then each rater."""
    header = (
        f"human evaluation of {result.version_a} (A) against {result.version_b} (B): "
        f"{result.overall.verdicts} verdicts from {len(result.raters)} raters in "
        f"{result.sessions} sessions\nA's win rate counts a tie or both-bad as half a win; "
        f"Wilson interval at {(1 - result.alpha) * 100:g}%"
    )
    rows = [("overall", result.overall), *((t.rater, t) for t in result.raters)]
    widths = [max(len(name) for name, _ in rows), 8, 6, 6, 5, 8, 26]
    titles = ("rater", "verdicts", "A wins", "B wins", "ties", "both bad", "A win rate")
    lines = ["  ".join(t.ljust(w) for t, w in zip(titles, widths, strict=True)).rstrip()]
    for name, t in rows:
        cells = (name, t.verdicts, t.a_wins, t.b_wins, t.ties, t.both_bad, _rate(t))
        lines.append(
            "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        )
    return header + "\n\n" + "\n".join(lines)

"""Human evaluation, pure: raters' blind verdicts on two versions, tallied into a win rate.

A verdict compares version A's candidate with version B's for one prompt: A better, B better,
a tie, or both bad. A's win rate is (A's wins + half the ties and both-bads) / verdicts: a tie
and a both-bad prefer neither version, so each is half a win for each side (as a draw scores half
a point in chess). Its interval is the Wilson score interval
(Wilson, 1927), which keeps close to its nominal coverage for small counts and rates near 0 or 1
where the normal ("Wald") interval does not (Brown, Cai and DasGupta, 2001). Half-wins make the
count of successes fractional; the interval formula takes the proportion as it is.

Verdicts are stored as given (A and B as the rater's session named them); a report on (X, Y)
reads verdicts on (Y, X) too, mirrored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

A_BETTER, B_BETTER, TIE, BOTH_BAD = "a", "b", "tie", "both_bad"
CHOICES = (A_BETTER, B_BETTER, TIE, BOTH_BAD)
# What the same verdict says with A and B swapped.
MIRRORED = {A_BETTER: B_BETTER, B_BETTER: A_BETTER, TIE: TIE, BOTH_BAD: BOTH_BAD}


@dataclass(frozen=True)
class VerdictRecord:
    """One stored verdict (`feedloop.v1.EvaluationVerdict` as the server accepted it)."""

    verdict_id: str
    session_id: str
    rater: str
    version_a: str
    generation_id_a: str
    version_b: str
    generation_id_b: str
    choice: str  # one of CHOICES
    a_shown_left: bool
    prompt: str
    received_at: float
    given_at: float | None = None

    def facing(self, version_a: str) -> VerdictRecord:
        """The same verdict with `version_a` as A (mirrored if it was B)."""
        if self.version_a == version_a:
            return self
        return VerdictRecord(
            self.verdict_id,
            self.session_id,
            self.rater,
            self.version_b,
            self.generation_id_b,
            self.version_a,
            self.generation_id_a,
            MIRRORED[self.choice],
            not self.a_shown_left,
            self.prompt,
            self.received_at,
            self.given_at,
        )


def wilson_interval(successes: float, n: int, alpha: float) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n at confidence 1 - alpha.

    p̂ = s/n, z = Φ⁻¹(1 - α/2); centre (p̂ + z²/2n) / (1 + z²/n), half-width
    z / (1 + z²/n) · sqrt(p̂(1 - p̂)/n + z²/4n²). n = 0: the whole range [0, 1].
    """
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


@dataclass(frozen=True)
class Tally:
    """Verdicts on A against B (one rater's, or everyone's: rater "")."""

    rater: str
    a_wins: int = 0
    b_wins: int = 0
    ties: int = 0
    both_bad: int = 0
    a_shown_left: int = 0

    @property
    def verdicts(self) -> int:
        return self.a_wins + self.b_wins + self.ties + self.both_bad

    @property
    def a_win_rate(self) -> float:
        """(A's wins + half the ties and both-bads) / verdicts; NaN without verdicts."""
        if self.verdicts == 0:
            return math.nan
        return (self.a_wins + 0.5 * (self.ties + self.both_bad)) / self.verdicts

    def interval(self, alpha: float) -> tuple[float, float]:
        successes = self.a_wins + 0.5 * (self.ties + self.both_bad)
        return wilson_interval(successes, self.verdicts, alpha)

    def add(self, choice: str, a_shown_left: bool) -> Tally:
        return Tally(
            self.rater,
            self.a_wins + (choice == A_BETTER),
            self.b_wins + (choice == B_BETTER),
            self.ties + (choice == TIE),
            self.both_bad + (choice == BOTH_BAD),
            self.a_shown_left + a_shown_left,
        )


@dataclass(frozen=True)
class HumanEvaluation:
    """Every verdict on version_a against version_b: overall, per rater, and the sessions."""

    version_a: str
    version_b: str
    overall: Tally
    raters: tuple[Tally, ...]
    sessions: int


def tally_verdicts(
    verdicts: Iterable[VerdictRecord], version_a: str, version_b: str
) -> HumanEvaluation:
    """The evaluation of version_a against version_b from stored verdicts (others ignored)."""
    overall = Tally("")
    raters: dict[str, Tally] = {}
    sessions: set[str] = set()
    for record in verdicts:
        if {record.version_a, record.version_b} != {version_a, version_b}:
            continue
        facing = record.facing(version_a)
        overall = overall.add(facing.choice, facing.a_shown_left)
        raters[record.rater] = raters.get(record.rater, Tally(record.rater)).add(
            facing.choice, facing.a_shown_left
        )
        sessions.add(record.session_id)
    return HumanEvaluation(
        version_a,
        version_b,
        overall,
        tuple(raters[name] for name in sorted(raters)),
        len(sessions),
    )

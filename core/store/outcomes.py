"""The store's online report: users' feedback in a time range, tallied by the model version that
served each generation it names (the evidence the trainer's promotions and rollbacks rest on).

Both backends answer `ReplayStore.online_outcomes` with one query that joins each feedback event
received in the range to its generations' versions, one row per (event, generation), and tally
the rows here, so the two backends count alike:
- ratings: normalised to [-1, 1] (`normalise_rating`, the trainer's mapping), several events on
  one generation combined by their mean, so a generation rated twice counts once;
- comparisons and rankings: each implied pair (preferred over rejected; a ranking of n, best
  first, implies n(n-1)/2) whose two generations were served by different versions is a win for
  one version against the other. Pairs within one version say nothing about versions.
Corrections rate nothing and are left out.
Generations served for exploration (served_as "exploration") are left out too, unless their
version is among `explored`: a version's online figures are those of its own policy, and a
canary is never explored, so counting the live version sampled at the exploration temperature
would tilt every trial towards the canary. The versions the caller names in `explored` are those
whose exploration traffic is their own policy: an older version (or the reference) the server
serves for a part of the exploration share (feedloop.core.exploration), which is what keeps the
evidence about it current. Those rows also include what the version served at the exploration
temperature while it was live, rated lower: the bias is against bringing it back, not for.

With a `discount` (feedloop.core.discount), each rated generation also weighs the discount
weight of its latest rating's receipt time, and the weighted sums ride beside the plain ones
(feedloop.core.online_eval reads them). Comparisons and rankings are counted, not discounted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from itertools import combinations, groupby
from typing import NamedTuple

from feedloop.core.discount import Discount
from feedloop.core.feedback_kinds import normalise_rating

# The feedback kinds the report reads (the SQL of both backends filters on them).
JUDGING_KINDS = ("rating", "comparison", "ranking")
# core.store.base.SERVED_EXPLORATION (base imports this module, so it is spelled here too).
EXPLORATION = "exploration"


@dataclass(frozen=True)
class VersionOutcomes:
    """One model version's online feedback in a time range."""

    version: str
    ratings: int = 0  # rated generations (events combined per generation by mean)
    rating_sum: float = 0.0  # of normalised ratings in [-1, 1]
    rating_sum_sq: float = 0.0
    # Comparison and ranking pairs won and lost against each other version, by that version.
    wins: dict[str, int] = field(default_factory=dict)
    losses: dict[str, int] = field(default_factory=dict)
    # The ratings' discounted tally (None: tallied without a discount, every weight 1): sums of
    # the weights w, of w^2 and of w times the normalised rating.
    discount: Discount | None = None
    rating_weight: float = 0.0
    rating_weight_sq: float = 0.0
    weighted_rating_sum: float = 0.0

    @property
    def mean(self) -> float:
        """The mean normalised rating, discounted when tallied with a discount (nan: none)."""
        if self.discount is not None:
            w = self.rating_weight
            return self.weighted_rating_sum / w if w > 0 else math.nan
        return self.rating_sum / self.ratings if self.ratings else math.nan


class JudgedGeneration(NamedTuple):
    """One generation named by one feedback event, with the version that served it."""

    event_seq: int
    kind: str
    score: float | None  # rating only
    scale: str | None  # rating only
    position: int  # in the event's generation_ids: ranking best first, comparison preferred first
    generation_id: str
    model_version: str
    received_at: float = 0.0  # the event's, Unix seconds
    served_as: str = ""  # the generation's (core.store.base SERVED_*)


class RatedGeneration(NamedTuple):
    version: str
    rating: float  # mean normalised rating of its rating events
    latest_at: float  # when its latest rating was received


class ShadowEvidence(NamedTuple):
    """A rated generation of the live version, scored by a version on shadow trial: the
    importance ratio exp(shadow_logprob - behaviour_logprob) is exact (both are log-probabilities
    of the same output under each version's sampling distribution)."""

    generation_id: str
    rating: float  # normalised to [-1, 1], several ratings combined by their mean
    behaviour_logprob: float  # of the whole output under the version that served it
    shadow_logprob: float  # of the same output under the shadow version (-inf: impossible)


def _events(rows: Iterable[JudgedGeneration]) -> Iterable[list[JudgedGeneration]]:
    for _, event_rows in groupby(rows, key=lambda row: row.event_seq):
        yield sorted(event_rows, key=lambda row: row.position)


def counted(
    rows: Iterable[JudgedGeneration], explored: Collection[str] = ()
) -> list[JudgedGeneration]:
    """The rows that count for their version: exploration rows only of `explored` versions."""
    return [r for r in rows if r.served_as != EXPLORATION or r.model_version in explored]


def _rated(rows: Iterable[JudgedGeneration]) -> dict[str, RatedGeneration]:
    ratings: dict[str, list[float]] = defaultdict(list)
    version_of: dict[str, str] = {}
    latest_at: dict[str, float] = {}
    for judged in _events(rows):
        first = judged[0]
        if first.kind == "rating" and first.score is not None:
            g = first.generation_id
            ratings[g].append(normalise_rating(first.score, first.scale))
            version_of[g] = first.model_version
            latest_at[g] = max(latest_at.get(g, first.received_at), first.received_at)
    return {
        g: RatedGeneration(version_of[g], sum(scores) / len(scores), latest_at[g])
        for g, scores in ratings.items()
    }


def rated_generations(
    rows: Iterable[JudgedGeneration], explored: Collection[str] = ()
) -> dict[str, tuple[str, float]]:
    """Each rated generation's (model version, mean normalised rating) from these rows
    (exploration rows only of `explored` versions)."""
    return {g: (r.version, r.rating) for g, r in _rated(counted(rows, explored)).items()}


def tally_outcomes(
    rows: Iterable[JudgedGeneration],
    versions: Collection[str] | None = None,
    *,
    discount: Discount | None = None,
    explored: Collection[str] = (),
) -> dict[str, VersionOutcomes]:
    """Per-version outcomes of these rows (ordered by event, then position).

    versions: report only these, each one even without feedback; None: every version with some.
    discount: also tally the ratings discounted by age; explored: versions whose exploration
    rows count as their own policy's (module docstring).
    """
    rows = counted(rows, explored)
    wins: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    losses: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for judged in _events(rows):
        if judged[0].kind == "rating":
            continue
        for better, worse in combinations(judged, 2):
            if better.model_version != worse.model_version:
                wins[better.model_version][worse.model_version] += 1
                losses[worse.model_version][better.model_version] += 1

    # per version: one (mean rating, discount weight) per rated generation
    means: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for rated in _rated(rows).values():
        weight = discount.weight(rated.latest_at) if discount is not None else 1.0
        means[rated.version].append((rated.rating, weight))
    reported = set(means) | set(wins) | set(losses) if versions is None else set(versions)
    outcomes = {}
    for version in sorted(reported):
        pairs = means.get(version, [])
        outcomes[version] = VersionOutcomes(
            version,
            len(pairs),
            sum(m for m, _ in pairs),
            sum(m * m for m, _ in pairs),
            dict(wins.get(version, {})),
            dict(losses.get(version, {})),
            discount,
            sum(w for _, w in pairs) if discount is not None else 0.0,
            sum(w * w for _, w in pairs) if discount is not None else 0.0,
            sum(w * m for m, w in pairs) if discount is not None else 0.0,
        )
    return outcomes

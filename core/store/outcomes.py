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
Generations served for exploration (served_as "exploration": the live version sampled with the
server's exploration parameters) are left out too: a version's online figures are those of its
own policy, and a canary is never explored, so counting them would tilt every trial towards it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from itertools import combinations, groupby
from typing import NamedTuple

from feedloop.core.feedback_kinds import normalise_rating

# The feedback kinds the report reads (the SQL of both backends filters on them).
JUDGING_KINDS = ("rating", "comparison", "ranking")


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


class JudgedGeneration(NamedTuple):
    """One generation named by one feedback event, with the version that served it."""

    event_seq: int
    kind: str
    score: float | None  # rating only
    scale: str | None  # rating only
    position: int  # in the event's generation_ids: ranking best first, comparison preferred first
    generation_id: str
    model_version: str


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


def rated_generations(rows: Iterable[JudgedGeneration]) -> dict[str, tuple[str, float]]:
    """Each rated generation's (model version, mean normalised rating) from these rows."""
    ratings: dict[str, list[float]] = defaultdict(list)
    version_of: dict[str, str] = {}
    for judged in _events(rows):
        first = judged[0]
        if first.kind == "rating" and first.score is not None:
            ratings[first.generation_id].append(normalise_rating(first.score, first.scale))
            version_of[first.generation_id] = first.model_version
    return {g: (version_of[g], sum(scores) / len(scores)) for g, scores in ratings.items()}


def tally_outcomes(
    rows: Iterable[JudgedGeneration], versions: Collection[str] | None = None
) -> dict[str, VersionOutcomes]:
    """Per-version outcomes of these rows (ordered by event, then position).

    versions: report only these, each one even without feedback; None: every version with some.
    """
    rows = list(rows)
    wins: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    losses: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for judged in _events(rows):
        if judged[0].kind == "rating":
            continue
        for better, worse in combinations(judged, 2):
            if better.model_version != worse.model_version:
                wins[better.model_version][worse.model_version] += 1
                losses[worse.model_version][better.model_version] += 1

    means: dict[str, list[float]] = defaultdict(list)  # per version: one per rated generation
    for version, mean in rated_generations(rows).values():
        means[version].append(mean)
    reported = set(means) | set(wins) | set(losses) if versions is None else set(versions)
    outcomes = {}
    for version in sorted(reported):
        rated = means.get(version, [])
        outcomes[version] = VersionOutcomes(
            version,
            len(rated),
            sum(rated),
            sum(m * m for m in rated),
            dict(wins.get(version, {})),
            dict(losses.get(version, {})),
        )
    return outcomes

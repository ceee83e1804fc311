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


def tally_outcomes(
    rows: Iterable[JudgedGeneration], versions: Collection[str] | None = None
) -> dict[str, VersionOutcomes]:
    """Per-version outcomes of these rows (ordered by event, then position).

    versions: report only these, each one even without feedback; None: every version with some.
    """
    ratings: dict[str, list[float]] = defaultdict(list)
    version_of: dict[str, str] = {}
    wins: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    losses: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for _, event_rows in groupby(rows, key=lambda row: row.event_seq):
        judged = sorted(event_rows, key=lambda row: row.position)
        first = judged[0]
        if first.kind == "rating":
            if first.score is not None:
                ratings[first.generation_id].append(normalise_rating(first.score, first.scale))
                version_of[first.generation_id] = first.model_version
            continue
        for better, worse in combinations(judged, 2):
            if better.model_version != worse.model_version:
                wins[better.model_version][worse.model_version] += 1
                losses[worse.model_version][better.model_version] += 1

    means: dict[str, list[float]] = defaultdict(list)  # per version: one per rated generation
    for generation_id, scores in ratings.items():
        means[version_of[generation_id]].append(sum(scores) / len(scores))
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

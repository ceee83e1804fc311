"""From feedback events to learning signals: scalar rewards, preference pairs, corrections.

The trainer's one owner of what feedback means:
- a rating is normalised from its scale to [-1, 1] (`feedloop.core.feedback_kinds`);
- several ratings of one generation combine by a declared rule (mean, earliest, latest, sum);
- no client's events may carry more than `client_share_cap` of a round's feedback weight;
- comparisons, rankings (every pair they imply), corrections (the corrected phrase over the
  original) and ratings of candidates of one request (the better rated over the worse) become
  preference pairs for the Bradley-Terry reward model;
- corrections also become supervised targets;
- declared rebalancing: rating classes (liked, disliked, neutral) and feedback kinds reweighted
  by inverse frequency to a declared power, and training data discounted by a declared half-life;
- the window's ratings by arm (exploration or policy): exploration's cost in served reward.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from feedloop.core.feedback_kinds import normalise_rating
from feedloop.core.store.base import SERVED_EXPLORATION, FeedbackRecord, GenerationRecord

# A rating pair is formed only when two ratings differ by at least this much on [-1, 1]: a
# smaller gap is within the noise of one user's hand.
RATING_PAIR_MIN_GAP = 0.25


def event_time(event: FeedbackRecord) -> float:
    """When the user gave the event: the app's time if it said, else the server's receipt."""
    return event.given_at if event.given_at is not None else event.received_at


# An event's identity: its id is unique only within its client (tenant), whose ids are its own.
EventKey = tuple[str, str]
Item = TypeVar("Item", bound=Hashable)


def event_key(event: FeedbackRecord) -> EventKey:
    """(client_id, event_id): the key of an event's weight."""
    return (event.client_id, event.event_id)


def client_weights(events: Sequence[FeedbackRecord], cap: float) -> dict[EventKey, float]:
    """Per-event weights (by event_key) so that no client carries more than `cap` of the total
    weight.

    Water-filling: the k largest clients are cut to exactly `cap` of the total each, the rest
    keep weight 1. With too few clients for any client to fit under the cap (k * cap >= 1),
    every client gets the same total weight, the closest one can come.
    """
    by_client: dict[str, int] = defaultdict(int)
    for e in events:
        by_client[e.client_id] += 1
    counts = sorted(by_client.items(), key=lambda kv: -kv[1])
    factor = {client: 1.0 for client in by_client}
    if cap >= 1.0 or not counts:
        return {event_key(e): 1.0 for e in events}
    for k in range(len(counts)):
        if k * cap >= 1.0:
            break
        uncapped = sum(n for _, n in counts[k:])
        total = uncapped / (1.0 - k * cap)
        if all(n <= cap * total + 1e-9 for _, n in counts[k:]):
            for client, n in counts[:k]:
                factor[client] = cap * total / n
            return {event_key(e): factor[e.client_id] for e in events}
    mean_count = sum(by_client.values()) / len(counts)
    factor = {client: mean_count / n for client, n in counts}
    return {event_key(e): factor[e.client_id] for e in events}


@dataclass(frozen=True)
class RatedGeneration:
    """The combined explicit reward of one generation, in [-1, 1] (sum may leave it)."""

    reward: float
    weight: float
    events: int


def aggregate(values: Sequence[tuple[float, float, float]], rule: str) -> float:
    """Combine (time, value, weight) triples by rule: mean (weighted), earliest, latest, sum."""
    if not values:
        raise ValueError("nothing to aggregate")
    if rule == "mean":
        total = sum(w for _, _, w in values)
        return sum(v * w for _, v, w in values) / total if total > 0 else 0.0
    if rule == "sum":
        return sum(v * w for _, v, w in values)
    if rule == "earliest":
        return min(values, key=lambda x: x[0])[1]
    if rule == "latest":
        return max(values, key=lambda x: x[0])[1]
    raise ValueError(f"unknown aggregation rule {rule!r} (mean, earliest, latest, sum)")


def rated_generations(
    events: Iterable[FeedbackRecord], weights: Mapping[EventKey, float], rule: str
) -> dict[str, RatedGeneration]:
    """Explicit rewards from ratings, one per rated generation."""
    per_generation: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for e in events:
        if e.kind == "rating" and e.score is not None and e.generation_ids:
            value = normalise_rating(e.score, e.scale)
            per_generation[e.generation_ids[0]].append(
                (event_time(e), value, weights.get(event_key(e), 1.0))
            )
    return {
        gid: RatedGeneration(
            aggregate(values, rule), sum(w for _, _, w in values) / len(values), len(values)
        )
        for gid, values in per_generation.items()
    }


@dataclass(frozen=True)
class PreferencePair:
    """One preference: `preferred_text` over `rejected_text` for the same prompt."""

    prompt: str
    preferred_text: str
    rejected_text: str
    weight: float
    source: str  # comparison, ranking, correction, rating
    key: str  # the event (or generation pair) it came from: decides held-out membership
    # The logged generations the pair names: a pair naming one that the gate holds out is
    # never trained on, or the gate would judge the reward model on what it fitted.
    generation_ids: tuple[str, ...] = ()


def preference_pairs(
    events: Iterable[FeedbackRecord],
    generations: Mapping[str, GenerationRecord],
    weights: Mapping[EventKey, float],
    rated: Mapping[str, RatedGeneration],
) -> list[PreferencePair]:
    """Every preference the events imply, over generations present in `generations`."""
    pairs: list[PreferencePair] = []

    def add(
        better: GenerationRecord,
        worse_text: str,
        better_text: str,
        w: float,
        src: str,
        key: str,
        ids: tuple[str, ...],
    ) -> None:
        pairs.append(PreferencePair(better.prompt, better_text, worse_text, w, src, key, ids))

    for e in events:
        w = weights.get(event_key(e), 1.0)
        ids = [g for g in e.generation_ids if g in generations]
        if e.kind == "comparison" and len(e.generation_ids) == 2 and len(ids) == 2:
            first, second = generations[ids[0]], generations[ids[1]]
            add(first, second.text, first.text, w, "comparison", e.event_id, (ids[0], ids[1]))
        elif e.kind == "ranking" and len(ids) >= 2:
            ranked = [generations[g] for g in e.generation_ids if g in generations]
            # A ranking of n weighs like n - 1 comparisons: its Plackett-Luce likelihood is n - 1
            # successive choices (best of n, best of the n - 1 left, ...), each one comparison's
            # worth of evidence. Spread over the n (n - 1) / 2 pairs it implies: 2 / n each.
            share = 2.0 * w / len(ranked)
            for i, better in enumerate(ranked):
                for worse in ranked[i + 1 :]:
                    add(
                        better,
                        worse.text,
                        better.text,
                        share,
                        "ranking",
                        e.event_id,
                        (better.generation_id, worse.generation_id),
                    )
        elif e.kind == "correction" and e.text and ids:
            original = generations[ids[0]]
            if e.text.strip().lower() != original.text.strip().lower():
                add(original, original.text, e.text, w, "correction", e.event_id, (ids[0],))
    by_request: dict[str, list[str]] = defaultdict(list)
    for gid in rated:
        if gid in generations:
            by_request[generations[gid].request_id].append(gid)
    for gids in by_request.values():
        for i, a in enumerate(gids):
            for b in gids[i + 1 :]:
                gap = rated[a].reward - rated[b].reward
                if abs(gap) >= RATING_PAIR_MIN_GAP:
                    better_id, worse_id = (a, b) if gap > 0 else (b, a)
                    w = min(rated[a].weight, rated[b].weight)
                    add(
                        generations[better_id],
                        generations[worse_id].text,
                        generations[better_id].text,
                        w,
                        "rating",
                        f"{better_id}>{worse_id}",
                        (better_id, worse_id),
                    )
    return pairs


@dataclass(frozen=True)
class CorrectionTarget:
    """A supervised target: the user's corrected phrase for a prompt."""

    prompt: str
    text: str
    weight: float


def correction_targets(
    events: Iterable[FeedbackRecord],
    generations: Mapping[str, GenerationRecord],
    weights: Mapping[EventKey, float],
) -> list[CorrectionTarget]:
    out = []
    for e in events:
        if (
            e.kind == "correction"
            and e.text
            and e.generation_ids
            and e.generation_ids[0] in generations
        ):
            out.append(
                CorrectionTarget(
                    generations[e.generation_ids[0]].prompt, e.text, weights.get(event_key(e), 1.0)
                )
            )
    return out


def feedback_kinds(events: Iterable[FeedbackRecord]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        counts[e.kind] += 1
    return dict(counts)


def rating_class(event: FeedbackRecord) -> str | None:
    """A rating's class, from its normalised value: liked (> 0), disliked (< 0) or neutral;
    None for any other kind of event."""
    if event.kind != "rating" or event.score is None:
        return None
    value = normalise_rating(event.score, event.scale)
    return "liked" if value > 0 else "disliked" if value < 0 else "neutral"


def balance_weights(
    labels: Mapping[Item, str], power: float
) -> tuple[dict[Item, float], dict[str, float]]:
    """Inverse-frequency weights of labelled items: (per item, per label).

    Label c of K present, held by n_c of N items, weighs (N / (K n_c)) ** power: at power 1
    every label carries the same total weight (the "balanced" class weights of King and Zeng
    2001, as scikit-learn computes them), at 0 nothing changes, in between a tempered mix. The
    total weight stays N at power 1 and 0.
    """
    counts: dict[str, int] = defaultdict(int)
    for label in labels.values():
        counts[label] += 1
    n, k = len(labels), len(counts)
    per_label = {label: (n / (k * count)) ** power for label, count in counts.items()}
    return {item: per_label[label] for item, label in labels.items()}, per_label


def rebalanced_weights(
    events: Sequence[FeedbackRecord],
    weights: Mapping[EventKey, float],
    *,
    rating_class_power: float,
    kind_power: float,
) -> tuple[dict[EventKey, float], dict[str, Any]]:
    """Event weights (by event_key) times the rating-class and feedback-kind balance weights,
    and the report: each class's and kind's count and weight."""
    classes = {event_key(e): c for e in events if (c := rating_class(e)) is not None}
    by_class, class_weights = balance_weights(classes, rating_class_power)
    by_kind, kind_weights = balance_weights({event_key(e): e.kind for e in events}, kind_power)
    out = {
        event_key(e): weights.get(event_key(e), 1.0)
        * by_class.get(event_key(e), 1.0)
        * by_kind[event_key(e)]
        for e in events
    }
    report = {
        "rating_classes": _counts(classes.values()),
        "rating_class_weights": class_weights,
        "feedback_kind_weights": kind_weights,
    }
    return out, report


def _counts(labels: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for label in labels:
        counts[label] += 1
    return dict(counts)


def reward_by_arm(
    rated: Mapping[str, RatedGeneration], generations: Mapping[str, GenerationRecord]
) -> dict[str, dict[str, float]]:
    """Mean rating of the window's rated generations by how they were served: exploration (the
    server's exploration share) or policy (everything else). The gap is exploration's cost in
    served reward."""
    sums: dict[str, list[float]] = {"exploration": [], "policy": []}
    for gid, r in rated.items():
        g = generations.get(gid)
        if g is not None:
            sums["exploration" if g.served_as == SERVED_EXPLORATION else "policy"].append(r.reward)
    return {
        arm: {
            "rated": len(values),
            "mean_rating": sum(values) / len(values) if values else math.nan,
        }
        for arm, values in sums.items()
    }


def age_weights(
    generations: Sequence[GenerationRecord], half_life_s: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-generation weights 0.5 ** (age / half_life_s), age counted back from the window's
    newest generation (so no clock is read), and the report; half_life_s 0: every weight 1.

    The discounted evidence of non-stationary bandits (discounted UCB, Garivier and Moulines
    2011) applied to training data: after users' taste moves, what they said before the move
    fades instead of outvoting what they say now.
    """
    if not generations:
        return {}, {}
    newest = max(g.created_at for g in generations)
    weights = {
        g.generation_id: 0.5 ** ((newest - g.created_at) / half_life_s) if half_life_s > 0 else 1.0
        for g in generations
    }
    values = list(weights.values())
    return weights, {
        "half_life_s": half_life_s,
        "mean_weight": sum(values) / len(values),
        "min_weight": min(values),
    }

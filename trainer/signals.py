"""A window's learning signals: which generation carries which reward, and why.

The trainer's one place where explicit ratings, the Bradley-Terry reward model and the unrated
rule meet (the meaning of each feedback kind is trainer.rewards'; the model is
trainer.reward_model's). Generations held out by id hash are kept out of training: their
ratings are the gate's off-policy test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from feedloop.core.store.base import GenerationRecord
from feedloop.core.tokenizer import Tokenizer
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.data import Window, before_change, stale_weight
from feedloop.trainer.reward_model import (
    FittedRewardModel,
    fit_reward_model,
    is_heldout,
    with_calibration,
)
from feedloop.trainer.rewards import (
    CorrectionTarget,
    age_weights,
    client_weights,
    correction_targets,
    event_key,
    event_time,
    feedback_kinds,
    preference_pairs,
    rated_generations,
    rebalanced_weights,
    reward_by_arm,
)
from feedloop.trainer.shaping import shaped_rewards

# Fewer held-out pairs than this cannot judge the reward model; it is used on trust then.
RM_MIN_HELDOUT_PAIRS = 10


@dataclass(frozen=True)
class LearningSignals:
    """What one window teaches, for the round to train on and the gate to judge by.

    examples: (generation, reward, weight) of every training generation given a reward;
    heldout: (generation, rating) of the rated generations held out for the gate's off-policy
    estimates; corrections: supervised targets; reward_model: the Bradley-Terry model if one
    was fitted and trusted this round; notes: what the window lacked, in words; figures:
    feedback_by_kind, reward_sources and the reward model's rm_* figures.

    Frozen because it is the record of what the window said: the round copies what it adds to.
    """

    examples: list[tuple[GenerationRecord, float, float]]
    heldout: list[tuple[GenerationRecord, float]]
    corrections: list[CorrectionTarget]
    reward_model: FittedRewardModel | None
    notes: list[str]
    figures: dict[str, Any]


def learning_signals(
    window: Window, tokenizer: Tokenizer, c: TrainConfig, change_at: float | None = None
) -> LearningSignals:
    """Rewards for the window's training generations, its held-out ratings and corrections.

    change_at: a change of users' taste detected then (trainer/drift.py): feedback given
    before it, and unrated generations served before it, weigh c.drift_stale_weight; rated
    generations served before it leave the gate's held-out set.
    """
    figures: dict[str, Any] = {}
    notes = list(window.notes)
    kinds = feedback_kinds(window.events)
    figures["feedback_by_kind"] = kinds
    if len(kinds) == 1:
        notes.append(f"only {next(iter(kinds))} feedback in the window")
    weights, balance = rebalanced_weights(
        window.events,
        client_weights(window.events, c.client_share_cap),
        rating_class_power=c.rating_class_balance,
        kind_power=c.feedback_kind_balance,
    )
    figures.update(balance)
    stale = c.drift_stale_weight
    stale_events = [e for e in window.events if before_change(event_time(e), change_at)]
    for e in stale_events:  # every event has its weight (client_weights covers them all)
        weights[event_key(e)] *= stale
    rated = rated_generations(window.events, weights, c.aggregation)
    figures["reward_by_arm"] = reward_by_arm(rated, window.generations)
    pairs = preference_pairs(window.events, window.generations, weights, rated)
    # The gate's off-policy test set: rated generations held out by id. Nothing fitted this
    # round (reward model, calibration, policy) sees them.
    gate_heldout = {
        gid for gid in rated if gid in window.generations and is_heldout(gid, c.heldout_share)
    }
    # Held out by id, but judged by the taste before the change: the gate leaves them out
    # (they stay out of training too, as every held-out generation does).
    stale_heldout = {
        gid for gid in gate_heldout if before_change(window.generations[gid].created_at, change_at)
    }
    rm: FittedRewardModel | None = None
    if len(pairs) >= c.rm_min_pairs:
        rm = fit_reward_model(
            tokenizer,
            pairs,
            steps=c.rm_steps,
            learning_rate=c.rm_learning_rate,
            l2=c.rm_l2,
            heldout_share=c.heldout_share,
            gate_heldout=gate_heldout,
            seed=c.seed,
        )
        # Calibrated on the training generations only: the held-out ratings are the gate's.
        gens = [g for g in window.generations.values() if g.generation_id not in gate_heldout]
        rm = with_calibration(
            rm,
            [g.prompt for g in gens],
            [g.text for g in gens],
            [rated[g.generation_id].reward if g.generation_id in rated else None for g in gens],
        )
        figures.update(rm.figures())
        accuracy = rm.heldout_accuracy
        # A handful of held-out pairs cannot judge the model; it is used on trust then.
        if rm.heldout_pairs >= RM_MIN_HELDOUT_PAIRS and accuracy < c.rm_min_accuracy:
            notes.append(
                f"reward model held-out accuracy {accuracy:.3f} < "
                f"{c.rm_min_accuracy}: it scores nothing this round"
            )
            rm = None
    else:
        notes.append(
            f"{len(pairs)} preference pairs (< rm_min_pairs {c.rm_min_pairs}): "
            "no reward model this round"
        )
    candidates = [
        g for g in window.generations.values() if not is_heldout(g.generation_id, c.heldout_share)
    ]
    rm_rewards: dict[str, float] = {}
    if rm is not None and c.unrated == "reward-model":
        unrated = [g for g in candidates if g.generation_id not in rated]
        if unrated:
            scores = rm.rewards([g.prompt for g in unrated], [g.text for g in unrated])
            rm_rewards = {g.generation_id: float(s) for g, s in zip(unrated, scores, strict=True)}
    examples: list[tuple[GenerationRecord, float, float]] = []
    sources = {"rating": 0, "reward-model": 0, "default": 0, "left-out": 0}
    for g in candidates:
        gid = g.generation_id
        if gid in rated:
            examples.append((g, rated[gid].reward, rated[gid].weight))
            sources["rating"] += 1
        elif gid in rm_rewards:
            examples.append((g, rm_rewards[gid], stale_weight(g.created_at, change_at, stale)))
            sources["reward-model"] += 1
        elif c.unrated == "default":
            examples.append(
                (g, c.unrated_default_reward, stale_weight(g.created_at, change_at, stale))
            )
            sources["default"] += 1
        else:
            sources["left-out"] += 1
    figures["reward_sources"] = sources
    ages, figures["data_age_weights"] = age_weights([g for g, _, _ in examples], c.data_half_life_s)
    examples = [(g, r, w * ages[g.generation_id]) for g, r, w in examples]
    # Shaping is added last, to every training reward whatever its source; the held-out
    # ratings below stay the users' own: the gate judges by what users said.
    examples, figures["shaping"] = shaped_rewards(examples, c.shaping_terms)
    heldout = [
        (g, rated[g.generation_id].reward)
        for g in window.generations.values()
        if g.generation_id in gate_heldout and g.generation_id not in stale_heldout
    ]
    if change_at is not None:
        figures["stale_data"] = {
            "change_at": change_at,
            "weight": stale,
            "stale_events": len(stale_events),
            "events": len(window.events),
            "stale_examples": sum(before_change(g.created_at, change_at) for g, _, _ in examples),
            "examples": len(examples),
            "heldout_left_out": len(stale_heldout),
        }
    corrections = correction_targets(window.events, window.generations, weights)
    return LearningSignals(examples, heldout, corrections, rm, notes, figures)

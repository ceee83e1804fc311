"""The gate's held-out ratings stay out of everything the round fits (issue 22, item 3).

The gate estimates the candidate's reward on rated generations held out by id; its doubly
robust estimate measures the reward model's residuals there. A reward model trained on pairs
that name those generations, or calibrated on their ratings, shrinks those residuals and makes
the gate over-confident.

The tests at the end specify the rest of `learning_signals` (trainer/signals.py, whose mutation
tests run this file alone): its notes, the reward model's pair and accuracy bars, and the rule
for unrated generations.
"""

from __future__ import annotations

import dataclasses

import pytest
from test_rewards import event, generation

from feedloop.core.tokenizer import Tokenizer
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.data import Window
from feedloop.trainer.reward_model import fit_reward_model, is_heldout, pair_is_heldout
from feedloop.trainer.rewards import PreferencePair, preference_pairs
from feedloop.trainer.signals import learning_signals

SHARE = 0.3
WORDS = ["sunny", "calm", "bright", "day", "night", "sea", "warm", "cold", "good", "bad"]


def ids(heldout: bool, n: int) -> list[str]:
    """n generation ids that the gate does (or does not) hold out at SHARE."""
    out = [f"g{i}" for i in range(2000) if is_heldout(f"g{i}", SHARE) == heldout]
    return out[:n]


def test_a_pair_naming_a_gate_heldout_generation_is_never_trained_on() -> None:
    kept, held = ids(False, 2), ids(True, 1)
    key = next(f"k{i}" for i in range(1000) if not is_heldout(f"k{i}", SHARE))
    clean = PreferencePair("sunny", "good day", "bad day", 1.0, "comparison", key, tuple(kept))
    leaky = PreferencePair(
        "sunny", "good sea", "bad sea", 1.0, "comparison", key, (kept[0], held[0])
    )
    assert not pair_is_heldout(clean, SHARE, set(held))
    assert pair_is_heldout(leaky, SHARE, set(held))
    assert not pair_is_heldout(leaky, SHARE, set())  # unrated: not in the gate's test set
    fitted = fit_reward_model(
        Tokenizer.build([" ".join(WORDS)]),
        [clean, leaky],
        steps=5,
        learning_rate=0.1,
        l2=0.0,
        heldout_share=SHARE,
        gate_heldout=set(held),
    )
    assert (fitted.train_pairs, fitted.heldout_pairs) == (1, 1)


def test_every_pair_names_the_generations_it_came_from() -> None:
    gens = {g: generation(g, f"text {g}") for g in ("g1", "g2", "g3")}
    pairs = preference_pairs(
        [
            event("c", "comparison", ["g1", "g2"]),
            event("r", "ranking", ["g3", "g1"]),
            event("x", "correction", ["g2"], text="a better phrase"),
        ],
        gens,
        {},
        {},
    )
    assert {(p.source, p.generation_ids) for p in pairs} == {
        ("comparison", ("g1", "g2")),
        ("ranking", ("g3", "g1")),
        ("correction", ("g2",)),
    }


def rated_window(n_per_request: int = 2, requests: int = 120) -> Window:
    """Rated pairs of candidates per request, about SHARE of them held out by id."""
    gens, events = {}, []
    for r in range(requests):
        for k in range(n_per_request):
            gid = f"r{r}-c{k}"
            good = k == 0
            text = f"{WORDS[r % 5]} {'good' if good else 'bad'} {WORDS[5 + r % 5]}"
            gens[gid] = generation(gid, text, request=f"req{r}")
            events.append(
                event(f"e-{gid}", "rating", [gid], client=f"u{r}", score=1.0 if good else 0.0)
            )
    return Window(gens, events, len(events), len(gens), 0, 0, len(gens), len(events))


def test_the_reward_model_trains_and_calibrates_on_training_generations_only() -> None:
    window = rated_window()
    config = TrainConfig(heldout_share=SHARE, rm_min_pairs=10, rm_steps=20)
    tokenizer = Tokenizer.build([" ".join(WORDS)])
    signals = learning_signals(window, tokenizer, config)
    heldout_ids = {g for g in window.generations if is_heldout(g, SHARE)}
    assert signals.heldout and {g.generation_id for g, _ in signals.heldout} == heldout_ids
    rm = signals.reward_model
    assert rm is not None
    # Each request's rating pair is trained on only when neither of its generations (nor
    # the pair's own key) is held out.
    requests_all_training = sum(
        1
        for r in range(120)
        if not is_heldout(f"r{r}-c0", SHARE)
        and not is_heldout(f"r{r}-c1", SHARE)
        and not is_heldout(f"r{r}-c0>r{r}-c1", SHARE)
    )
    assert rm.train_pairs == requests_all_training
    assert rm.train_pairs + rm.heldout_pairs == 120
    # Calibrated on the rated training generations, not on the gate's.
    assert rm.calibration.fitted_on == len(window.generations) - len(heldout_ids)


def test_a_ranking_weighs_like_n_minus_one_comparisons() -> None:
    """Plackett-Luce: a ranking of n is n - 1 successive choices, each one comparison."""
    for n in (2, 3, 8):
        gens = {f"g{i}": generation(f"g{i}", f"text {i}") for i in range(n)}
        pairs = preference_pairs([event("r", "ranking", list(gens))], gens, {}, {})
        assert len(pairs) == n * (n - 1) // 2
        assert sum(p.weight for p in pairs) == pytest.approx(n - 1)
    gens = {g: generation(g, g) for g in ("a", "b")}
    compared = preference_pairs([event("c", "comparison", ["a", "b"])], gens, {}, {})
    ranked = preference_pairs([event("r", "ranking", ["a", "b"])], gens, {}, {})
    assert [p.weight for p in ranked] == [p.weight for p in compared] == [1.0]


def test_gate_heldout_generations_are_its_test_set_and_never_training_examples() -> None:
    """Every rated generation lands on one side of the held-out split, with its rating: the
    training examples on one, the gate's off-policy test set on the other; an unrated held-out
    generation is on neither (it has no rating to test with, and takes no default reward)."""
    window = rated_window()
    unrated = {gid: generation(gid, "calm day", request="unrated") for gid in ("u1", "u2", "u3")}
    unrated_heldout = {gid for gid in unrated if is_heldout(gid, SHARE)}
    assert unrated_heldout and unrated_heldout != set(unrated)  # both sides represented
    window.generations.update(unrated)
    config = TrainConfig(
        heldout_share=SHARE, rm_min_pairs=10**6, unrated="default", unrated_default_reward=0.25
    )
    signals = learning_signals(window, Tokenizer.build([" ".join(WORDS)]), config)

    rating = {gid: (1.0 if gid.endswith("c0") else -1.0) for gid in window.generations}
    rated_heldout = {g for g in rating if not g.startswith("u") and is_heldout(g, SHARE)}
    assert {g.generation_id: r for g, r in signals.heldout} == {g: rating[g] for g in rated_heldout}
    expected_examples = {
        g: (0.25 if g in unrated else rating[g])
        for g in window.generations
        if not is_heldout(g, SHARE)
    }
    assert {g.generation_id: r for g, r, _ in signals.examples} == expected_examples
    assert all(w == 1.0 for g, _, w in signals.examples if g.generation_id in unrated)
    assert signals.figures["reward_sources"]["default"] == len(unrated) - len(unrated_heldout)


TOKENIZER = Tokenizer.build([" ".join(WORDS)])


def test_a_window_of_one_feedback_kind_says_so_and_counts_kinds() -> None:
    window = rated_window(requests=20)
    config = TrainConfig(heldout_share=SHARE, rm_min_pairs=10**6)
    signals = learning_signals(window, TOKENIZER, config)
    assert "only rating feedback in the window" in signals.notes
    assert signals.figures["feedback_by_kind"] == {"rating": 40}
    window.events.append(event("c", "comparison", ["r0-c0", "r0-c1"]))
    mixed = learning_signals(window, TOKENIZER, config)
    assert not any(note.startswith("only ") for note in mixed.notes)


def test_too_few_pairs_fit_no_reward_model_and_say_how_many() -> None:
    window = rated_window(requests=20)  # 20 rating pairs
    signals = learning_signals(window, TOKENIZER, TrainConfig(heldout_share=SHARE, rm_min_pairs=21))
    assert signals.reward_model is None
    assert "20 preference pairs (< rm_min_pairs 21): no reward model this round" in signals.notes
    exactly = TrainConfig(heldout_share=SHARE, rm_min_pairs=20, rm_steps=5)
    assert learning_signals(window, TOKENIZER, exactly).reward_model is not None


def test_a_reward_model_below_the_accuracy_bar_scores_nothing_and_one_at_it_is_used() -> None:
    window = rated_window()
    config = TrainConfig(heldout_share=SHARE, rm_min_pairs=10, rm_steps=20, unrated="reward-model")
    fitted = learning_signals(window, TOKENIZER, config)
    assert fitted.reward_model is not None
    accuracy = fitted.reward_model.heldout_accuracy
    assert (
        fitted.reward_model.heldout_pairs >= 10
        and fitted.figures["rm_heldout_accuracy"] == accuracy
    )
    at_bar = learning_signals(
        window, TOKENIZER, dataclasses.replace(config, rm_min_accuracy=accuracy)
    )
    assert at_bar.reward_model is not None
    above = dataclasses.replace(config, rm_min_accuracy=accuracy + 0.01)
    refused = learning_signals(window, TOKENIZER, above)
    assert refused.reward_model is None
    assert (
        f"reward model held-out accuracy {accuracy:.3f} < {accuracy + 0.01}: "
        "it scores nothing this round"
    ) in refused.notes
    assert refused.figures["rm_heldout_accuracy"] == accuracy  # reported all the same


def test_unrated_training_generations_take_the_reward_models_score_or_are_left_out() -> None:
    window = rated_window()
    unrated = {
        gid: generation(gid, "calm good day", request="unrated") for gid in ("u1", "u2", "u3")
    }
    training = [gid for gid in unrated if not is_heldout(gid, SHARE)]
    window.generations.update(unrated)
    config = TrainConfig(heldout_share=SHARE, rm_min_pairs=10, rm_steps=20, unrated="reward-model")
    signals = learning_signals(window, TOKENIZER, config)
    assert signals.reward_model is not None
    scores = signals.reward_model.rewards(
        ["sunny"] * len(training), ["calm good day"] * len(training)
    )
    by_id = {g.generation_id: (r, w) for g, r, w in signals.examples}
    assert [by_id[gid] for gid in training] == [(float(s), 1.0) for s in scores]
    rated_training = sum(
        1 for g in window.generations if not g.startswith("u") and not is_heldout(g, SHARE)
    )
    assert signals.figures["reward_sources"] == {
        "rating": rated_training,
        "reward-model": len(training),
        "default": 0,
        "left-out": 0,
    }
    left_out = learning_signals(window, TOKENIZER, dataclasses.replace(config, unrated="left-out"))
    assert not any(g.generation_id in unrated for g, _, _ in left_out.examples)
    assert left_out.figures["reward_sources"]["left-out"] == len(training)
    assert left_out.figures["reward_sources"]["reward-model"] == 0


def test_ten_heldout_pairs_are_enough_to_refuse_an_inaccurate_reward_model() -> None:
    window = rated_window(requests=16)  # the 16th request makes the 10th held-out pair
    config = TrainConfig(heldout_share=SHARE, rm_min_pairs=10, rm_steps=5, rm_min_accuracy=1.01)
    signals = learning_signals(window, TOKENIZER, config)
    assert signals.figures["rm_heldout_pairs"] == 10
    assert signals.reward_model is None


@pytest.mark.parametrize("unrated", ["default", "reward-model"])
def test_unrated_generations_served_before_a_change_of_taste_weigh_the_stale_weight(
    unrated: str,
) -> None:
    # The rated window is served at t=0; unrated generations at t=5 and t=15; the change at 10.
    window = rated_window()
    served = {"old": 5.0, "new": 15.0}
    for when, at in served.items():
        for i in range(6):
            gid = f"u-{when}-{i}"
            window.generations[gid] = dataclasses.replace(
                generation(gid, "calm good day", request=f"u-{when}"), created_at=at
            )
    config = TrainConfig(
        heldout_share=SHARE, rm_min_pairs=10, rm_steps=5, unrated=unrated, drift_stale_weight=0.25
    )
    signals = learning_signals(window, TOKENIZER, config, change_at=10.0)
    weights = {g.generation_id: w for g, _, w in signals.examples}
    unrated_weights = {gid: w for gid, w in weights.items() if gid.startswith("u-")}
    assert {gid[:5] for gid in unrated_weights} == {"u-old", "u-new"}  # both trained on
    assert signals.figures["reward_sources"][unrated] == len(unrated_weights)
    for gid, w in unrated_weights.items():
        assert w == (0.25 if gid.startswith("u-old") else 1.0), (gid, w)
    # Every rated generation and every old unrated one predates the change; the new ones not.
    stale_examples = sum(1 for gid in weights if not gid.startswith("u-new"))
    assert 0 < stale_examples < len(weights)
    rated_heldout = sum(
        1 for gid in window.generations if gid.startswith("r") and is_heldout(gid, SHARE)
    )
    assert signals.figures["stale_data"] == {
        "change_at": 10.0,
        "weight": 0.25,
        "stale_events": len(window.events),
        "events": len(window.events),
        "stale_examples": stale_examples,
        "examples": len(weights),
        "heldout_left_out": rated_heldout,
    }
    # No change known: every unrated generation weighs 1 and no stale figure is reported.
    unchanged = learning_signals(window, TOKENIZER, config)
    assert all(w == 1.0 for g, _, w in unchanged.examples if g.generation_id.startswith("u-"))
    assert "stale_data" not in unchanged.figures

"""The Bradley-Terry reward model: learns preferences from pairs, reports held-out accuracy."""

from __future__ import annotations

import random

import pytest
import torch
from trainer_support import one_torch_thread

from feedloop.core.corpus import load_phrases
from feedloop.core.tokenizer import Tokenizer
from feedloop.demo.simusers import AvoidWord, IncludeWord, Length, Preference
from feedloop.trainer.reward_model import (
    Calibration,
    calibrate,
    fit_reward_model,
    is_heldout,
    with_calibration,
)
from feedloop.trainer.rewards import PreferencePair

__all__ = ["one_torch_thread"]
PHRASES = load_phrases()[:3000]
TOKENIZER = Tokenizer.build(PHRASES)


def noisy_pairs(pref: Preference, n: int, seed: int, noise_sd: float = 0.2) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        a, b = rng.sample(PHRASES, 2)
        ua = pref.reward(a) + rng.gauss(0, noise_sd)
        ub = pref.reward(b) + rng.gauss(0, noise_sd)
        if pref.reward(a) == pref.reward(b):
            continue
        better, worse = (a, b) if ua > ub else (b, a)
        pairs.append(PreferencePair("", better, worse, 1.0, "comparison", f"pair-{len(pairs)}"))
    return pairs


def fit(pairs: list[PreferencePair]):  # type: ignore[no-untyped-def]
    return fit_reward_model(
        TOKENIZER, pairs, steps=150, learning_rate=0.05, l2=1e-3, heldout_share=0.2
    )


@pytest.mark.parametrize(
    "pref", [IncludeWord("little"), AvoidWord("the"), Length(3)], ids=["include", "avoid", "length"]
)
def test_reward_model_learns_each_kind_of_preference_from_noisy_pairs(pref: Preference) -> None:
    pairs = noisy_pairs(pref, 400, seed=1)
    fitted = fit(pairs)
    heldout = [p for p in pairs if is_heldout(p.key, 0.2)]
    # The ceiling: how often the true reward itself agrees with the noisy held-out labels.
    ceiling = sum(
        pref.reward(p.preferred_text) > pref.reward(p.rejected_text) for p in heldout
    ) / len(heldout)
    assert fitted.heldout_pairs == len(heldout) > 40
    assert fitted.heldout_accuracy > ceiling - 0.08
    assert fitted.heldout_accuracy > 0.7


def test_reward_model_scores_unseen_phrases_in_the_preferred_direction() -> None:
    fitted = fit(noisy_pairs(IncludeWord("little"), 300, seed=2))
    scores = fitted.model.scores(["", ""], ["a little candle", "a quiet candle"])
    assert float(scores[0]) > float(scores[1])


def test_an_untrained_model_is_right_half_the_time_on_ties() -> None:
    fitted = fit_reward_model(
        TOKENIZER,
        noisy_pairs(IncludeWord("little"), 50, seed=3),
        steps=0,
        learning_rate=0.05,
        l2=0.0,
        heldout_share=0.5,
    )
    assert fitted.heldout_accuracy == pytest.approx(0.5)


def test_calibration_maps_scores_onto_the_rating_scale() -> None:
    scores = torch.linspace(-2, 2, 40)
    rated = 0.5 * scores + 0.1  # ratings a linear function of the score
    calibration = calibrate(scores, rated)
    assert calibration.fitted_on == 40
    assert calibration.scale == pytest.approx(0.5, abs=1e-4)
    assert calibration.shift == pytest.approx(0.1, abs=1e-4)
    assert float(calibration.apply(torch.tensor([100.0]))) == 1.0  # clamped to [-1, 1]


def test_without_enough_ratings_scores_are_centred_and_squashed() -> None:
    calibration = calibrate(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]))
    assert calibration == Calibration(1.0, 2.0, 0)
    assert float(calibration.apply(torch.tensor([2.0]))) == 0.0


def test_with_calibration_fits_on_rated_generations_only() -> None:
    fitted = fit(noisy_pairs(IncludeWord("little"), 200, seed=4))
    texts = [p for p in PHRASES[:60]]
    ratings = [1.0 if "little" in t.split() else -1.0 for t in texts[:30]] + [None] * 30
    calibrated = with_calibration(fitted, [""] * 60, texts, ratings)
    assert calibrated.calibration.fitted_on == 30
    rewards = calibrated.rewards(["", ""], ["a little lamp", "a lamp"])
    assert bool(((rewards >= -1) & (rewards <= 1)).all())
    assert float(rewards[0]) > float(rewards[1])


def test_heldout_membership_is_stable_and_near_its_share() -> None:
    keys = [f"event-{i}" for i in range(5000)]
    share = sum(is_heldout(k, 0.1) for k in keys) / len(keys)
    assert 0.08 < share < 0.12
    assert [is_heldout(k, 0.1) for k in keys[:50]] == [is_heldout(k, 0.1) for k in keys[:50]]
    assert not any(is_heldout(k, 0.0) for k in keys)

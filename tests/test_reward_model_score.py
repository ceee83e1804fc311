"""The reward model's score term by term, its fit and its calibration, worked out by hand.

score(prompt, phrase) = sum of the weights of the distinct words in the phrase
                      + the weight of its length in words (punctuation aside, 17 and more alike)
                      + keyword weights . (share of the prompt's words present, all present)
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from feedloop.core.tokenizer import Tokenizer
from feedloop.trainer.reward_model import (
    MAX_LENGTH_WORDS,
    MIN_CALIBRATION_RATINGS,
    Calibration,
    RewardModel,
    calibrate,
    fit_reward_model,
    is_heldout,
    with_calibration,
)
from feedloop.trainer.rewards import PreferencePair

TOKENIZER = Tokenizer.build(["warm sun", "cold rain"])


def model_with_weights() -> RewardModel:
    """warm 1, sun 0.5, cold -1; length 2: -0.5, length 3: 0.25; keywords (2, 4)."""
    model = RewardModel(TOKENIZER)
    with torch.no_grad():
        for word, weight in {"warm": 1.0, "sun": 0.5, "cold": -1.0}.items():
            model.words.weight[TOKENIZER.id_of(word), 0] = weight
        model.length.weight[2, 0] = -0.5
        model.length.weight[3, 0] = 0.25
        model.keyword.weight[:] = torch.tensor([[2.0, 4.0]])
    return model


def test_a_score_is_word_weights_plus_length_weight_plus_keyword_weights() -> None:
    scores = model_with_weights().scores(["warm day", ""], ["warm sun, warm", "cold rain"])
    # warm + sun (each once) + length 3 + 2 * half the prompt's words present
    # cold (rain has no weight) + length 2 + (2 + 4) for a prompt without words
    torch.testing.assert_close(scores, torch.tensor([1.5 + 0.25 + 1.0, -1.0 - 0.5 + 6.0]))


def test_an_empty_phrase_scores_its_length_and_keyword_terms_alone() -> None:
    model = model_with_weights()
    with torch.no_grad():
        model.length.weight[0, 0] = 0.125
    assert model.scores(["warm day"], [""]).tolist() == [0.125]


def test_a_phrase_length_counts_words_not_punctuation_and_stops_at_seventeen() -> None:
    model = RewardModel(TOKENIZER)
    texts = ["a little , lamp .", " ".join(["sun"] * 16), " ".join(["sun"] * 17), "sun " * 30]
    lengths = model.features([""] * 4, texts).length_index.tolist()
    assert lengths == [3, 16, 17, MAX_LENGTH_WORDS + 1]
    assert MAX_LENGTH_WORDS + 1 == 17
    assert model.scores([""], ["sun " * 30]).tolist() == [0.0]  # a long phrase scores too


@pytest.mark.parametrize(
    ("prompt", "text", "keyword"),
    [
        ("little candle", "a little lamp", [0.5, 0.0]),
        ("little candle", "a little candle", [1.0, 1.0]),
        ("little candle", "a lamp", [0.0, 0.0]),
        ("little , candle", "candle", [0.5, 0.0]),  # punctuation is no keyword
        ("", "a lamp", [1.0, 1.0]),  # a prompt without words asks for nothing
    ],
)
def test_keyword_features_are_the_share_of_prompt_words_present_and_whether_all_are(
    prompt: str, text: str, keyword: list[float]
) -> None:
    features = RewardModel(TOKENIZER).features([prompt], [text])
    assert features.keyword.tolist() == [keyword]


def test_prompts_and_phrases_must_pair_up() -> None:
    with pytest.raises(ValueError):
        RewardModel(TOKENIZER).features(["warm"], ["warm sun", "cold rain"])


def pair(preferred: str, rejected: str, weight: float = 1.0, key: str = "k") -> PreferencePair:
    return PreferencePair("", preferred, rejected, weight, "comparison", key)


def fit(pairs: list[PreferencePair], steps: int, learning_rate: float = 0.1):  # type: ignore[no-untyped-def]
    return fit_reward_model(
        TOKENIZER, pairs, steps=steps, learning_rate=learning_rate, l2=0.0, heldout_share=0.0
    )


def test_one_step_moves_every_weight_with_a_gradient_by_the_learning_rate() -> None:
    """Adam's first step is learning_rate times the gradient's sign. Length and keyword
    features are the same on both sides of the pair: their gradients cancel."""
    fitted = fit([pair("warm sun", "cold rain")], steps=1, learning_rate=0.1)
    weight = fitted.model.words.weight.detach()
    words = {w: float(weight[TOKENIZER.id_of(w), 0]) for w in TOKENIZER.tokens}
    assert words["warm"] == pytest.approx(0.1) and words["sun"] == pytest.approx(0.1)
    assert words["cold"] == pytest.approx(-0.1) and words["rain"] == pytest.approx(-0.1)
    assert not fitted.model.length.weight.any() and not fitted.model.keyword.weight.any()
    assert fitted.train_loss == pytest.approx(math.log(2.0))  # measured before the step


def test_a_pairs_weight_counts_like_that_many_copies_of_it() -> None:
    warm, cold = pair("warm sun", "cold rain"), pair("cold rain", "warm sun")
    weighted = fit([pair("warm sun", "cold rain", weight=3.0), cold], steps=20)
    copies = fit([warm, warm, warm, cold], steps=20)
    texts = ["warm sun", "cold rain"]
    scores = weighted.model.scores(["", ""], texts)
    torch.testing.assert_close(scores, copies.model.scores(["", ""], texts))
    assert float(scores[0]) > float(scores[1])  # three to one for warm


def test_a_fitted_model_is_uncalibrated_until_calibrated_and_names_its_figures() -> None:
    fitted = fit([pair("warm sun", "cold rain")], steps=5)
    assert fitted.calibration == Calibration(1.0, 0.0, 0)
    scores = fitted.model.scores(["", ""], ["warm sun", "cold rain"])
    torch.testing.assert_close(fitted.rewards(["", ""], ["warm sun", "cold rain"]), scores.tanh())
    assert fitted.figures() == {
        "rm_train_pairs": 1,
        "rm_heldout_pairs": 0,
        "rm_heldout_accuracy": fitted.heldout_accuracy,
        "rm_train_loss": fitted.train_loss,
        "rm_calibrated_on": 0,
        "rm_pairs_by_source": {"comparison": 1},
    }


def test_calibration_clamps_rewards_to_minus_one_one_on_both_sides() -> None:
    calibration = Calibration(0.5, 0.1, 30)
    rewards = calibration.apply(torch.tensor([-100.0, -1.0, 100.0]))
    torch.testing.assert_close(rewards, torch.tensor([-1.0, -0.4, 1.0]))


def test_twenty_ratings_calibrate_by_least_squares_whatever_the_scores_centre_and_spread() -> None:
    scores = torch.linspace(3.0, 3.5, MIN_CALIBRATION_RATINGS)  # variance about 0.02
    calibration = calibrate(scores, 0.5 * scores - 1.2)
    assert calibration.fitted_on == MIN_CALIBRATION_RATINGS == 20
    assert calibration.scale == pytest.approx(0.5, abs=1e-4)
    assert calibration.shift == pytest.approx(-1.2, abs=1e-4)


def test_without_ratings_the_fallback_is_centred_on_the_mean_of_every_given_score() -> None:
    assert calibrate(torch.zeros(0), torch.zeros(0)) == Calibration(1.0, 0.0, 0)
    fitted = fit([pair("warm sun", "cold rain")], steps=5)
    texts = ["warm sun", "warm rain", "warm"]
    mean = float(fitted.model.scores([""] * 3, texts).mean())
    assert mean not in (0.0, float(fitted.model.scores([""], ["warm sun"])))
    calibrated = with_calibration(fitted, [""] * 3, texts, [1.0, None, None])
    assert calibrated.calibration == Calibration(1.0, mean, 0)
    assert with_calibration(fitted, [], [], []).calibration == Calibration(1.0, 0.0, 0)


def test_a_key_whose_hash_bucket_is_the_share_itself_is_not_held_out() -> None:
    key = "key-649"
    assert zlib.crc32(key.encode("utf-8")) % 10_000 == 5000
    assert not is_heldout(key, 0.5)
    assert is_heldout(key, 0.5001)

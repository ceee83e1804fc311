"""The reward model's held-out pairs: never trained on, so its held-out accuracy means something."""

from __future__ import annotations

import pytest
import torch

from feedloop.core.tokenizer import Tokenizer
from feedloop.trainer.reward_model import fit_reward_model, is_heldout, pairwise_accuracy
from feedloop.trainer.rewards import PreferencePair

TOKENIZER = Tokenizer.build(["warm sun", "cold rain"])
SHARE = 0.8


def pair(key: str, preferred: str, rejected: str, weight: float = 1.0) -> PreferencePair:
    return PreferencePair("", preferred, rejected, weight, "comparison", key)


def test_held_out_pairs_are_left_out_of_training_and_scored_apart() -> None:
    # The training pairs prefer "warm sun"; the held-out ones (most of them) say the opposite.
    # A model fitted on the training pairs alone gets every held-out pair wrong; one fitted on
    # all of them would side with the majority and score the held-out pairs as right.
    keys = [f"event-{i}" for i in range(40)]
    pairs = [
        pair(k, "cold rain", "warm sun")
        if is_heldout(k, SHARE)
        else pair(k, "warm sun", "cold rain")
        for k in keys
    ]
    heldout = sum(is_heldout(k, SHARE) for k in keys)
    assert 0 < len(keys) - heldout < heldout
    fitted = fit_reward_model(
        TOKENIZER, pairs, steps=50, learning_rate=0.1, l2=0.0, heldout_share=SHARE
    )
    assert (fitted.train_pairs, fitted.heldout_pairs) == (len(keys) - heldout, heldout)
    assert fitted.heldout_accuracy == 0.0
    assert fitted.pairs_by_source == {"comparison": 40}
    warm, cold = fitted.model.scores(["", ""], ["warm sun", "cold rain"])
    assert float(warm) > float(cold)
    # The loss is the training pairs' Bradley-Terry loss, already below log 2 (a tie).
    assert 0.0 < fitted.train_loss < torch.log(torch.tensor(2.0)).item()


def test_without_held_out_pairs_the_accuracy_is_not_a_number() -> None:
    pairs = [pair(f"event-{i}", "warm sun", "cold rain") for i in range(5)]
    fitted = fit_reward_model(TOKENIZER, pairs, steps=5, learning_rate=0.1, l2=0.0, heldout_share=0)
    assert fitted.heldout_pairs == 0
    assert fitted.heldout_accuracy != fitted.heldout_accuracy


def test_pairwise_accuracy_weighs_each_pair_and_counts_ties_half() -> None:
    fitted = fit_reward_model(
        TOKENIZER,
        [pair(f"event-{i}", "warm sun", "cold rain") for i in range(10)],
        steps=50,
        learning_rate=0.1,
        l2=0.0,
        heldout_share=0.0,
    )
    right, wrong, tie = (
        pair("a", "warm sun", "cold rain", weight=3.0),
        pair("b", "cold rain", "warm sun", weight=1.0),
        pair("c", "warm sun", "warm sun", weight=2.0),
    )
    # (3 * 1 + 1 * 0 + 2 * 0.5) / 6
    assert pairwise_accuracy(fitted.model, [right, wrong, tie]) == pytest.approx(4 / 6)

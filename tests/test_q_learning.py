"""Soft Q-learning as the trainer's third algorithm, on the hand-sized table policy.

The table policy (test_algorithms) puts 1/2 on token 1 and 1/6 on tokens 0, 2, 3; the reference
is uniform, so a logged token 1 has log ratio log 2 and token 2 log 2/3; the value head is 0.
A = [1, 1] rated 1 with client weight 1, B = [2] rated -1 with client weight 2; beta 1/2.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_algorithms import MOVED, config, experience, policy, reference

from feedloop.trainer.algorithms import SoftQLearning

LOG2 = math.log(2.0)
LOG23 = math.log(2.0 / 3.0)
BETA = 0.5


def test_prepare_puts_each_rating_at_the_phrases_last_token_with_no_kl_in_the_reward(
    tmp_path: Path,
) -> None:
    prepared = SoftQLearning(config(tmp_path)).prepare(policy(), reference(), MOVED, BETA)
    torch.testing.assert_close(prepared.token_rewards, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    torch.testing.assert_close(prepared.weighted_mask, torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
    real = MOVED.batch.output_mask  # padding's log-probs are never read
    torch.testing.assert_close(
        prepared.ref_logprobs * real, torch.tensor([[math.log(0.25)] * 2, [math.log(0.25), 0.0]])
    )
    torch.testing.assert_close(
        prepared.old_logprobs * real, torch.tensor([[math.log(0.5)] * 2, [math.log(1 / 6), 0.0]])
    )
    assert prepared.beta == BETA
    assert prepared.figures["logged_kl_to_reference"] == pytest.approx((2 * LOG2 + LOG23) / 2)
    # Q = 0 + beta * log ratio, averaged over the tokens by client weight
    assert prepared.figures["mean_q_logged"] == pytest.approx(
        BETA * (2 * LOG2 + 2 * LOG23) / 4, abs=1e-6
    )


def test_the_loss_is_the_bellman_loss_plus_the_path_consistency_less_the_entropy_bonus(
    tmp_path: Path,
) -> None:
    """V = 0 and the target's V = 0: Q is beta times the log ratio; the Bellman targets are
    0 and 1 along A and -1 at B; the paths to go A: 1 - log 2, 1 - log 2 / 2, B: -1 - log(2/3)/2."""
    step = SoftQLearning(
        config(tmp_path, q_target_polyak=0.0, q_path_consistency_coef=0.5, entropy_coef=0.25)
    )
    prepared = step.prepare(policy(), reference(), MOVED, BETA)
    loss = step.loss(policy(), prepared, MOVED.batch, torch.arange(2))
    b_residual = 1.0 + BETA * LOG23
    bellman = 0.5 * ((BETA * LOG2) ** 2 + (1 - BETA * LOG2) ** 2 + 2 * b_residual**2) / 4
    path = 0.5 * ((1 - LOG2) ** 2 + (1 - BETA * LOG2) ** 2 + 2 * b_residual**2) / 4
    entropy = 0.5 * math.log(6.0) + 0.5 * LOG2
    assert loss.figures["bellman_loss"] == pytest.approx(bellman, abs=1e-6)
    assert loss.figures["path_consistency_loss"] == pytest.approx(path, abs=1e-6)
    assert loss.figures["entropy"] == pytest.approx(entropy, abs=1e-6)
    assert loss.figures["mean_q"] == pytest.approx(BETA * (2 * LOG2 + 2 * LOG23) / 4, abs=1e-6)
    assert float(loss.loss.detach()) == pytest.approx(
        bellman + 0.5 * path - 0.25 * entropy, abs=1e-6
    )
    assert loss.approx_kl == pytest.approx(0.0, abs=1e-7)  # the policy has not moved


def test_the_bellman_backup_reads_the_target_networks_value_of_the_next_state(
    tmp_path: Path,
) -> None:
    """A target whose V is 0.3 everywhere: A's first token now backs up to 0.3, not 0 (B has
    no next state). The online policy's V stays 0, and tau 0 keeps the target as it is."""
    step = SoftQLearning(config(tmp_path, q_target_polyak=0.0, q_path_consistency_coef=0.0))
    prepared = step.prepare(policy(), reference(), MOVED, BETA)
    with torch.no_grad():
        prepared.target.value.fill_(0.3)  # type: ignore[operator]
    loss = step.loss(policy(), prepared, MOVED.batch, torch.arange(2))
    b_residual = 1.0 + BETA * LOG23
    bellman = 0.5 * ((0.3 - BETA * LOG2) ** 2 + (1 - BETA * LOG2) ** 2 + 2 * b_residual**2) / 4
    assert loss.figures["bellman_loss"] == pytest.approx(bellman, abs=1e-6)
    assert float(loss.loss.detach()) == pytest.approx(bellman, abs=1e-6)


def test_the_target_network_trails_the_policy_by_polyak_averaging_at_every_step(
    tmp_path: Path,
) -> None:
    step = SoftQLearning(config(tmp_path, q_target_polyak=0.25))
    prepared = step.prepare(policy(), reference(), MOVED, BETA)
    assert prepared.target is not None
    assert all(not p.requires_grad for p in prepared.target.parameters())
    moved = reference()  # the policy after some steps: uniform logits, value 1
    with torch.no_grad():
        moved.value.fill_(1.0)
    step.loss(moved, prepared, MOVED.batch, torch.arange(2))
    expected = 0.75 * policy().logits.detach() + 0.25 * moved.logits.detach()
    torch.testing.assert_close(prepared.target.logits.detach(), expected)  # type: ignore[attr-defined]
    assert float(prepared.target.value) == pytest.approx(0.25)  # type: ignore[arg-type]


def test_approx_kl_measures_how_far_the_policy_moved_since_the_round_began(
    tmp_path: Path,
) -> None:
    step = SoftQLearning(config(tmp_path))
    prepared = step.prepare(policy(), reference(), MOVED, BETA)
    loss = step.loss(reference(), prepared, MOVED.batch, torch.arange(2))
    k3 = {1: -0.5 + LOG2, 2: 0.5 - math.log(1.5)}  # (r - 1) - log r at r = 1/2 and 3/2
    # per real token, unweighted by clients
    assert loss.approx_kl == pytest.approx((2 * k3[1] + k3[2]) / 3, abs=1e-6)


def test_soft_q_learning_raises_the_rated_token_and_lowers_the_disliked_one(
    tmp_path: Path,
) -> None:
    """Token 1 rated 1 and token 2 rated -1, beta small: the soft-optimal policy shifts mass
    from token 2 to token 1, and the update moves that way."""
    trained = policy()
    c = config(tmp_path, learning_rate=0.05, minibatch_size=2, epochs=20, target_approx_kl=10.0)
    SoftQLearning(c).update(trained, reference(), experience([[1], [2]], [1.0, -1.0]), 0.1)
    probs = trained.probabilities()
    assert probs[1] > 0.6 and probs[2] < 1 / 6

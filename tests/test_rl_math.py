"""The RL math against values worked out by hand (the arithmetic is in each test's comment)."""

from __future__ import annotations

import math

import pytest
import torch

from feedloop.trainer import rl_math

T = torch.tensor


def close(actual: torch.Tensor | float, expected: list | float, tol: float = 1e-5) -> bool:
    return torch.allclose(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=tol,
    )


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} within each sequence; 0 on padding (GAE's lambda = 1 oracle)."""
    valid = (mask > 0).float()
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = (rewards[:, t] + gamma * running) * valid[:, t]
        returns[:, t] = running
    return returns


def test_discounted_returns_accumulate_backwards_within_each_sequence() -> None:
    # gamma 0.5: G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5
    assert close(discounted_returns(T([[1.0, 0.0, 2.0]]), T([[1.0, 1, 1]]), 0.5), [[1.5, 1.0, 2.0]])


def test_discounted_returns_ignore_rewards_on_padding() -> None:
    # the 9 sits on padding: G1 = 2, G0 = 1 + 0.5 * 2 = 2
    assert close(discounted_returns(T([[1.0, 2.0, 9.0]]), T([[1.0, 1, 0]]), 0.5), [[2.0, 2.0, 0.0]])


def test_gae_matches_hand_computed_advantages_and_returns() -> None:
    # delta1 = 1 + 0 - 0.2 = 0.8 -> A1 = 0.8; delta0 = 0 + 0.2 - 0.5 = -0.3 -> A0 = -0.3 + 0.5 * 0.8
    advantages, returns = rl_math.gae(T([[0.0, 1.0]]), T([[0.5, 0.2]]), T([[1.0, 1.0]]), 1.0, 0.5)
    assert close(advantages, [[0.1, 0.8]])
    assert close(returns, [[0.6, 1.0]])


def test_gae_with_lambda_one_gives_monte_carlo_returns() -> None:
    rewards, values, mask = T([[0.3, -0.1, 1.0]]), T([[0.7, 0.1, -0.4]]), T([[1.0, 1, 1]])
    _, returns = rl_math.gae(rewards, values, mask, 0.9, 1.0)
    assert close(returns, discounted_returns(rewards, mask, 0.9))


def test_gae_treats_the_token_after_the_last_as_terminal() -> None:
    # the value on padding (5.0) must not bootstrap: A0 = 1 - 0.5
    advantages, _ = rl_math.gae(T([[1.0, 0.0]]), T([[0.5, 5.0]]), T([[1.0, 0.0]]), 1.0, 1.0)
    assert close(advantages, [[0.5, 0.0]])


def test_kl_estimators_match_their_formulas() -> None:
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    assert close(rl_math.kl_k1(logp, ref), [math.log(2)])  # log 0.5 - log 0.25
    assert close(rl_math.kl_k3(logp, ref), [-0.5 + math.log(2)])  # (0.5 - 1) - log 0.5


def test_k3_is_never_negative_and_k1_can_be() -> None:
    logp, ref = T([-2.0, -0.1, -1.0]), T([-1.0, -3.0, -1.0])
    assert bool((rl_math.kl_k3(logp, ref) >= 0).all())
    assert float(rl_math.kl_k1(logp, ref)[0]) < 0


def test_kl_penalty_rewards_put_the_sequence_reward_on_its_last_token() -> None:
    # k1 = [1, 0.5, -]; rewards = -0.1 * k1, plus 1.0 at the last real token (index 1)
    rewards = rl_math.kl_penalty_rewards(
        T([1.0]), T([[-1.0, -1.0, -1.0]]), T([[-2.0, -1.5, -7.0]]), T([[1.0, 1.0, 0.0]]), 0.1
    )
    assert close(rewards, [[-0.1, 0.95, 0.0]])


def test_ppo_policy_loss_clips_the_ratio_and_reports_clipfrac_and_approx_kl() -> None:
    # token 0: ratio 1.5, A = 1: max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: ratio 1.1, A = -2: max(2.2, 2.2) = 2.2; mean = 0.5; clipfrac = 1/2
    # approx_kl = mean((r - 1) - log r) = ((0.5 - log 1.5) + (0.1 - log 1.1)) / 2
    old = T([[0.0, 0.0]])
    stats = rl_math.ppo_policy_loss(
        torch.log(T([[1.5, 1.1]])), old, T([[1.0, -2.0]]), T([[1.0, 1.0]]), 0.2
    )
    assert close(stats.loss, 0.5)
    assert stats.clipfrac == pytest.approx(0.5)
    assert stats.approx_kl == pytest.approx(((0.5 - math.log(1.5)) + (0.1 - math.log(1.1))) / 2)


def test_ppo_policy_loss_gradient_vanishes_past_the_clip_in_the_advantage_direction() -> None:
    logp = torch.log(T([[1.5]])).requires_grad_()
    rl_math.ppo_policy_loss(logp, T([[0.0]]), T([[1.0]]), T([[1.0]]), 0.2).loss.backward()
    assert logp.grad is not None and float(logp.grad.abs().sum()) == 0.0


def test_importance_weights_multiply_each_token_term() -> None:
    # ratio 1, A = 1: term -1; weight 0.5 -> -0.5
    stats = rl_math.ppo_policy_loss(T([[0.0]]), T([[0.0]]), T([[1.0]]), T([[1.0]]), 0.2, T([[0.5]]))
    assert close(stats.loss, -0.5)


def test_clipped_value_loss_takes_the_worse_of_clipped_and_unclipped() -> None:
    # V = 1, V_old = 0.5, R = 2, clip 0.2: V_clipped = 0.7; max(1, 1.69) / 2 = 0.845
    loss = rl_math.clipped_value_loss(T([[1.0]]), T([[0.5]]), T([[2.0]]), T([[1.0]]), 0.2)
    assert close(loss, 0.845)


def test_entropy_of_a_uniform_distribution_is_log_of_its_size() -> None:
    assert close(rl_math.entropy_from_logits(torch.zeros(1, 2, 4), T([[1.0, 1.0]])), math.log(4))


def test_whitening_gives_zero_mean_unit_variance_over_masked_entries() -> None:
    # [1, 3] has mean 2, variance 1: -> [-1, 1]; the padded 100 becomes 0
    assert close(
        rl_math.whiten(T([[1.0, 3.0, 100.0]]), T([[1.0, 1.0, 0.0]])), [[-1.0, 1.0, 0.0]], tol=1e-4
    )


def test_reinforce_loss_weights_log_probs_by_advantage() -> None:
    # -((1 - 0.5) * -1 + (0 - 0.5) * -2) / 2 = -(-0.5 + 1) / 2 = -0.25
    loss = rl_math.reinforce_loss(T([-1.0, -2.0]), T([1.0, 0.0]), T([0.5, 0.5]), T([1.0, 1.0]))
    assert close(loss, -0.25)


def test_bradley_terry_loss_is_the_negative_log_sigmoid_of_the_margin() -> None:
    assert close(rl_math.bradley_terry_loss(T([1.0]), T([0.0])), math.log(1 + math.exp(-1)))
    # weights: (2 * log 2 + 0 * anything) / 2 for a tie and an ignored pair
    weighted = rl_math.bradley_terry_loss(T([0.0, 5.0]), T([0.0, 0.0]), T([2.0, 0.0]))
    assert close(weighted, math.log(2))


def test_truncated_importance_weights_cap_the_ratio() -> None:
    # e^1 = 2.718 truncated to 2; e^-1 kept
    weights = rl_math.truncated_importance_weights(T([-1.0, -2.0]), T([-2.0, -1.0]), 2.0)
    assert close(weights, [2.0, math.exp(-1)])


def test_effective_sample_size_is_kish_formula() -> None:
    assert rl_math.effective_sample_size(T([1.0, 1.0, 2.0])) == pytest.approx(16 / 6)


def test_snips_estimate_and_interval() -> None:
    # (1 * 0 + 3 * 1) / 4 = 0.75; stderr = sqrt(1 * 0.75^2 + 9 * 0.25^2) / 4
    estimate = rl_math.snips(T([1.0, 3.0]), T([0.0, 1.0]))
    stderr = math.sqrt(0.5625 + 0.5625) / 4
    assert estimate.value == pytest.approx(0.75)
    assert estimate.ci_high - estimate.value == pytest.approx(rl_math.Z_95 * stderr)


def test_doubly_robust_adds_weighted_residuals_to_the_direct_method() -> None:
    # 0.4 + 1 * (1 - 0.5) = 0.9; 0.6 + 2 * (0 - 0.5) = -0.4; mean 0.25
    estimate = rl_math.doubly_robust(T([1.0, 2.0]), T([1.0, 0.0]), T([0.5, 0.5]), T([0.4, 0.6]))
    assert estimate.value == pytest.approx(0.25)
    assert estimate.ci_low < 0.25 < estimate.ci_high


def test_doubly_robust_equals_the_direct_method_when_the_model_is_exact() -> None:
    rewards = T([0.2, 0.9, -0.3])
    estimate = rl_math.doubly_robust(T([0.5, 3.0, 1.0]), rewards, rewards, T([0.1, 0.1, 0.1]))
    assert estimate.value == pytest.approx(0.1)


def test_adaptive_kl_controller_moves_towards_target_by_at_most_twenty_percent() -> None:
    # KL 2 vs target 1: error clipped to 0.2 -> 0.1 * (1 + 0.2 * 50 / 100) = 0.11
    controller = rl_math.AdaptiveKLController(0.1, 1.0, 100.0)
    assert controller.update(2.0, 50) == pytest.approx(0.11)
    # KL 0.5: error -0.5 clipped to -0.2 -> 0.11 * (1 - 0.1)
    assert controller.update(0.5, 50) == pytest.approx(0.099)
    # a NaN measurement leaves it alone
    assert controller.update(float("nan"), 50) == pytest.approx(0.099)


@pytest.mark.parametrize("sequences", [12_000, 16_263])
def test_a_round_larger_than_the_kl_horizon_moves_the_coefficient_by_at_most_twenty_percent(
    sequences: int,
) -> None:
    # The horizon is 2,000 sequences but the KL was measured once: 12,000 sequences below
    # target once made 0.1 * (1 - 0.2 * 6) = -0.02, a KL penalty turned into a bonus.
    # The gain n / horizon is capped at 1: 0.1 * (1 - 0.2) = 0.08, 0.1 * (1 + 0.2) = 0.12.
    below = rl_math.AdaptiveKLController(0.1, 3.0, 2000.0)
    assert below.update(0.5, sequences) == pytest.approx(0.08)
    above = rl_math.AdaptiveKLController(0.1, 3.0, 2000.0)
    assert above.update(9.0, sequences) == pytest.approx(0.12)
    for _ in range(50):  # round after round far below target: it shrinks, it never flips
        assert below.update(0.0, sequences) > 0


def test_the_adaptive_kl_coefficient_never_grows_past_its_bound() -> None:
    # 0.8 * 1.2 = 0.96, then 1.152 is cut to the bound 1.0, and it stays there while KL is high
    controller = rl_math.AdaptiveKLController(0.8, 3.0, 100.0, max_value=1.0)
    assert controller.update(9.0, 100) == pytest.approx(0.96)
    assert controller.update(9.0, 100) == 1.0
    for _ in range(100):
        assert controller.update(9.0, 100) == 1.0
    assert controller.update(0.0, 100) == pytest.approx(0.8)  # and it comes down from it
    unbounded = rl_math.AdaptiveKLController(0.8, 3.0, 100.0)
    assert unbounded.update(9.0, 100) == pytest.approx(0.96)
    assert unbounded.update(9.0, 100) == pytest.approx(1.152)


def test_explained_variance_is_one_for_perfect_predictions_and_zero_for_the_mean() -> None:
    target, mask = T([[1.0, 2.0, 3.0]]), T([[1.0, 1.0, 1.0]])
    assert rl_math.explained_variance(target, target, mask) == pytest.approx(1.0)
    assert rl_math.explained_variance(torch.full_like(target, 2.0), target, mask) == pytest.approx(
        0.0
    )

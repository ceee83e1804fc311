"""The RL math at its edges: fractional weights, empty and padded rows, both sides of each clip,
degenerate samples. Hand values as in test_rl_math.py (the arithmetic is in each comment)."""

from __future__ import annotations

import math

import pytest
import torch
from test_rl_math import T, close

from feedloop.trainer import rl_math

# -- masked reductions ---------------------------------------------------------------------------


def test_a_masked_mean_honours_weights_that_sum_to_less_than_one() -> None:
    # (2 * 0.25 + 4 * 0.25) / 0.5 = 3
    assert close(rl_math.masked_mean(T([2.0, 4.0]), T([0.25, 0.25])), 3.0)


def test_a_masked_mean_over_nothing_is_zero() -> None:
    assert close(rl_math.masked_mean(T([2.0, 4.0]), T([0.0, 0.0])), 0.0)


def test_whitening_divides_by_the_standard_deviation() -> None:
    # [1, 5]: mean 3, variance 4, sd 2 -> [-1, 1]
    assert close(rl_math.whiten(T([[1.0, 5.0]]), T([[1.0, 1.0]])), [[-1.0, 1.0]], tol=1e-4)


def test_whitening_a_constant_gives_zeros_not_nan() -> None:
    assert close(rl_math.whiten(T([[2.0, 2.0]]), T([[1.0, 1.0]])), [[0.0, 0.0]])


def test_the_last_token_of_each_row_and_of_an_empty_row() -> None:
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert rl_math.last_token_index(mask).tolist() == [1, 0, 0]


# -- returns and advantages ----------------------------------------------------------------------


def test_gae_returns_are_zero_on_padding() -> None:
    # A0 = 1 - 0.5 = 0.5, return 0.5 + 0.5 = 1; the padded position returns 0, not 5 / 0
    _, returns = rl_math.gae(T([[1.0, 0.0]]), T([[0.5, 5.0]]), T([[1.0, 0.0]]), 1.0, 1.0)
    assert close(returns, [[1.0, 0.0]])


def test_an_empty_sequence_gets_no_reward_and_no_penalty() -> None:
    rewards = rl_math.kl_penalty_rewards(
        T([1.0, 2.0]), T([[-1.0, -1.0], [-1.0, -1.0]]), T([[-2.0, -2.0], [-3.0, -3.0]]),
        T([[1.0, 0.0], [0.0, 0.0]]), 0.1,
    )  # fmt: skip
    # row 0: -0.1 * 1 + 1 at its only token; row 1 is all padding
    assert close(rewards, [[0.9, 0.0], [0.0, 0.0]])


# -- losses --------------------------------------------------------------------------------------


def test_ppo_ratio_is_taken_against_the_old_log_probabilities() -> None:
    # log pi - log pi_old = log 1.5: clipped at 1.2 with A = 1 -> loss -1.2
    old = T([[-1.0]])
    stats = rl_math.ppo_policy_loss(old + math.log(1.5), old, T([[1.0]]), T([[1.0]]), 0.2)
    assert close(stats.loss, -1.2)
    assert stats.clipfrac == 1.0


def test_ppo_clips_the_ratio_from_below_for_negative_advantages() -> None:
    # ratio 0.5, A = -1: max(0.5, 0.8 * 1) = 0.8
    stats = rl_math.ppo_policy_loss(T([[math.log(0.5)]]), T([[0.0]]), T([[-1.0]]), T([[1.0]]), 0.2)
    assert close(stats.loss, 0.8)


def test_clipfrac_counts_only_ratios_past_the_clip() -> None:
    # with no room at all (clip 0), a ratio of exactly 1 is still inside
    stats = rl_math.ppo_policy_loss(T([[-1.0]]), T([[-1.0]]), T([[1.0]]), T([[1.0]]), 0.0)
    assert stats.clipfrac == 0.0


def test_clipped_value_loss_clips_a_fall_below_the_old_value() -> None:
    # V = 0, V_old = 1, R = -1, clip 0.2: V_clipped = 0.8; max(1, 3.24) / 2 = 1.62
    loss = rl_math.clipped_value_loss(T([[0.0]]), T([[1.0]]), T([[-1.0]]), T([[1.0]]), 0.2)
    assert close(loss, 1.62)


def test_clipped_value_loss_keeps_the_unclipped_error_when_it_is_the_larger() -> None:
    # V = 0, V_old = 0.5, R = 3, clip 0.2: V_clipped = 0.3; max(9, 7.29) / 2 = 4.5
    loss = rl_math.clipped_value_loss(T([[0.0]]), T([[0.5]]), T([[3.0]]), T([[1.0]]), 0.2)
    assert close(loss, 4.5)


def test_entropy_is_taken_over_the_vocabulary_of_each_token() -> None:
    # token 0: (1/2, 1/4, 1/4) -> 1.5 log 2; token 1: uniform over 3 -> log 3
    logits = torch.log(T([[[0.5, 0.25, 0.25], [1.0, 1.0, 1.0]]]))
    entropy = rl_math.entropy_from_logits(logits, T([[1.0, 1.0]]))
    assert close(entropy, (1.5 * math.log(2) + math.log(3)) / 2)


def test_reinforce_loss_normalises_by_weights_that_sum_to_less_than_one() -> None:
    # -(0.25 * (1 - 0) * -2) / 0.25 = 2
    loss = rl_math.reinforce_loss(T([-2.0]), T([1.0]), T([0.0]), T([0.25]))
    assert close(loss, 2.0)


def test_bradley_terry_loss_depends_on_the_margin_only() -> None:
    # margin 2 - 1 = 1: log(1 + e^-1); a lone pair of weight 0.5 is its own weighted mean
    expected = math.log(1 + math.exp(-1))
    assert close(rl_math.bradley_terry_loss(T([2.0]), T([1.0])), expected)
    assert close(rl_math.bradley_terry_loss(T([2.0]), T([1.0]), T([0.5])), expected)


def test_explained_variance_of_a_constant_target_is_not_a_number() -> None:
    target = T([[2.0, 2.0, 2.0]])
    assert math.isnan(rl_math.explained_variance(target, target, T([[1.0, 1.0, 1.0]])))


# -- importance weights and off-policy estimators ------------------------------------------------


def test_effective_sample_size_of_small_and_of_zero_weights() -> None:
    # (0.5 + 0.5)^2 / (0.25 + 0.25) = 2; no weight at all: 0
    assert rl_math.effective_sample_size(T([0.5, 0.5])) == pytest.approx(2.0)
    assert rl_math.effective_sample_size(T([0.0, 0.0])) == 0.0


def test_an_estimate_reads_as_a_dict() -> None:
    estimate = rl_math.Estimate(0.5, 0.25, 0.75, 8)
    assert estimate.as_dict() == {"value": 0.5, "ci_low": 0.25, "ci_high": 0.75, "n": 8}


def test_snips_with_no_weight_has_no_value() -> None:
    estimate = rl_math.snips(T([0.0, 0.0]), T([1.0, 0.0]))
    assert math.isnan(estimate.value) and math.isnan(estimate.ci_low)
    assert math.isnan(estimate.ci_high)
    assert estimate.n == 2


def test_snips_of_one_sample_and_of_weights_summing_to_one() -> None:
    # one sample: its reward, with a zero-width interval (w^2 (r - V)^2 = 0)
    assert rl_math.snips(T([2.0]), T([0.5])).as_dict() == {
        "value": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 1
    }  # fmt: skip
    # (0.5 * 1 + 0.5 * 0) / 1 = 0.5
    assert rl_math.snips(T([0.5, 0.5]), T([1.0, 0.0])).value == pytest.approx(0.5)


def test_doubly_robust_of_nothing_has_no_value() -> None:
    estimate = rl_math.doubly_robust(T([]), T([]), T([]), T([]))
    assert math.isnan(estimate.value) and math.isnan(estimate.ci_low)
    assert math.isnan(estimate.ci_high)
    assert estimate.n == 0


def test_doubly_robust_of_one_sample_has_an_unbounded_interval() -> None:
    # 0.4 + 2 * (1 - 0.5) = 1.4; one term has no spread to estimate
    estimate = rl_math.doubly_robust(T([2.0]), T([1.0]), T([0.5]), T([0.4]))
    assert estimate.value == pytest.approx(1.4)
    assert (estimate.ci_low, estimate.ci_high, estimate.n) == (-math.inf, math.inf, 1)


def test_doubly_robust_interval_is_the_standard_error_of_its_terms() -> None:
    # terms 0.9 and -0.4 (as in test_rl_math): sample sd = 1.3 / sqrt(2), stderr = sd / sqrt(2)
    estimate = rl_math.doubly_robust(T([1.0, 2.0]), T([1.0, 0.0]), T([0.5, 0.5]), T([0.4, 0.6]))
    assert estimate.ci_high - estimate.value == pytest.approx(rl_math.Z_95 * 0.65)
    assert estimate.value - estimate.ci_low == pytest.approx(rl_math.Z_95 * 0.65)


# -- the adaptive KL coefficient -----------------------------------------------------------------


def test_adaptive_kl_error_is_the_relative_distance_to_a_target_other_than_one() -> None:
    # KL 0.55 vs target 0.5: error 0.55 / 0.5 - 1 = 0.1 (inside the clip) -> 0.1 * (1 + 0.1 * 0.1)
    controller = rl_math.AdaptiveKLController(0.1, 0.5, 100.0)
    assert controller.update(0.55, 10) == pytest.approx(0.101)


def test_adaptive_kl_with_a_target_of_zero_stays_put() -> None:
    controller = rl_math.AdaptiveKLController(0.1, 0.0, 100.0)
    assert controller.update(0.5, 10) == 0.1

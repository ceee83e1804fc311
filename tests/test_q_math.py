"""Soft Q-learning's terms (trainer.q_math) against numbers worked out by hand.

Two logged phrases, beta 1/2: A = two tokens the policy gives 1/2 and the reference 1/4 (log
ratio log 2 each), rated 1; B = one token at 1/6 against 1/4 (log ratio log 2/3), rated -1, then
padding. The value head says V = 0.2, 0.4 along A and 0.3 at B's token (9 on the padding, which
nothing may read).
"""

from __future__ import annotations

import math

import pytest
import torch

from feedloop.trainer import q_math

LOG2 = math.log(2.0)
LOG23 = math.log(2.0 / 3.0)
BETA = 0.5
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
LOGPROBS = torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(1 / 6), 0.0]])
REF = torch.tensor([[math.log(0.25), math.log(0.25)], [math.log(0.25), 0.0]])
VALUES = torch.tensor([[0.2, 0.4], [0.3, 9.0]])
REWARDS = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # each phrase's rating at its last token


def test_q_is_the_value_plus_beta_times_the_log_ratio_to_the_reference() -> None:
    q = q_math.soft_q_values(VALUES, LOGPROBS, REF, BETA)
    expected = torch.tensor([[0.2 + 0.5 * LOG2, 0.4 + 0.5 * LOG2], [0.3 + 0.5 * LOG23, 9.0]])
    torch.testing.assert_close(q, expected)


def test_the_next_states_value_is_the_next_tokens_and_zero_after_the_last() -> None:
    torch.testing.assert_close(
        q_math.next_state_values(VALUES, MASK), torch.tensor([[0.4, 0.0], [0.0, 0.0]])
    )
    # a padded row's first token is also its last
    one = q_math.next_state_values(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 0]]))
    torch.testing.assert_close(one, torch.tensor([[2.0, 0.0, 0.0]]))


def test_the_soft_bellman_target_is_the_reward_plus_the_discounted_next_value() -> None:
    next_values = q_math.next_state_values(VALUES, MASK)
    torch.testing.assert_close(
        q_math.soft_bellman_targets(REWARDS, next_values, MASK, 1.0),
        torch.tensor([[0.4, 1.0], [-1.0, 0.0]]),
    )
    torch.testing.assert_close(
        q_math.soft_bellman_targets(REWARDS, next_values, MASK, 0.5),
        torch.tensor([[0.2, 1.0], [-1.0, 0.0]]),
    )
    # padding gets no target even if a reward sat there
    torch.testing.assert_close(
        q_math.soft_bellman_targets(
            torch.ones(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0]]), 1.0
        ),
        torch.tensor([[2.0, 0.0]]),
    )


def test_the_soft_bellman_loss_is_half_the_weighted_mean_squared_residual() -> None:
    q = q_math.soft_q_values(VALUES, LOGPROBS, REF, BETA)
    targets = q_math.soft_bellman_targets(
        REWARDS, q_math.next_state_values(VALUES, MASK), MASK, 1.0
    )
    residuals = [0.2 - 0.5 * LOG2, 0.6 - 0.5 * LOG2, -1.3 - 0.5 * LOG23]
    loss = q_math.soft_bellman_loss(q, targets, MASK)
    assert float(loss) == pytest.approx(0.5 * sum(r * r for r in residuals) / 3, abs=1e-6)
    # B's client weight 2 counts its residual twice
    weighted = q_math.soft_bellman_loss(q, targets, MASK * torch.tensor([[1.0], [2.0]]))
    squares = residuals[0] ** 2 + residuals[1] ** 2 + 2 * residuals[2] ** 2
    assert float(weighted) == pytest.approx(0.5 * squares / 4, abs=1e-6)


def test_the_bellman_target_is_not_differentiated() -> None:
    q = torch.tensor([[1.0]], requires_grad=True)
    target = torch.tensor([[3.0]], requires_grad=True)
    q_math.soft_bellman_loss(q, target, torch.ones(1, 1)).backward()
    assert q.grad is not None and float(q.grad) == pytest.approx(-2.0)
    assert target.grad is None


def test_path_consistency_sums_the_soft_rewards_to_the_end_less_the_value() -> None:
    residuals = q_math.path_consistency_residuals(REWARDS, LOGPROBS, REF, VALUES, MASK, 1.0, BETA)
    expected = torch.tensor(
        [[1.0 - LOG2 - 0.2, 1.0 - 0.5 * LOG2 - 0.4], [-1.0 - 0.5 * LOG23 - 0.3, 0.0]]
    )
    torch.testing.assert_close(residuals, expected)
    discounted = q_math.path_consistency_residuals(REWARDS, LOGPROBS, REF, VALUES, MASK, 0.5, BETA)
    assert float(discounted[0, 0]) == pytest.approx(
        -0.5 * LOG2 + 0.5 * (1.0 - 0.5 * LOG2) - 0.2, abs=1e-6
    )
    assert float(discounted[0, 1]) == pytest.approx(1.0 - 0.5 * LOG2 - 0.4, abs=1e-6)


def test_the_optimal_pair_is_path_consistent_on_any_path() -> None:
    """Reward 1 for a one-token phrase whose every token leads there: with pi = ref * exp((Q - V)
    / beta), log(pi / ref) = (r - V) / beta on the taken token, so the residual vanishes."""
    v = torch.tensor([[0.3]])
    logprobs = torch.tensor([[math.log(0.25) + (1.0 - 0.3) / BETA]])
    residual = q_math.path_consistency_residuals(
        torch.tensor([[1.0]]),
        logprobs,
        torch.tensor([[math.log(0.25)]]),
        v,
        torch.ones(1, 1),
        1.0,
        BETA,
    )
    assert float(residual) == pytest.approx(0.0, abs=1e-6)


def test_the_path_consistency_loss_is_half_the_weighted_mean_square() -> None:
    residuals = torch.tensor([[1.0, -2.0], [3.0, 100.0]])
    assert float(q_math.path_consistency_loss(residuals, MASK)) == pytest.approx(0.5 * 14 / 3)
    weighted = MASK * torch.tensor([[1.0], [2.0]])
    assert float(q_math.path_consistency_loss(residuals, weighted)) == pytest.approx(0.5 * 23 / 4)


def test_polyak_moves_the_target_tau_of_the_way_to_the_online_weights() -> None:
    target = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    online = [torch.tensor([3.0, -2.0], requires_grad=True), torch.tensor([4.0])]
    q_math.polyak_update(target, online, 0.25)
    torch.testing.assert_close(target[0], torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(target[1], torch.tensor([1.0]))
    q_math.polyak_update(target, online, 0.0)
    torch.testing.assert_close(target[0], torch.tensor([1.5, 1.0]))
    q_math.polyak_update(target, online, 1.0)
    torch.testing.assert_close(target[0], torch.tensor([3.0, -2.0]))


def test_path_consistency_discounts_every_later_soft_reward_of_a_longer_phrase() -> None:
    """Three tokens, log ratios 0.1, 0.2, 0.3 (beta 1), the rating 1 at the end, gamma 1/2,
    V = 0: to go from the last token 1 - 0.3 = 0.7; from the second -0.2 + 0.7 / 2 = 0.15;
    from the first -0.1 + 0.15 / 2 = -0.025."""
    residuals = q_math.path_consistency_residuals(
        torch.tensor([[0.0, 0.0, 1.0]]),
        torch.tensor([[0.1, 0.2, 0.3]]),
        torch.zeros(1, 3),
        torch.zeros(1, 3),
        torch.ones(1, 3),
        0.5,
        1.0,
    )
    torch.testing.assert_close(residuals, torch.tensor([[-0.025, 0.15, 0.7]]))

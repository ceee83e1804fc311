"""Actor-critic and REINFORCE on a policy small enough to work out by hand.

`TablePolicy` gives every position the same next-token distribution, so each logged token's
log-probability is a number on paper: the policy puts 1/2 on token 1 and 1/6 on tokens 0, 2, 3;
the reference is uniform (1/4 each). Token 1 is then log 2 nats above the reference (k1), token
2 log(2/3) below. The critic starts at 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from feedloop.core.policy import Policy, PolicyOutput, SampledOutput, SampleRequest, TokenBatch
from feedloop.trainer.algorithms import ActorCritic, Reinforce, SoftQLearning, make_algorithm
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.update import Experience

LOG2 = math.log(2.0)
LOG_TWO_THIRDS = math.log(2.0 / 3.0)


class TablePolicy(Policy):
    """One learnable next-token distribution for every position, and one learnable value."""

    architecture = "table"

    def __init__(self, probabilities: Sequence[float]) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(probabilities).log())
        self.value = torch.nn.Parameter(torch.zeros(()))

    def hyperparameters(self) -> dict[str, Any]:
        return {}

    def sample(self, requests: Sequence[SampleRequest]) -> list[list[SampledOutput]]:
        raise NotImplementedError("the update never samples")

    def teacher_forced(self, batch: TokenBatch) -> PolicyOutput:
        rows, width = batch.output_ids.shape
        return PolicyOutput(self.logits.repeat(rows, width, 1), self.value.repeat(rows, width))

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits.detach(), dim=-1)


def policy() -> TablePolicy:
    return TablePolicy([1 / 6, 1 / 2, 1 / 6, 1 / 6])


def reference() -> TablePolicy:
    return TablePolicy([1 / 4] * 4)


def kl_to_reference(p: TablePolicy) -> float:
    """The exact KL(policy || uniform reference) of a table policy."""
    probs = p.probabilities()
    return float((probs * (probs * 4).log()).sum())


def config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = dict(data_dir=tmp_path, gamma=1.0, gae_lambda=1.0)
    values.update(overrides)
    return TrainConfig(**values)


def experience(
    outputs: list[list[int]], rewards: list[float], weights: list[float] | None = None
) -> Experience:
    """Logged outputs sampled on-policy (behaviour log-probs are the policy's own)."""
    batch = TokenBatch.from_lists([[5]] * len(outputs), outputs)
    with torch.no_grad():
        logged = torch.log_softmax(policy().teacher_forced(batch).logits, dim=-1)
    behaviour = logged.gather(-1, batch.output_ids.unsqueeze(-1)).squeeze(-1) * batch.output_mask
    return Experience(
        batch,
        behaviour,
        torch.tensor(rewards),
        torch.tensor(weights if weights is not None else [1.0] * len(outputs)),
    )


# Sequence A = tokens [1, 1] rated 1: KL to the reference 2 log 2. Sequence B = [2] rated 0:
# KL log(2/3). With kl_coef 0.5 each return is its reward less half its KL.
KL_SHAPED = experience([[1, 1], [2]], [1.0, 0.0])
RETURN_A = 1.0 - 0.5 * 2 * LOG2
RETURN_B = 0.0 - 0.5 * LOG_TWO_THIRDS


def test_actor_critic_returns_are_the_reward_less_kl_coef_times_the_kl_still_to_come(
    tmp_path: Path,
) -> None:
    prepared = ActorCritic(config(tmp_path)).prepare(policy(), reference(), KL_SHAPED, 0.5)
    expected = torch.tensor([[RETURN_A, 1.0 - 0.5 * LOG2], [RETURN_B, 0.0]])
    torch.testing.assert_close(prepared.returns, expected)
    mean_kl = (2 * LOG2 + LOG_TWO_THIRDS) / 2
    assert prepared.figures["logged_kl_to_reference"] == pytest.approx(mean_kl)


def test_reinforce_returns_are_the_reward_less_kl_coef_times_the_sequences_kl(
    tmp_path: Path,
) -> None:
    prepared = Reinforce(config(tmp_path)).prepare(policy(), reference(), KL_SHAPED, 0.5)
    torch.testing.assert_close(prepared.returns, torch.tensor([RETURN_A, RETURN_B]))


def test_actor_critic_whitens_advantages_over_real_tokens_weighted_by_client_weight(
    tmp_path: Path,
) -> None:
    """A = [1, 1] rated 1, B = [2] rated -1 and padded: with no KL and a zero critic the raw
    advantages are 1, 1 and -1; the padding is neither counted nor given an advantage."""
    algorithm = ActorCritic(config(tmp_path))
    even = algorithm.prepare(policy(), reference(), experience([[1, 1], [2]], [1.0, -1.0]), 0.0)
    # mean 1/3, variance 8/9 over the three real tokens
    r2 = math.sqrt(2.0)
    torch.testing.assert_close(even.advantages, torch.tensor([[1 / r2, 1 / r2], [-r2, 0.0]]))
    # B's client weight 2 counts its token twice: mean 0, variance 1
    weighted = algorithm.prepare(
        policy(), reference(), experience([[1, 1], [2]], [1.0, -1.0], [1.0, 2.0]), 0.0
    )
    torch.testing.assert_close(weighted.advantages, torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))


@pytest.mark.parametrize("algorithm", [ActorCritic, Reinforce, SoftQLearning])
def test_with_no_reward_the_kl_penalty_alone_pulls_the_policy_towards_the_reference(
    algorithm: type[ActorCritic] | type[Reinforce] | type[SoftQLearning], tmp_path: Path
) -> None:
    """Unrated token 1 sits above the reference and token 2 below: the penalty lowers the one
    and raises the other, whatever the critic learns meanwhile."""
    trained = policy()
    before = kl_to_reference(trained)
    c = config(tmp_path, learning_rate=0.05, minibatch_size=2, epochs=5, target_approx_kl=10.0)
    result = algorithm(c).update(trained, reference(), experience([[1], [2]], [0.0, 0.0]), 1.0)
    assert result.steps == 5
    probs = trained.probabilities()
    assert probs[1] < 1 / 2 and probs[2] > 1 / 6
    assert kl_to_reference(trained) < before


# The losses, worked out by hand: prepared on `policy()` from A = [1, 1] rated 1 and B = [2]
# rated -1 with client weights 1 and 2 and no KL, then evaluated on the uniform reference, so
# that pi / pi_old is 1/2 on token 1 and 3/2 on token 2. The critic is 0 throughout.
MOVED = experience([[1, 1], [2]], [1.0, -1.0], [1.0, 2.0])
COEFS = dict(clip_eps=0.2, value_coef=0.5, entropy_coef=0.25, importance_weight_max=10.0)
K3 = {1: -0.5 + LOG2, 2: 0.5 - math.log(1.5)}  # (r - 1) - log r at r = 1/2 and r = 3/2


def losses(algorithm: type[ActorCritic] | type[Reinforce], tmp_path: Path) -> Any:
    step = algorithm(config(tmp_path, **COEFS))
    prepared = step.prepare(policy(), reference(), MOVED, 0.0)
    return step.loss(reference(), prepared, MOVED.batch, torch.arange(2))


def test_actor_critic_loss_is_the_clipped_surrogate_plus_value_loss_less_entropy_bonus(
    tmp_path: Path,
) -> None:
    """Whitened with weights 1, 1 (A's tokens) and 2 (B's), the advantages are 1, 1 and -1.
    Token 1 (A > 0, ratio 1/2 below the clip range) keeps -A * 1/2; token 2 (A < 0, ratio 3/2
    above it) keeps -A * 3/2: the weighted mean is (2 * -1/2 + 2 * 3/2) / 4 = 1/2. The value
    loss is 0.5 * E_w[(0 - R)^2] = 0.5 and the entropy of the uniform policy log 4."""
    step = losses(ActorCritic, tmp_path)
    assert step.figures["policy_loss"] == pytest.approx(0.5, abs=1e-5)
    assert step.figures["value_loss"] == pytest.approx(0.5, abs=1e-5)
    assert step.figures["entropy"] == pytest.approx(math.log(4.0), abs=1e-5)
    assert step.figures["clipfrac"] == pytest.approx(1.0)  # every token's ratio is clipped
    assert float(step.loss.detach()) == pytest.approx(
        0.5 + 0.5 * 0.5 - 0.25 * math.log(4.0), abs=1e-5
    )
    assert step.approx_kl == pytest.approx((2 * K3[1] + 2 * K3[2]) / 4, abs=1e-5)


def test_reinforce_loss_is_the_weighted_baseline_gradient_plus_value_loss_less_entropy_bonus(
    tmp_path: Path,
) -> None:
    """The sequence weights pi / mu are (1/4 / 1/2)^2 = 1/4 for A and (1/4) / (1/6) = 3/2 for B,
    times the client weights: 1/4 and 3. The returns 1 and -1 are scaled by their std sqrt 2."""
    step = losses(Reinforce, tmp_path)
    scale = math.sqrt(2.0) + 1e-6
    log_quarter = math.log(0.25)
    policy_loss = -(0.25 * (1 / scale) * 2 * log_quarter + 3.0 * (-1 / scale) * log_quarter) / 3.25
    assert step.figures["policy_loss"] == pytest.approx(policy_loss, abs=1e-5)
    assert step.figures["value_loss"] == pytest.approx(0.5, abs=1e-5)
    assert step.figures["entropy"] == pytest.approx(math.log(4.0), abs=1e-5)
    assert step.figures["mean_importance_weight"] == pytest.approx((0.25 + 3.0) / 2, abs=1e-5)
    expected = policy_loss + 0.5 * 0.5 - 0.25 * math.log(4.0)
    assert float(step.loss.detach()) == pytest.approx(expected, abs=1e-5)
    # per token, unweighted by clients: A's two tokens at ratio 1/2, B's one at 3/2
    assert step.approx_kl == pytest.approx((2 * K3[1] + K3[2]) / 3, abs=1e-5)


def test_actor_critic_weights_each_logged_token_by_pi_old_over_mu_truncated(
    tmp_path: Path,
) -> None:
    """Logged by the uniform policy: pi_old / mu is (1/2) / (1/4) = 2 on token 1, (1/6) / (1/4)
    = 2/3 on token 2; with the truncation at 1.5 token 1 counts 1.5."""
    logged_uniform = Experience(
        MOVED.batch,
        torch.full((2, 2), math.log(0.25)) * MOVED.batch.output_mask,
        MOVED.rewards,
        MOVED.weights,
    )
    step = ActorCritic(config(tmp_path, importance_weight_max=1.5))
    prepared = step.prepare(policy(), reference(), logged_uniform, 0.0)
    torch.testing.assert_close(prepared.importance, torch.tensor([[1.5, 1.5], [2 / 3, 0.0]]))
    torch.testing.assert_close(prepared.weighted_mask, torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
    assert prepared.figures["mean_importance_weight"] == pytest.approx((3.0 + 2 / 3) / 3)
    # the critic (0 everywhere) explains none of the returns' variance
    assert prepared.figures["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    # Each token's clipped term (-1/2 on token 1, 3/2 on token 2, as in the loss test above)
    # carries its weight: (2 * 1.5 * -1/2 + 2 * 2/3 * 3/2) / 4 = 1/8.
    loss = step.loss(reference(), prepared, MOVED.batch, torch.arange(2))
    assert loss.figures["policy_loss"] == pytest.approx(0.125, abs=1e-5)


def test_reinforce_scales_returns_by_their_spread_and_sums_the_logged_log_probs(
    tmp_path: Path,
) -> None:
    step = Reinforce(config(tmp_path))
    prepared = step.prepare(policy(), reference(), MOVED, 0.0)
    assert prepared.return_scale == pytest.approx(math.sqrt(2.0) + 1e-6, abs=1e-7)
    torch.testing.assert_close(
        prepared.behaviour_logprobs, torch.tensor([2 * math.log(0.5), math.log(1 / 6)])
    )
    torch.testing.assert_close(prepared.weights, torch.tensor([1.0, 2.0]))
    assert prepared.figures == {
        "logged_kl_to_reference": pytest.approx((2 * LOG2 + LOG_TWO_THIRDS) / 2, abs=1e-6)
    }
    one = step.prepare(policy(), reference(), experience([[1]], [0.5]), 0.0)
    assert one.return_scale == 1.0  # one sequence has no spread to scale by
    tied = step.prepare(policy(), reference(), experience([[1], [1]], [0.5, 0.5]), 0.0)
    assert tied.return_scale == pytest.approx(1e-6, rel=1e-3)  # no spread: never a zero division


def test_make_algorithm_builds_the_configured_one_and_names_the_choices_otherwise(
    tmp_path: Path,
) -> None:
    assert isinstance(make_algorithm(config(tmp_path, algorithm="reinforce")), Reinforce)
    assert isinstance(make_algorithm(config(tmp_path)), ActorCritic)
    assert isinstance(make_algorithm(config(tmp_path, algorithm="q-learning")), SoftQLearning)
    with pytest.raises(
        ValueError, match=r"^unknown algorithm 'q' \(one of actor-critic, reinforce, q-learning\)$"
    ):
        make_algorithm(config(tmp_path, algorithm="q"))


def test_reinforce_subtracts_the_critics_first_value_as_baseline_and_fits_it_to_the_return(
    tmp_path: Path,
) -> None:
    """Returns 1 and 0 (spread 1 / sqrt 2), a critic at 1/2: advantages +-1/2 before scaling,
    and a value loss 0.5 * E[(1/2 - G)^2] = 1/8. Weights as in the loss test: 1/4 and 3."""
    step = Reinforce(config(tmp_path, **COEFS))
    uneven = experience([[1, 1], [2]], [1.0, 0.0], [1.0, 2.0])
    prepared = step.prepare(policy(), reference(), uneven, 0.0)
    critic = reference()
    with torch.no_grad():
        critic.value.fill_(0.5)
    loss = step.loss(critic, prepared, uneven.batch, torch.arange(2))
    scale = math.sqrt(0.5) + 1e-6
    log_quarter = math.log(0.25)
    policy_loss = (
        -(0.25 * (0.5 / scale) * 2 * log_quarter + 3.0 * (-0.5 / scale) * log_quarter) / 3.25
    )
    assert loss.figures["policy_loss"] == pytest.approx(policy_loss, abs=1e-5)
    assert loss.figures["value_loss"] == pytest.approx(0.125, abs=1e-6)

"""The update loop every algorithm shares: an algorithm that writes only prepare and loss runs."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from trainer_support import one_torch_thread

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.policy import Policy, TokenBatch, token_logprobs
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.update import (
    Algorithm,
    Experience,
    LoggedScores,
    StepLoss,
    TrainingDiverged,
    _mean,
    check_finite,
    correction_loss,
    minibatches,
    score_logged,
    select,
)

__all__ = ["one_torch_thread"]


@dataclass
class Probe:
    """What the probe algorithm prepared, and what the loop asked of it."""

    figures: dict[str, float]
    approx_kls: list[float]
    rows_seen: list[int] = field(default_factory=list)


class ProbeAlgorithm(Algorithm[Probe]):
    """A third algorithm in two methods: loss = offset + mean value; approx_kl as scripted."""

    name = "probe"

    def __init__(self, config: TrainConfig, approx_kls: list[float], loss_offset: float = 0.0):
        super().__init__(config)
        self.approx_kls = approx_kls
        self.loss_offset = loss_offset

    def prepare(
        self, policy: Policy, reference: Policy, experience: Experience, kl_coef: float
    ) -> Probe:
        return Probe({"prepared_kl_coef": kl_coef}, list(self.approx_kls))

    def loss(
        self, policy: Policy, prepared: Probe, minibatch: TokenBatch, index: torch.Tensor
    ) -> StepLoss:
        prepared.rows_seen.append(len(index))
        values = policy.teacher_forced(minibatch).values
        step = len(prepared.rows_seen)
        return StepLoss(
            self.loss_offset + values.mean(),
            prepared.approx_kls[step - 1],
            {"step_number": float(step)},
        )


def experience(policy: Policy, n: int) -> Experience:
    batch = TokenBatch.from_lists([policy.encode_prompt("little")] * n, [[5, 6, 7]] * n)
    return Experience(batch, torch.full((n, 3), -1.0), torch.linspace(-1, 1, n), torch.ones(n))


@pytest.fixture
def policy(tiny_checkpoint: Path) -> Policy:
    return load_checkpoint(tiny_checkpoint)[0]


def config(tmp_path: Path, **overrides: float) -> TrainConfig:
    values: dict = dict(data_dir=tmp_path, minibatch_size=4, epochs=3, target_approx_kl=0.5)
    values.update(overrides)
    return TrainConfig(**values)


def test_the_loop_runs_minibatch_steps_and_averages_each_figure_over_them(
    policy: Policy, tmp_path: Path
) -> None:
    algorithm = ProbeAlgorithm(config(tmp_path), [0.0, 0.2, 0.1, 0.3, 0.0, 0.0])
    before = [p.detach().clone() for p in policy.parameters()]

    result = algorithm.update(policy, policy, experience(policy, 8), 0.25)

    assert result.steps == 6  # 3 epochs of 8 rows in minibatches of 4
    assert result.figures["step_number"] == pytest.approx(3.5)  # mean of 1..6
    assert result.figures["approx_kl"] == pytest.approx(0.1)
    assert result.figures["prepared_kl_coef"] == 0.25  # prepare's figures, as measured
    assert result.figures["mean_reward"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(result.figures["grad_norm"])
    assert result.figures["correction_loss"] == 0.0  # no corrections in this experience
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_the_loop_stops_the_round_once_approx_kl_passes_the_target(
    policy: Policy, tmp_path: Path
) -> None:
    algorithm = ProbeAlgorithm(config(tmp_path), [0.1, 0.6, 0.0, 0.0, 0.0, 0.0])
    steps: list[int] = []
    result = algorithm.update(policy, policy, experience(policy, 8), 0.1, on_step=steps.append)
    assert result.steps == 2 and steps == [1, 2]


def test_the_loop_abandons_the_round_on_a_loss_past_its_bound(
    policy: Policy, tmp_path: Path
) -> None:
    algorithm = ProbeAlgorithm(config(tmp_path, max_loss=1.0), [0.0] * 6, loss_offset=1e6)
    with pytest.raises(TrainingDiverged, match=r"^loss = 1e\+06 \(bound 1\): round abandoned$"):
        algorithm.update(policy, policy, experience(policy, 8), 0.1)


class NaNGradient(ProbeAlgorithm):
    """A finite loss whose gradient is not: sqrt at 0, times 0."""

    def loss(
        self, policy: Policy, prepared: Probe, minibatch: TokenBatch, index: torch.Tensor
    ) -> StepLoss:
        values = policy.teacher_forced(minibatch).values
        return StepLoss(torch.sqrt(values.mean() * 0.0), 0.0, {})


def test_the_loop_abandons_the_round_on_a_gradient_that_is_not_finite(
    policy: Policy, tmp_path: Path
) -> None:
    algorithm = NaNGradient(config(tmp_path), [0.0] * 6)
    with pytest.raises(TrainingDiverged, match=r"^grad norm = nan \(bound inf\): round abandoned$"):
        algorithm.update(policy, policy, experience(policy, 8), 0.1)


def test_minibatches_are_shuffled_passes_over_every_row_cut_at_the_step_cap() -> None:
    batches = list(minibatches(5, 2, 2, 100, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1]
    assert sorted(torch.cat(batches[:3]).tolist()) == sorted(torch.cat(batches[3:]).tolist())
    assert sorted(torch.cat(batches[:3]).tolist()) == [0, 1, 2, 3, 4]
    capped = list(minibatches(5, 2, 2, 4, torch.Generator().manual_seed(0)))
    assert [b.tolist() for b in capped] == [b.tolist() for b in batches[:4]]
    assert list(minibatches(5, 2, 2, 0, torch.Generator())) == []


def test_a_minibatch_selects_the_same_rows_of_prompts_outputs_and_lengths() -> None:
    batch = TokenBatch.from_lists([[5], [6, 7], [8, 9, 10]], [[11, 12], [13], [14, 15, 16]])
    chosen = select(batch, torch.tensor([2, 0]))
    assert chosen.prompt_ids.tolist() == [[8, 9, 10], [5, 0, 0]]
    assert chosen.prompt_lengths.tolist() == [3, 1]
    assert chosen.output_ids.tolist() == [[14, 15, 16], [11, 12, 0]]
    assert chosen.output_lengths.tolist() == [3, 2]


def test_the_correction_loss_is_the_weighted_nll_per_token_of_the_corrections(
    policy: Policy,
) -> None:
    corrections = TokenBatch.from_lists([[5], [6]], [[7, 8, 2], [9, 2]])
    plain = experience(policy, 2)
    assert float(correction_loss(policy, plain, 8, torch.Generator())) == 0.0
    weighted = Experience(
        plain.batch,
        plain.behaviour_logprobs,
        plain.rewards,
        plain.weights,
        corrections,
        torch.tensor([1.0, 0.0]),  # the second correction weighs nothing
    )
    loss = correction_loss(policy, weighted, 8, torch.Generator().manual_seed(0))
    first = select(corrections, torch.tensor([0]))
    with torch.no_grad():
        logprobs = token_logprobs(policy.teacher_forced(first).logits, first.output_ids)
    assert float(loss.detach()) == pytest.approx(-float(logprobs.mean()), rel=1e-5)


def test_a_figure_exactly_at_its_bound_is_finite_and_nan_or_past_it_diverges() -> None:
    check_finite("loss", torch.tensor(-1.0), 1.0)
    for value in (1.5, -1.5, float("nan"), float("inf")):
        with pytest.raises(TrainingDiverged):
            check_finite("loss", torch.tensor(value), 1.0)
    with pytest.raises(TrainingDiverged, match=r"^grad norm = 2\.5 \(bound 1\): round abandoned$"):
        check_finite("grad norm", torch.tensor(2.5), 1.0)


def test_the_logged_kl_to_reference_sums_each_sequences_real_tokens() -> None:
    scores = LoggedScores(
        old_logprobs=torch.tensor([[-1.0, -2.0], [-0.5, -9.0]]),
        old_values=torch.zeros(2, 2),
        ref_logprobs=torch.tensor([[-1.5, -1.0], [-1.0, 0.0]]),
    )
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(scores.kl_to_reference(mask), torch.tensor([-0.5, 0.5]))


def test_score_logged_scores_the_logged_tokens_under_the_policy_and_the_reference(
    policy: Policy,
) -> None:
    batch = experience(policy, 2).batch
    other = load_checkpoint_copy_with_shifted_bias(policy)
    scores = score_logged(policy, other, batch)
    with torch.no_grad():
        out = policy.teacher_forced(batch)
        expected_old = token_logprobs(out.logits, batch.output_ids)
        expected_ref = token_logprobs(other.teacher_forced(batch).logits, batch.output_ids)
    torch.testing.assert_close(scores.old_logprobs, expected_old)
    torch.testing.assert_close(scores.old_values, out.values)
    torch.testing.assert_close(scores.ref_logprobs, expected_ref)
    assert not torch.equal(scores.old_logprobs, scores.ref_logprobs)


def load_checkpoint_copy_with_shifted_bias(policy: Policy) -> Policy:
    shifted = copy.deepcopy(policy)
    with torch.no_grad():
        shifted.output.bias[6] += 1.0  # type: ignore[union-attr,index]
    return shifted


def test_a_figure_no_step_measured_averages_to_nan_not_zero() -> None:
    assert math.isnan(_mean([]))
    assert _mean([1.0, 2.0]) == 1.5


def test_the_correction_loss_samples_its_corrections_with_the_rounds_generator(
    policy: Policy,
) -> None:
    """16 corrections of different lengths, 8 sampled: the draw is the generator's, so a round
    is reproducible from its seed."""
    outputs = [[5 + i % 7] * (1 + i % 5) + [2] for i in range(16)]
    corrections = TokenBatch.from_lists([[5]] * 16, outputs)
    plain = experience(policy, 2)
    with_corrections = Experience(
        plain.batch,
        plain.behaviour_logprobs,
        plain.rewards,
        plain.weights,
        corrections,
        torch.ones(16),
    )
    loss = correction_loss(policy, with_corrections, 8, torch.Generator().manual_seed(7))
    chosen = select(corrections, torch.randperm(16, generator=torch.Generator().manual_seed(7))[:8])
    with torch.no_grad():
        logprobs = token_logprobs(policy.teacher_forced(chosen).logits, chosen.output_ids)
    expected = -float((logprobs * chosen.output_mask).sum() / chosen.output_mask.sum())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)

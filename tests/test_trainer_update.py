"""The update loop every algorithm shares: an algorithm that writes only prepare and loss runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from trainer_support import one_torch_thread

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.policy import Policy, TokenBatch
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.update import Algorithm, Experience, StepLoss, TrainingDiverged

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
    with pytest.raises(TrainingDiverged, match="round abandoned"):
        algorithm.update(policy, policy, experience(policy, 8), 0.1)

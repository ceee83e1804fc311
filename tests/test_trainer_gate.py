"""The evaluation gate's figures: perplexity, KL to reference, off-policy values."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from trainer_support import SPLIT, TRAIN_PROMPTS, one_torch_thread

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.policy import SampleRequest
from feedloop.core.sampling import SamplingParams
from feedloop.demo.simulate import generation_records
from feedloop.demo.simusers import IncludeWord, SimulatedUser
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.gate import (
    Gate,
    kl_to_reference,
    off_policy_values,
    sequence_behaviour_logprobs,
    served_logprobs,
)

__all__ = ["one_torch_thread"]


def logged(policy, params: SamplingParams, n: int = 24):  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    prompts = TRAIN_PROMPTS[:n]
    records = []
    outs = policy.sample(
        [
            SampleRequest(
                policy.encode_prompt(p),
                SamplingParams(
                    params.temperature, params.top_k, params.top_p, params.max_tokens, i + 1
                ),
            )
            for i, p in enumerate(prompts)
        ]
    )
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        sp = SamplingParams(
            params.temperature, params.top_k, params.top_p, params.max_tokens, i + 1
        )
        records += generation_records(policy, "v0001", prompt, out, sp, "app", rng)
    return records


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=12),
        SamplingParams(temperature=0.7, top_k=20, max_tokens=12),
        SamplingParams(top_p=0.8, max_tokens=12),
    ],
    ids=["plain", "temperature-top-k", "top-p"],
)
def test_the_behaviour_policy_served_as_logged_has_importance_weight_one(
    tiny_checkpoint: Path, params: SamplingParams
) -> None:
    policy, _ = load_checkpoint(tiny_checkpoint)
    records = logged(policy, params)
    assert torch.allclose(
        served_logprobs(policy, records).double(), sequence_behaviour_logprobs(records), atol=1e-3
    )


def test_off_policy_value_of_the_behaviour_policy_is_the_logged_mean(tiny_checkpoint: Path) -> None:
    policy, _ = load_checkpoint(tiny_checkpoint)
    records = logged(policy, SamplingParams(temperature=0.8, max_tokens=12))
    rewards = torch.linspace(-1, 1, len(records), dtype=torch.float64)
    values = off_policy_values(policy, records, rewards, None, weight_max=20.0, seed=0)
    assert values["snips"]["value"] == pytest.approx(float(rewards.mean()), abs=1e-3)
    assert values["ess"] == pytest.approx(len(records), rel=1e-2)
    assert values["snips"]["ci_low"] < values["snips"]["value"] < values["snips"]["ci_high"]


def test_kl_of_a_policy_to_itself_is_zero(tiny_checkpoint: Path) -> None:
    policy, _ = load_checkpoint(tiny_checkpoint)
    kl = kl_to_reference(policy, policy, TRAIN_PROMPTS[:16], seed=0)
    assert kl["kl_k1"] == pytest.approx(0.0, abs=1e-5)
    assert kl["kl_k3"] == pytest.approx(0.0, abs=1e-5)


def test_the_gate_passes_an_unchanged_candidate_and_refuses_a_damaged_one(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    policy, _ = load_checkpoint(tiny_checkpoint)
    config = TrainConfig(data_dir=tmp_path, gate_kl_prompts=16, gate_min_ope_samples=5)
    gate = Gate(config, policy, SPLIT.test)
    records = logged(policy, SamplingParams(max_tokens=12))
    user = SimulatedUser(IncludeWord("good"))
    heldout = [(r, 2 * user.preference.reward(r.text) - 1) for r in records]

    same = gate.evaluate(copy.deepcopy(policy), policy, heldout, None, seed=0)
    assert same.passed, same.reasons
    assert same.figures["perplexity_ratio_live"] == pytest.approx(1.0, abs=1e-4)
    assert "ope_candidate" in same.figures

    damaged = copy.deepcopy(policy)
    with torch.no_grad():
        damaged.output.bias.add_(torch.randn_like(damaged.output.bias) * 3)  # type: ignore[union-attr]
    report = gate.evaluate(damaged, policy, heldout, None, seed=0)
    assert not report.passed
    assert any("perplexity" in reason for reason in report.reasons)

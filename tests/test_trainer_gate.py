"""The evaluation gate's figures: perplexity, KL to reference, off-policy values."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from test_gate_estimates import constant_reward_model
from trainer_support import SPLIT, TRAIN_PROMPTS, one_torch_thread

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.policy import Policy, SampleRequest
from feedloop.core.sampling import SamplingParams
from feedloop.demo.simulate import generation_records
from feedloop.demo.simusers import IncludeWord, SimulatedUser
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.gate import (
    Gate,
    best_so_far,
    heldout_pairs,
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

    same = gate.evaluate(copy.deepcopy(policy), policy, heldout, None, seed=0, live_version="v0001")
    assert same.passed, same.reasons
    assert same.figures["perplexity_ratio_live"] == pytest.approx(1.0, abs=1e-4)
    assert "ope_candidate" in same.figures

    damaged = copy.deepcopy(policy)
    with torch.no_grad():
        damaged.output.bias.add_(torch.randn_like(damaged.output.bias) * 3)  # type: ignore[union-attr]
    report = gate.evaluate(damaged, policy, heldout, None, seed=0, live_version="v0001")
    assert not report.passed
    assert any("perplexity" in reason for reason in report.reasons)


def leaning(policy: Policy, word: str, logit_shift: float) -> Policy:
    """A copy of `policy` that writes `word` more often (shift > 0) or less (< 0)."""
    leaned = copy.deepcopy(policy)
    with torch.no_grad():
        leaned.output.bias[policy.tokenizer.id_of(word)] += logit_shift  # type: ignore[union-attr]
    return leaned


@pytest.fixture
def best_so_far_setting(tiny_checkpoint: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Users who like "good"; live (v0002) writes it as the logging policy did, an older live
    version (v0001) writes it far more often, so by every estimate live is worse than v0001."""
    live, _ = load_checkpoint(tiny_checkpoint)
    config = TrainConfig(data_dir=tmp_path, gate_kl_prompts=16, gate_min_ope_samples=5)
    gate = Gate(config, live, SPLIT.test)
    user = SimulatedUser(IncludeWord("good"))
    heldout = [
        (r, 2 * user.preference.reward(r.text) - 1)
        for r in logged(live, SamplingParams(max_tokens=12))
    ]
    return gate, live, leaning(live, "good", 2.0), heldout


def test_a_candidate_a_little_worse_than_live_is_refused_when_an_earlier_version_was_better(
    best_so_far_setting,  # type: ignore[no-untyped-def]
) -> None:
    gate, live, older, heldout = best_so_far_setting
    candidate = leaning(live, "good", -0.2)  # one small step of a downward chain

    live_only = gate.evaluate(candidate, live, heldout, None, seed=0, live_version="v0002")
    assert live_only.passed, live_only.reasons  # within the noise of live's estimate
    assert live_only.figures["ope_best_version"] == "v0002"

    report = gate.evaluate(
        candidate, live, heldout, None, seed=0, live_version="v0002", recent=[("v0001", older)]
    )
    assert not report.passed
    f = report.figures
    assert f["ope_estimator"] == "snips"
    assert f["ope_best_version"] == "v0001"
    assert f["ope_best_value"] == f["ope_recent"]["v0001"]["snips"]["value"]
    assert f["ope_best_value"] > f["ope_live"]["snips"]["value"]
    assert f["ope_candidate"]["snips"]["ci_high"] < f["ope_best_value"]
    assert f["ope_candidate"]["snips"]["ci_high"] >= f["ope_live"]["snips"]["value"]
    assert any("clearly below v0001's" in reason for reason in report.reasons)


def test_a_candidate_better_than_live_and_every_earlier_version_passes(
    best_so_far_setting,  # type: ignore[no-untyped-def]
) -> None:
    gate, live, older, heldout = best_so_far_setting
    candidate = leaning(live, "good", 2.5)

    report = gate.evaluate(
        candidate, live, heldout, None, seed=0, live_version="v0002", recent=[("v0001", older)]
    )
    assert report.passed, report.reasons
    f = report.figures
    assert f["ope_best_version"] == "v0001"
    assert f["ope_candidate"]["snips"]["value"] > f["ope_best_value"]


def test_the_best_so_far_is_the_highest_finite_estimate_and_live_wins_a_tie() -> None:
    def estimate(value: float) -> dict:
        return {"snips": {"value": value}}

    assert (
        best_so_far({"v3": estimate(0.1), "v2": estimate(0.4), "v1": estimate(0.2)}, "snips")
        == "v2"
    )
    assert best_so_far({"v3": estimate(0.4), "v2": estimate(0.4)}, "snips") == "v3"
    assert best_so_far({"v3": estimate(float("nan")), "v2": estimate(-0.5)}, "snips") == "v2"
    assert best_so_far({"v3": estimate(float("nan"))}, "snips") is None


def test_a_negative_number_of_earlier_versions_to_compare_with_is_a_config_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="gate_best_of_recent"):
        TrainConfig(data_dir=tmp_path, gate_best_of_recent=-1)


def test_a_refusal_names_the_version_it_falls_below_and_how_many_were_compared(
    best_so_far_setting,  # type: ignore[no-untyped-def]
) -> None:
    gate, live, older, heldout = best_so_far_setting
    worse = leaning(live, "good", -3.0)
    alone = gate.evaluate(worse, live, heldout, None, seed=0, live_version="v0002")
    assert not alone.passed
    live_value = alone.figures["ope_best_value"]
    assert alone.reasons[-1].endswith(f"is clearly below live v0002's {live_value:.3f}")

    candidate = leaning(live, "good", -0.2)
    for recent, compared in (
        ([("v0001", older)], "1 earlier live version"),
        ([("v0001", older), ("v0000", older)], "2 earlier live versions"),
    ):
        report = gate.evaluate(
            candidate, live, heldout, None, seed=0, live_version="v0002", recent=recent
        )
        best = report.figures["ope_best_value"]
        assert report.reasons[-1].endswith(
            f"is clearly below v0001's {best:.3f}, the best of live v0002 and {compared}"
        )


def test_with_a_reward_model_every_version_is_valued_doubly_robust(
    best_so_far_setting,  # type: ignore[no-untyped-def]
) -> None:
    gate, live, older, heldout = best_so_far_setting
    report = gate.evaluate(
        live,
        live,
        heldout,
        constant_reward_model(0.0),
        seed=0,
        live_version="v0002",
        recent=[("v0001", older)],
    )
    f = report.figures
    assert f["ope_estimator"] == "dr"
    assert all("dr" in f[k] and "dm" in f[k] for k in ("ope_candidate", "ope_live"))
    assert "dr" in f["ope_recent"]["v0001"]


def test_the_gates_prompts_are_fixed_by_the_seed() -> None:
    assert heldout_pairs(SPLIT.test, 3) == heldout_pairs(SPLIT.test, 3)
    assert heldout_pairs(SPLIT.test, 3) != heldout_pairs(SPLIT.test, 4)


def test_the_gate_values_the_ratings_at_their_full_precision(
    best_so_far_setting,  # type: ignore[no-untyped-def]
) -> None:
    gate, live, _, heldout = best_so_far_setting
    tenths = [(record, (i % 7) / 10 - 0.3) for i, (record, _) in enumerate(heldout)]
    report = gate.evaluate(live, live, tenths, None, seed=0, live_version="v0002")
    ratings = torch.tensor([r for _, r in tenths], dtype=torch.float64)
    records = [record for record, _ in tenths]
    weight_max = gate.config.gate_ope_weight_max
    expected = off_policy_values(live, records, ratings, None, weight_max=weight_max, seed=0)
    assert report.figures["ope_candidate"]["snips"] == expected["snips"]

"""The gate's checks one at a time: each refuses alone, and a figure exactly at its bound passes.

The live policy and the candidate are two perturbations of the tiny policy, the reference the
tiny policy itself, so the candidate's perplexity differs from both and its KL is positive.
Each bound is then set to the figure the gate measured (passes) or to the float just below it
(refused, by that check alone).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_support import SPLIT, one_torch_thread

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.diversity import diversity
from feedloop.core.evaluation import keyword_inclusion, perplexity
from feedloop.core.policy import Policy, SampleRequest
from feedloop.core.sampling import SamplingParams
from feedloop.trainer import gate as gate_module
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.gate import Gate, GateReport

__all__ = ["one_torch_thread"]

NO_OPE = "no off-policy check"
LOOSE = dict(
    gate_max_perplexity_ratio_live=1e9, gate_max_perplexity_ratio_reference=1e9, gate_max_kl=1e9
)


def perturbed(policy: Policy, seed: int, scale: float) -> Policy:
    copy_ = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bias = copy_.output.bias  # type: ignore[union-attr]
        bias.add_(torch.randn(bias.shape, generator=generator) * scale)
    return copy_


@pytest.fixture(scope="module")
def setting(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reference, _ = load_checkpoint(tiny_checkpoint)
    config = TrainConfig(data_dir=tmp_path_factory.mktemp("gate"), gate_kl_prompts=8, **LOOSE)
    gate = Gate(config, reference, SPLIT.test)
    live, candidate = perturbed(reference, 1, 0.2), perturbed(reference, 2, 0.5)
    figures = gate.evaluate(candidate, live, [], None, seed=0, live_version="v0002").figures
    return {"gate": gate, "config": config, "live": live, "candidate": candidate, **figures}


def evaluate(setting: dict[str, Any], **bounds: float) -> GateReport:
    gate: Gate = setting["gate"]
    gate.config = replace(setting["config"], **bounds)
    return gate.evaluate(
        setting["candidate"], setting["live"], [], None, seed=0, live_version="v0002"
    )


def refusals(report: GateReport) -> list[str]:
    return [r for r in report.reasons if not r.startswith((NO_OPE, "passed"))]


@pytest.mark.parametrize(
    ("bound", "figure", "words"),
    [
        ("gate_max_perplexity_ratio_live", "perplexity_ratio_live", "x live's"),
        ("gate_max_perplexity_ratio_reference", "perplexity_ratio_reference", "the reference's"),
        ("gate_max_kl", "kl_to_reference", "KL to reference"),
    ],
)
def test_each_check_passes_a_figure_at_its_bound_and_alone_refuses_one_above(
    setting: dict[str, Any], bound: str, figure: str, words: str
) -> None:
    measured = setting[figure]
    assert measured > 0 and measured != 1.0
    at_bound = evaluate(setting, **{bound: measured})
    assert at_bound.passed, at_bound.reasons
    assert at_bound.reasons[0].startswith("passed")
    above = evaluate(setting, **{bound: math.nextafter(measured, 0.0)})
    assert not above.passed
    assert len(refusals(above)) == 1 and words in refusals(above)[0]


def test_the_two_perplexity_checks_compare_with_live_and_with_the_reference(
    setting: dict[str, Any],
) -> None:
    ppl = setting["perplexity_candidate"]
    assert setting["perplexity_ratio_live"] == pytest.approx(ppl / setting["perplexity_live"])
    assert setting["perplexity_ratio_reference"] == pytest.approx(
        ppl / setting["perplexity_reference"]
    )
    assert setting["perplexity_live"] != setting["perplexity_reference"]


def estimate(value: float, ci_high: float) -> dict[str, float]:
    return {"value": value, "ci_low": value - 1.0, "ci_high": ci_high, "n": 10}


@pytest.mark.parametrize(
    ("candidate", "live", "passed"),
    [
        # snips only: refused when the candidate's interval ends below live's value
        ({"snips": estimate(0.0, 0.5)}, {"snips": estimate(0.5, 0.9)}, True),
        ({"snips": estimate(0.0, math.nextafter(0.5, 0))}, {"snips": estimate(0.5, 0.9)}, False),
        # with a reward model the doubly robust estimate decides, whatever SNIPS says
        (
            {"snips": estimate(0.0, 0.1), "dr": estimate(0.0, 0.5)},
            {"snips": estimate(0.5, 0.9), "dr": estimate(0.5, 0.9)},
            True,
        ),
        (
            {"snips": estimate(0.9, 1.0), "dr": estimate(0.0, 0.4)},
            {"snips": estimate(0.5, 0.9), "dr": estimate(0.5, 0.9)},
            False,
        ),
    ],
)
def test_the_off_policy_check_refuses_only_an_interval_wholly_below_lives_value(
    setting: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    candidate: dict[str, Any],
    live: dict[str, Any],
    passed: bool,
) -> None:
    def values(policy: Policy, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return candidate if policy is setting["candidate"] else live

    monkeypatch.setattr(gate_module, "off_policy_values", values)
    gate: Gate = setting["gate"]
    gate.config = replace(setting["config"], gate_min_ope_samples=1)
    records = [(object(), 1.0)]
    report = gate.evaluate(
        setting["candidate"], setting["live"], records, None, seed=0, live_version="v0002"
    )  # type: ignore[arg-type]
    assert report.passed is passed
    assert (report.figures["ope_candidate"], report.figures["ope_live"]) == (candidate, live)
    assert len(refusals(report)) == (0 if passed else 1)
    if not passed:
        assert "clearly below" in refusals(report)[0]


def test_too_few_heldout_ratings_skip_the_off_policy_check_and_say_so(
    setting: dict[str, Any],
) -> None:
    report = evaluate(setting)
    assert report.passed
    assert report.figures["ope_heldout"] == 0 and "ope_candidate" not in report.figures
    assert any(r.startswith(NO_OPE) for r in report.reasons)


def test_each_perplexity_is_reported_and_lives_is_measured_once_per_live_policy(
    setting: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate: Gate = setting["gate"]
    gate.config = setting["config"]
    measured: list[Policy] = []

    def counted(policy: Policy, pairs: Any) -> float:
        measured.append(policy)
        return perplexity(policy, pairs)

    monkeypatch.setattr(gate_module, "perplexity", counted)
    candidate, live = setting["candidate"], setting["live"]
    first = gate.evaluate(candidate, live, [], None, seed=0, live_version="v0002").figures
    gate.evaluate(candidate, live, [], None, seed=0, live_version="v0002")
    assert sum(p is live for p in measured) <= 1  # the same live policy: its figure is kept
    assert first["perplexity_candidate"] == perplexity(candidate, gate.pairs)
    assert first["perplexity_live"] == perplexity(live, gate.pairs)
    assert first["perplexity_reference"] == perplexity(gate.reference, gate.pairs)

    new_live = perturbed(gate.reference, 3, 0.3)
    after_swap = gate.evaluate(candidate, new_live, [], None, seed=0, live_version="v0003")
    assert after_swap.figures["perplexity_live"] == perplexity(new_live, gate.pairs)
    assert sum(p is new_live for p in measured) == 1


def test_every_report_carries_keyword_inclusion_of_candidate_and_live_on_one_seed(
    setting: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate: Gate = setting["gate"]
    gate.config = setting["config"]
    candidate = setting["candidate"]
    seed = setting["config"].corpus_seed
    measured: list[Policy] = []

    def counted(policy: Policy, prompts: Any, *, seed: int) -> float:
        measured.append(policy)
        return keyword_inclusion(policy, prompts, seed=seed)

    monkeypatch.setattr(gate_module, "keyword_inclusion", counted)
    new_live = perturbed(gate.reference, 4, 0.3)
    first = gate.evaluate(candidate, new_live, [], None, seed=1, live_version="v0004").figures
    second = gate.evaluate(candidate, new_live, [], None, seed=2, live_version="v0004").figures
    assert first["keyword_inclusion_candidate"] == keyword_inclusion(
        candidate, gate.kl_prompts, seed=seed
    )
    assert first["keyword_inclusion_live"] == keyword_inclusion(
        new_live, gate.kl_prompts, seed=seed
    )
    # the round's seed does not move it (the same draws for every version), live's is kept
    assert second["keyword_inclusion_candidate"] == first["keyword_inclusion_candidate"]
    assert sum(p is new_live for p in measured) == 1


@pytest.mark.parametrize(
    ("floor", "figure", "words"),
    [
        ("gate_min_sampled_entropy_nats", "candidate_sampled_entropy_nats", "sampled entropy"),
        ("gate_min_distinct_share", "candidate_distinct_phrase_share", "distinct-phrase share"),
    ],
)
def test_each_diversity_floor_passes_a_figure_at_it_and_alone_refuses_one_below(
    setting: dict[str, Any], floor: str, figure: str, words: str
) -> None:
    measured = setting[figure]
    assert measured > 0
    at_floor = evaluate(setting, **{floor: measured})
    assert at_floor.passed, at_floor.reasons
    below = evaluate(setting, **{floor: math.nextafter(measured, math.inf)})
    assert not below.passed
    (refusal,) = refusals(below)
    assert refusal.startswith("collapsing: " + words) and "on its own samples" in refusal


def test_the_diversity_figures_are_those_of_four_seeded_samples_per_prompt(
    setting: dict[str, Any],
) -> None:
    gate: Gate = setting["gate"]
    candidate: Policy = setting["candidate"]
    prompts = gate.diversity_prompts
    assert prompts == gate.kl_prompts[: setting["config"].gate_diversity_prompts]
    requests = [
        SampleRequest(
            candidate.encode_prompt(p), SamplingParams(max_tokens=16, seed=i), num_candidates=4
        )
        for i, p in enumerate(prompts)
    ]
    samples = [s for outs in candidate.sample(requests) for s in outs]
    expected = diversity(
        [candidate.decode(s.token_ids) for s in samples],
        [sum(s.behaviour_logprobs) for s in samples],
    )
    assert setting["candidate_sampled_entropy_nats"] == expected.sampled_entropy_nats
    assert setting["candidate_distinct_phrase_share"] == expected.distinct_phrase_share

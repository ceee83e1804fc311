"""The loop's leashes, driven through real rounds (store, signals, update, gate, registry):
each test fails if the loop stops applying one, not only if its pure function breaks.

- the adaptive KL coefficient moves round after round, and each round trains with it;
- the gate's KL limit refuses a candidate that drifted past it;
- the gate's off-policy check refuses a candidate clearly worse on held-out ratings;
- every candidate's automatic evaluation (perplexity, keyword inclusion) reaches the registry's
  decision and the per-version metrics.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import generate_latest
from trainer_support import Env, env, fast_config, one_torch_thread, simulation

from feedloop.core.checkpoint import load_checkpoint, save_checkpoint
from feedloop.core.policy import Policy
from feedloop.demo.simusers import IncludeWord
from feedloop.trainer.loop import Trainer
from feedloop.trainer.metrics import VERSIONS_EXPORTED, TrainerMetrics
from feedloop.trainer.update import Experience, UpdateResult

__all__ = ["env", "one_torch_thread"]
PREF = IncludeWord("little")
LOOSE = dict(
    gate_max_perplexity_ratio_live=1e9, gate_max_perplexity_ratio_reference=1e9, gate_max_kl=1e9
)


def trainer(env: Env, **overrides: Any) -> Trainer:
    return Trainer(fast_config(env.root, **overrides), env.store, env.registry, log=lambda _: None)


def spy_kl_coefs(t: Trainer) -> list[float]:
    """The KL coefficient each round's update was given (the real update runs)."""
    given: list[float] = []
    real = t.algorithm.update

    def spy(policy: Policy, reference: Policy, experience: Experience, kl_coef: float, **kw: Any):  # type: ignore[no-untyped-def]
        given.append(kl_coef)
        return real(policy, reference, experience, kl_coef, **kw)

    t.algorithm.update = spy  # type: ignore[method-assign]
    return given


@pytest.mark.parametrize(("kl_target", "factor"), [(1e-6, 1.2), (1e6, 0.8)])
def test_the_adaptive_kl_coefficient_moves_round_after_round_and_each_round_trains_with_it(
    env: Env, kl_target: float, factor: float
) -> None:
    """KL far above target grows the coefficient by the controller's most, 20% a round (gain 1:
    a horizon of one sequence); far below shrinks it by 20%; the next round starts from it."""
    sim = simulation(env, PREF)
    t = trainer(env, kl_target=kl_target, kl_horizon=1.0, kl_coef=0.1, **LOOSE)
    given = spy_kl_coefs(t)
    rounds = []
    for _ in range(3):
        sim.serve_events(40)
        rounds.append(t.run_round())
    assert [r.outcome for r in rounds] == ["published"] * 3, [r.reason for r in rounds]
    expected = [0.1 * factor**k for k in range(4)]
    assert [r.figures["kl_coef"] for r in rounds] == pytest.approx(expected[:3])
    assert [r.figures["kl_coef_next"] for r in rounds] == pytest.approx(expected[1:])
    assert given == pytest.approx(expected[:3])


def test_a_candidate_past_the_gates_kl_limit_is_refused_recorded_and_not_served(env: Env) -> None:
    simulation(env, PREF).serve_events(40)
    result = trainer(env, gate_max_kl=1e-6).run_round()
    assert result.outcome == "refused"
    assert "KL to reference" in result.reason and "limit 1e-06" in result.reason
    assert result.figures["kl_to_reference"] > 1e-6
    assert env.registry.live() == "v0001" and env.registry.versions() == ["v0001"]
    decision = env.registry.history()[0]
    assert decision.action == "refused" and "KL to reference" in decision.reason


def publish_leaning_live(env: Env, tmp_path: Path, word: str, shift: float) -> None:
    """v0002: v0001 writing `word` more often, made live."""
    policy, _ = load_checkpoint(env.registry.checkpoint_dir("v0001"))
    with torch.no_grad():
        policy.output.bias[policy.tokenizer.id_of(word)] += shift  # type: ignore[union-attr]
    save_checkpoint(policy, tmp_path / "leaning", parent_version="v0001")
    env.registry.publish(tmp_path / "leaning", reason="leaning", make_live=True)


def replace_update(t: Trainer, word: str, shift: float) -> None:
    """An update that moves the candidate's logit of `word` by `shift` (and nothing else):
    the loop and the gate around it are the real ones."""

    def update(
        policy: Policy, reference: Policy, experience: Experience, kl_coef: float, **_: Any
    ) -> UpdateResult:
        with torch.no_grad():
            policy.output.bias[policy.tokenizer.id_of(word)] += shift  # type: ignore[union-attr]
        return UpdateResult(1, {})

    t.algorithm.update = update  # type: ignore[method-assign]


@pytest.mark.parametrize(("shift", "outcome"), [(-4.0, "refused"), (0.0, "published")])
def test_a_candidate_clearly_worse_off_policy_is_refused_by_the_round(
    env: Env, tmp_path: Path, shift: float, outcome: str
) -> None:
    """Users like "good"; live writes it often. A candidate that unlearns it is refused on the
    held-out ratings' off-policy estimate; the same round with an unchanged candidate passes."""
    publish_leaning_live(env, tmp_path, "good", 2.0)
    simulation(env, IncludeWord("good"), mix={"rating": 1.0}).serve_events(200)
    t = trainer(env, **LOOSE)
    replace_update(t, "good", shift)
    result = t.run_round()
    assert result.outcome == outcome, result.reason
    assert result.figures["ope_heldout"] >= 5
    if outcome == "refused":
        assert "off-policy reward" in result.reason and "clearly below" in result.reason
        assert env.registry.live() == "v0002"
        assert env.registry.history()[0].action == "refused"
    else:
        assert "off-policy" not in result.reason


def test_each_candidates_perplexity_and_keyword_inclusion_reach_its_decision_and_metrics(
    env: Env,
) -> None:
    simulation(env, PREF).serve_events(40)
    t = trainer(env)
    result = t.run_round()
    assert result.outcome == "published", result.reason
    (published,) = [
        d for d in env.registry.history() if d.action == "published" and d.version == "v0002"
    ]
    details = published.details
    for key in ("perplexity_candidate", "keyword_inclusion_candidate", "keyword_inclusion_live"):
        assert details[key] == result.figures[key], key
    assert 0.0 <= details["keyword_inclusion_candidate"] <= 1.0
    text = generate_latest(t.metrics.registry).decode()
    inclusion = result.figures["keyword_inclusion_candidate"]
    assert (
        f'feedloop_trainer_version_keyword_inclusion_ratio{{version="v0002"}} {inclusion}' in text
    )
    assert 'feedloop_trainer_version_heldout_perplexity{version="v0002"}' in text
    assert 'feedloop_trainer_gate_keyword_inclusion_ratio{policy="live"}' in text


def test_metrics_by_version_keep_only_the_newest_versions() -> None:
    metrics = TrainerMetrics()
    versions = [f"v{n:04d}" for n in range(1, VERSIONS_EXPORTED + 3)]
    for n, version in enumerate(versions):
        figures = {"perplexity_candidate": 3.0 + n, "keyword_inclusion_candidate": 0.5}
        metrics.observe_version(version, copy.deepcopy(figures))
    metrics.observe_version(versions[-1], {"perplexity_candidate": 9.0})  # again: no new label
    text = generate_latest(metrics.registry).decode()
    kept = versions[-VERSIONS_EXPORTED:]
    for version in versions:
        line = f'feedloop_trainer_version_heldout_perplexity{{version="{version}"}}'
        assert (line in text) == (version in kept), version
    assert f'heldout_perplexity{{version="{versions[-1]}"}} 9.0' in text
    assert f'keyword_inclusion_ratio{{version="{versions[-1]}"}} 0.5' in text

"""How the trainer deploys and decides: canary by default, compare-and-set on the parent, pause,
and online verdicts applied through the registry (real SQLite store, directory registry)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from store_support import rate_version
from trainer_support import Env, env, fast_config, one_torch_thread, simulation

from feedloop.core.registry import PROMOTED, ROLLED_BACK, SHADOW
from feedloop.core.registry.retention import RetentionPolicy
from feedloop.core.store.base import ShadowScore
from feedloop.demo.simusers import IncludeWord
from feedloop.trainer.decisions import PROMOTE, ROLL_BACK, WAIT
from feedloop.trainer.loop import Trainer

__all__ = ["env", "one_torch_thread"]
PREF = IncludeWord("little")


def trainer(env: Env, **overrides: Any) -> Trainer:
    values: dict[str, Any] = {"publish_as": "canary", "canary_share": 0.2, **overrides}
    return Trainer(fast_config(env.root, **values), env.store, env.registry, log=lambda _: None)


def test_a_passing_candidate_goes_on_trial_as_a_canary_and_no_round_runs_beside_it(
    env: Env,
) -> None:
    simulation(env, PREF).serve_events(40)
    result = trainer(env).run_round()
    assert result.outcome == "published", result.reason
    pointer = env.registry.pointer()
    assert pointer.live == "v0001"
    assert pointer.trial is not None
    assert (pointer.trial.version, pointer.trial.mode, pointer.trial.share) == (
        "v0002",
        "canary",
        0.2,
    )
    assert pointer.trial.parent == "v0001"
    simulation(env, PREF, seed=1).serve_events(40)
    waiting = trainer(env).run_round()
    assert waiting.outcome == "skipped" and "v0002 is on trial" in waiting.reason


def test_a_round_whose_live_version_changed_meanwhile_publishes_but_deploys_nothing(
    env: Env, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    operators_pick = env.registry.publish(tiny_checkpoint, reason="an operator's version")
    simulation(env, PREF).serve_events(40)
    publish = env.registry.publish

    def operator_acts_first(*args: Any, **kwargs: Any) -> str:
        env.registry.set_live(operators_pick, reason="operator")  # during the round
        return publish(*args, **kwargs)

    monkeypatch.setattr(env.registry, "publish", operator_acts_first)
    result = trainer(env).run_round()
    assert result.outcome == "superseded", result.reason
    assert result.version == "v0003" and "v0003" in env.registry.versions()
    pointer = env.registry.pointer()
    assert pointer.live == operators_pick and pointer.trial is None
    assert "the next round trains from the new live version" in result.reason
    assert env.store.get_cursor("trainer") is None  # the window waits for the next round


def test_nothing_is_trained_or_published_while_paused_and_the_gauge_says_so(env: Env) -> None:
    env.registry.set_paused(True, reason="investigating")
    simulation(env, PREF).serve_events(40)
    paused = trainer(env)
    result = paused.run_round()
    assert result.outcome == "skipped" and "paused" in result.reason
    assert env.registry.versions() == ["v0001"]
    paused.decide()
    assert "feedloop_trainer_paused 1.0" in generate_latest(paused.metrics.registry).decode()


def rate(env: Env, version: str, scores: list[float], at: float) -> None:
    rate_version(env.store, version, scores, at)


def on_trial(env: Env, tiny_checkpoint: Path) -> str:
    version = env.registry.publish(tiny_checkpoint, reason="candidate")
    env.registry.start_trial(version, share=0.1, reason="test", expect_live="v0001")
    return version


def test_a_canary_users_rate_as_well_as_live_is_promoted_with_its_figures(
    env: Env, tiny_checkpoint: Path
) -> None:
    version = on_trial(env, tiny_checkpoint)
    later = time.time() + 1
    rate(env, "v0001", [0.5] * 300, later)
    rate(env, version, [0.9] * 300, later)
    judge = trainer(env, decision_min_ratings=50)
    verdict = judge.decide()
    assert verdict is not None and verdict.action == PROMOTE, verdict
    assert env.registry.live() == version and env.registry.pointer().trial is None
    decision = env.registry.history()[0]
    assert (decision.version, decision.action) == (version, PROMOTED)
    assert decision.details["candidate"]["n"] == 300
    text = generate_latest(judge.metrics.registry).decode()
    assert 'feedloop_trainer_online_decisions_total{action="promote"} 1.0' in text


def test_a_canary_users_rate_worse_is_rolled_back_and_live_kept(
    env: Env, tiny_checkpoint: Path
) -> None:
    version = on_trial(env, tiny_checkpoint)
    later = time.time() + 1
    rate(env, "v0001", [0.9] * 60, later)
    rate(env, version, [0.1] * 60, later)
    verdict = trainer(env, decision_min_ratings=50).decide()
    assert verdict is not None and verdict.action == ROLL_BACK
    assert env.registry.live() == "v0001" and env.registry.pointer().trial is None
    assert env.registry.history()[0].action == ROLLED_BACK


def test_a_shadow_is_promoted_on_its_scores_of_lives_rated_generations(
    env: Env, tiny_checkpoint: Path
) -> None:
    version = env.registry.publish(tiny_checkpoint, reason="candidate")
    env.registry.start_trial(version, mode=SHADOW, share=0.1, expect_live="v0001")
    later = time.time() + 1
    rate(env, "v0001", [0.9] * 300, later)  # normalised 0.8 each
    # behaviour log-prob of each generation: -1.475; the shadow gives each output the same
    # probability (ratio 1), so its off-policy estimate is live's own mean.
    scores = [ShadowScore(f"v0001-{i}", version, [-1.475], later) for i in range(300)]
    env.store.append_shadow_scores(scores)
    strict = trainer(env, decision_min_ratings=50, decision_margin=0.1).decide()
    assert strict is not None and strict.action == WAIT and "undecided" in strict.reason
    assert strict.figures["shadow"]["n"] == 300
    assert strict.figures["shadow"]["mean"] == pytest.approx(0.8)
    # the bound's width at 300 scores is about 0.5: a margin that wide promotes it
    verdict = trainer(env, decision_min_ratings=50, decision_margin=0.9).decide()
    assert verdict is not None and verdict.action == PROMOTE, verdict
    assert env.registry.live() == version and env.registry.pointer().trial is None
    assert env.registry.history()[0].details["shadow"]["effective_n"] == pytest.approx(300)


def test_the_trainer_prunes_the_registry_after_each_publish_and_keeps_its_reference(
    env: Env,
) -> None:
    retaining = trainer(
        env,
        publish_as="live",
        gate_best_of_recent=0,
        registry_keep_last=1,
        registry_keep_best=0,
        registry_keep_rollback=0,
    )
    results = []
    for seed in range(8):
        simulation(env, PREF, seed=seed).serve_events(40)
        results.append(retaining.run_round())
        if sum(r.outcome == "published" for r in results) == 3:
            break
    published = [r for r in results if r.outcome == "published"]
    assert len(published) == 3, [r.reason for r in results]
    live = env.registry.live()
    assert env.registry.versions() == ["v0001", live]  # the pretrained reference, and live
    assert len(env.registry.pruned_versions()) == 2
    # The third round's live version has a pruned parent: its lineage still leads to v0001.
    assert published[-1].figures["reference_version"] == "v0001"
    text = generate_latest(retaining.metrics.registry).decode()
    assert 'feedloop_trainer_registry_versions{state="pruned"} 2.0' in text
    assert f"feedloop_trainer_registry_bytes {float(env.registry.size_bytes())}" in text
    assert "feedloop_trainer_registry_pruned_versions_total 2.0" in text


def test_a_round_after_an_operator_pruned_the_gates_earlier_versions_still_runs(
    env: Env,
) -> None:
    keeping_all = trainer(env, publish_as="live", registry_retention=False)
    for seed in range(2):
        simulation(env, PREF, seed=seed).serve_events(40)
        assert keeping_all.run_round().outcome == "published"
    assert env.registry.pointer().previous == ("v0001", "v0002")
    # An operator prunes harder than the trainer would: v0002, an earlier live version the gate
    # compares candidates with, loses its weights.
    env.registry.prune(RetentionPolicy(keep_last=1, keep_best=0, keep_rollback=0))
    assert env.registry.pruned_versions() == ["v0002"]
    simulation(env, PREF, seed=2).serve_events(40)
    result = keeping_all.run_round()
    assert result.outcome in ("published", "refused"), result.reason
    assert "v0002" not in result.figures.get("ope_recent", {})

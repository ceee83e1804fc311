"""Issue 21's trainer reaction, through real rounds (store, detector, signals, update, gate,
registry): users who liked everything suddenly like nothing; the next round notices, trains from
the reference instead of the collapsed live, and learns from what users say now.

The simulation's clock is a fake one (the store keeps the times it is given), so the change sits
exactly on a bucket boundary of the detector, whatever the machine's speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prometheus_client import generate_latest
from trainer_support import Env, env, fast_config, one_torch_thread, simulation

from feedloop.core.checkpoint import load_checkpoint, save_checkpoint
from feedloop.core.policy import Policy
from feedloop.demo import simulate
from feedloop.demo.simusers import AvoidWord, IncludeWord
from feedloop.trainer.loop import Trainer
from feedloop.trainer.metrics import TrainerMetrics
from feedloop.trainer.update import Experience

__all__ = ["env", "one_torch_thread"]
LOOSE = dict(
    gate_max_perplexity_ratio_live=1e9, gate_max_perplexity_ratio_reference=1e9, gate_max_kl=1e9
)
T0 = 1_000_000.0
NEVER_SAID = "zzzzz"  # a word outside the vocabulary: avoiding it is always liked, including never


class FakeTime:
    """Stands in for the `time` module in the simulation: now, creeping by a microsecond a call
    so that events keep their order."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        self.now += 1e-6
        return self.now


def test_a_sharp_drop_restarts_from_the_reference_and_weighs_data_before_it_down(
    env: Env, tmp_path: Path, monkeypatch: Any
) -> None:
    clock = FakeTime(T0)
    monkeypatch.setattr(simulate, "time", clock)
    # Live v0002 is the policy the users' old taste shaped (here: v0001 writing "the" more
    # often), so a restart from the reference v0001 is a visible choice.
    policy, _ = load_checkpoint(env.registry.checkpoint_dir("v0001"))
    with torch.no_grad():
        policy.output.bias[policy.tokenizer.id_of("the")] += 2.0  # type: ignore[union-attr]
    save_checkpoint(policy, tmp_path / "shaped", parent_version="v0001")
    env.registry.publish(tmp_path / "shaped", reason="shaped by the old taste", make_live=True)

    sim = simulation(env, AvoidWord(NEVER_SAID), mix={"rating": 1.0}, requests_per_batch=16)
    for at in range(0, 20, 5):  # 20 s of everything liked: batches at T0, T0 + 5, ...
        clock.now = T0 + at
        sim.serve_batch()
    liked_events = sim.events_stored
    sim.user.preference = IncludeWord(NEVER_SAID)  # the change, at T0 + 20: nothing liked
    for at in range(20, 40, 5):
        clock.now = T0 + at
        sim.serve_batch()

    metrics = TrainerMetrics()
    config = fast_config(
        env.root,
        kl_coef=0.1,
        drift_window_s=40.0,
        drift_buckets=8,
        drift_min_ratings=50,
        drift_stale_weight=0.0,  # the old taste's data counts for nothing: visible in the update
        **LOOSE,
    )
    # Phase 1 had pushed the KL coefficient up (carried in the cursor).
    env.store.set_cursor(
        config.cursor_name, {"generation_seq": 0, "feedback_seq": 0, "kl_coef": 0.5, "rounds": 0}
    )
    now = [T0 + 40.0]
    t = Trainer(
        config, env.store, env.registry, metrics=metrics, log=lambda _: None, clock=lambda: now[0]
    )
    trained_on: list[Experience] = []
    started_from: list[dict[str, torch.Tensor]] = []
    real = t.algorithm.update

    def spy(policy: Policy, reference: Policy, experience: Experience, kl: float, **kw: Any):  # type: ignore[no-untyped-def]
        trained_on.append(experience)
        started_from.append({k: v.clone() for k, v in policy.state_dict().items()})
        return real(policy, reference, experience, kl, **kw)

    t.algorithm.update = spy  # type: ignore[method-assign]

    first = t.run_round()
    assert first.outcome == "published", first.reason
    drift = first.figures["drift"]
    assert drift["detected_now"] and drift["change_at"] == T0 + 20.0
    assert drift["check"]["before_mean"] > 0.5 > -0.5 > drift["check"]["after_mean"]
    # Trained from the reference, not the collapsed live v0002, and published as its child.
    assert drift["trained_from"] == "v0001" and drift["restarted"]
    assert "no version" in drift["trained_from_reason"]
    assert env.registry.live() == "v0003"
    assert env.registry.manifest("v0003").parent_version == "v0001"
    reference, _ = load_checkpoint(env.registry.checkpoint_dir("v0001"))
    assert all(torch.equal(v, started_from[0][k]) for k, v in reference.state_dict().items())
    # The old taste's feedback weighs 0: only what users say now is trained on (all disliked).
    stale = first.figures["stale_data"]
    assert stale["stale_events"] == liked_events and stale["weight"] == 0.0
    assert stale["heldout_left_out"] > 0
    experience = trained_on[0]
    rated = experience.rewards[experience.weights > 0]
    assert len(rated) > 0 and bool(torch.all(rated < 0))
    assert "trained_from=v0001" in first.line()
    assert first.figures["kl_coef"] == 0.1  # a restart starts the KL controller afresh
    page = generate_latest(metrics.registry).decode()
    assert "feedloop_trainer_drift_changes_total 1.0" in page
    assert "feedloop_trainer_drift_restarted 1.0" in page
    assert "feedloop_trainer_drift_trained_from_version 1.0" in page

    # The next round: the same change (not detected again), and live v0003 was trained after
    # it, so training goes on from live.
    for at in range(40, 60, 5):
        clock.now = T0 + at
        sim.serve_batch()
    now[0] = T0 + 60.0
    second = t.run_round()
    assert second.outcome == "published", second.reason
    drift = second.figures["drift"]
    assert not drift["detected_now"] and drift["change_at"] == T0 + 20.0
    assert drift["trained_from"] == "v0003" and not drift["restarted"]
    assert drift["trained_from_reason"] == "live was trained after the change"
    assert "feedloop_trainer_drift_changes_total 1.0" in generate_latest(metrics.registry).decode()

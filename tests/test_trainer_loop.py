"""The trainer's rounds through a real SQLite store and directory registry (tiny policy).

These tests pin the mechanics (cursor, gate, publish, refusals, aborts, metrics); that the
rounds actually improve the policy is test_trainer_learns.py's job.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from trainer_support import Env, env, fast_config, one_torch_thread, simulation

from feedloop.core.checkpoint import load_checkpoint
from feedloop.demo.simusers import IncludeWord, Length, Preference
from feedloop.trainer.data import Cursor, read_window
from feedloop.trainer.loop import Trainer
from feedloop.trainer.signals import learning_signals

__all__ = ["env", "one_torch_thread"]
PREF = IncludeWord("little")


def cursor(env: Env) -> dict:
    return env.store.get_cursor("trainer") or {}


def test_a_round_publishes_a_candidate_that_passes_the_gate_and_makes_it_live(env: Env) -> None:
    simulation(env, PREF).serve_events(40)
    result = Trainer(fast_config(env.root), env.store, env.registry, log=lambda _: None).run_round()

    assert result.outcome == "published", result.reason
    assert env.registry.live() == result.version == "v0002"
    manifest = env.registry.manifest("v0002")
    assert manifest.parent_version == "v0001"
    summary = manifest.training_summary
    assert summary["window"]["feedback_seq_after"] == env.store.max_seq()[1]
    for figure in (
        "perplexity_ratio_live",
        "kl_to_reference",
        "policy_loss",
        "value_loss",
        "entropy",
        "approx_kl",
        "clipfrac",
        "kl_coef",
        "update_steps",
    ):
        assert summary[figure] is not None, figure
    assert cursor(env)["feedback_seq"] == env.store.max_seq()[1]
    assert env.registry.history()[0].action == "promoted"
    load_checkpoint(env.registry.checkpoint_dir("v0002"))  # verifies


def test_too_little_data_skips_the_round_says_so_and_keeps_the_cursor(env: Env) -> None:
    sim = simulation(env, PREF, requests_per_batch=1)
    sim.serve_batch()
    config = fast_config(env.root, min_feedback_events=1000)
    result = Trainer(config, env.store, env.registry, log=lambda _: None).run_round()
    assert result.outcome == "skipped"
    assert "too little data" in result.reason
    assert env.store.get_cursor("trainer") is None
    assert env.registry.live() == "v0001"


def test_a_refused_candidate_is_recorded_with_every_figure_and_live_is_unchanged(env: Env) -> None:
    simulation(env, PREF).serve_events(40)
    config = fast_config(env.root, gate_max_perplexity_ratio_live=0.5)
    result = Trainer(config, env.store, env.registry, log=lambda _: None).run_round()

    assert result.outcome == "refused"
    assert "perplexity" in result.reason
    assert env.registry.live() == "v0001" and env.registry.versions() == ["v0001"]
    decision = env.registry.history()[0]
    assert decision.action == "refused" and "perplexity" in decision.reason
    for figure in (
        "perplexity_candidate",
        "perplexity_live",
        "perplexity_ratio_reference",
        "kl_to_reference",
        "policy_loss",
    ):
        assert decision.details[figure] is not None, figure
    # The window was consumed: the refusal is its outcome, durable before the cursor moved.
    assert cursor(env)["feedback_seq"] == env.store.max_seq()[1]


def test_an_exploding_loss_aborts_the_round_and_keeps_the_live_policy(env: Env) -> None:
    simulation(env, PREF).serve_events(40)
    config = fast_config(env.root, max_loss=1e-9)
    result = Trainer(config, env.store, env.registry, log=lambda _: None).run_round()
    assert result.outcome == "aborted"
    assert "round abandoned" in result.reason
    assert env.registry.live() == "v0001"
    assert env.registry.history()[0].reason.startswith("aborted")


@pytest.mark.parametrize(
    ("kind", "preference"),
    # Length: the tiny policy's phrases vary in length, so comparisons carry signal; a word it
    # never writes gives a correction for every request (with nothing to correct users rate).
    [("comparison", Length(3)), ("ranking", Length(3)), ("correction", IncludeWord("little"))],
)
def test_a_window_of_a_single_feedback_kind_still_trains_and_says_so(
    env: Env, kind: str, preference: Preference
) -> None:
    simulation(env, preference, mix={kind: 1.0}).serve_events(40)
    config = fast_config(env.root, rm_min_pairs=4)
    result = Trainer(config, env.store, env.registry, log=lambda _: None).run_round()
    assert result.outcome == "published", result.reason
    assert any(f"only {kind} feedback" in note for note in result.figures["notes"])
    assert result.figures["train_sequences"] + result.figures["corrections"] > 0


def test_unrated_generations_are_left_out_or_given_the_default_as_configured(env: Env) -> None:
    simulation(env, PREF, mix={"correction": 1.0}).serve_events(30)
    leave_out = fast_config(env.root, unrated="leave-out")
    default = fast_config(env.root, unrated="default", unrated_default_reward=-0.2)
    window = read_window(
        env.store, Cursor(), default, now=time.time(), live_version="v0001", seed=0
    )
    tokenizer = load_checkpoint(env.registry.checkpoint_dir("v0001"))[0].tokenizer
    signals = learning_signals(window, tokenizer, leave_out)
    examples, corrections = signals.examples, signals.corrections
    assert examples == [] and corrections  # corrections rate nothing; they are targets
    examples = learning_signals(window, tokenizer, default).examples
    assert examples and {r for _, r, _ in examples} == {-0.2}


def test_a_restart_after_a_publish_whose_cursor_write_was_lost_skips_the_window(env: Env) -> None:
    simulation(env, PREF).serve_events(40)
    config = fast_config(env.root)
    Trainer(config, env.store, env.registry, log=lambda _: None).run_round()
    env.store.set_cursor("trainer", {"generation_seq": 0, "feedback_seq": 0})  # as if killed
    restarted = Trainer(config, env.store, env.registry, log=lambda _: None)
    assert restarted.cursor("v0002").feedback_seq == env.store.max_seq()[1]
    result = restarted.run_round()
    assert result.outcome == "skipped" and "too little data" in result.reason


def test_a_non_positive_kl_coefficient_in_the_cursor_restarts_from_the_configured_one(
    env: Env,
) -> None:
    # Before the adaptive coefficient's gain was capped, a large round could store -0.063: a
    # penalty turned bonus that the multiplicative update would keep negative for good.
    simulation(env, PREF).serve_events(40)
    env.store.set_cursor("trainer", Cursor(kl_coef=-0.063).to_dict())
    config = fast_config(env.root)
    result = Trainer(config, env.store, env.registry, log=lambda _: None).run_round()
    assert result.figures["kl_coef"] == config.kl_coef
    assert cursor(env)["kl_coef"] > 0


def test_a_kl_coefficient_saved_past_the_bound_restarts_at_the_bound(env: Env) -> None:
    # Before the bound, a KL held above target compounded the coefficient round after round:
    # 50 made every later round's loss pass max_loss.
    simulation(env, PREF).serve_events(40)
    env.store.set_cursor("trainer", Cursor(kl_coef=50.0).to_dict())
    config = fast_config(env.root, kl_coef_max=0.5)
    result = Trainer(config, env.store, env.registry, log=lambda _: None).run_round()
    assert result.figures["kl_coef"] == 0.5
    assert result.figures["kl_coef_next"] <= 0.5 and cursor(env)["kl_coef"] <= 0.5


def test_later_rounds_mix_in_replayed_older_generations_and_drop_stale_ones(env: Env) -> None:
    sim = simulation(env, PREF)
    sim.serve_events(40)
    config = fast_config(env.root, max_version_lag=0)
    trainer = Trainer(config, env.store, env.registry, log=lambda _: None)
    assert trainer.run_round().outcome == "published"
    sim.serve_events(40)  # now served by v0002; the replay sample holds v0001's generations
    result = trainer.run_round()
    assert result.figures["replayed_generations"] + result.figures["dropped_stale"] > 0
    assert result.figures["dropped_stale"] > 0  # v0001's data is 1 version behind, lag bound 0


def test_after_several_rounds_the_trainer_holds_only_the_live_and_reference_policies(
    env: Env,
) -> None:
    sim = simulation(env, PREF)
    trainer = Trainer(fast_config(env.root), env.store, env.registry, log=lambda _: None)
    for _ in range(3):
        sim.serve_events(40)
        result = trainer.run_round()
        assert result.outcome == "published"
    assert env.registry.live() == "v0004"
    assert set(trainer._policies) == {"v0004", "v0001"}  # live and reference; older ones dropped
    # The last gate valued the earlier live versions too, loading v0002 only for the gate.
    assert set(result.figures["ope_recent"]) == {"v0002", "v0001"}


def test_reinforce_runs_a_round_through_the_same_interface(env: Env) -> None:
    simulation(env, PREF).serve_events(40)
    config = fast_config(env.root, algorithm="reinforce")
    result = Trainer(config, env.store, env.registry, log=lambda _: None).run_round()
    assert result.outcome == "published", result.reason
    assert env.registry.manifest("v0002").training_summary["algorithm"] == "reinforce"


def test_a_stop_request_abandons_the_round_and_keeps_nothing(env: Env) -> None:
    simulation(env, PREF).serve_events(40)
    stop = threading.Event()
    stop.set()
    trainer = Trainer(fast_config(env.root), env.store, env.registry, stop=stop, log=lambda _: None)
    assert trainer.run_round().outcome == "abandoned"
    assert env.store.get_cursor("trainer") is None and env.registry.live() == "v0001"


def test_metrics_export_rounds_by_outcome_and_the_rounds_figures(env: Env) -> None:
    simulation(env, PREF).serve_events(40)
    trainer = Trainer(fast_config(env.root), env.store, env.registry, log=lambda _: None)
    trainer.run_round()
    text = generate_latest(trainer.metrics.registry).decode()
    assert 'feedloop_trainer_rounds_total{outcome="published"} 1.0' in text
    assert 'feedloop_trainer_rounds_total{outcome="refused"} 0.0' in text
    assert 'feedloop_trainer_gate_decisions_total{decision="pass"} 1.0' in text
    for series in (
        "update_steps_total",
        "policy_loss",
        "value_loss",
        "entropy_nats",
        "kl_to_reference_nats",
        "kl_coef",
        "gate_perplexity_ratio",
        "window_generations",
        "newest_feedback_age_seconds",
        "round_duration_seconds_count",
        "last_publish_timestamp_seconds",
        "reward_model_heldout_accuracy",
    ):
        assert f"feedloop_trainer_{series}" in text, series


def test_unrated_generations_wait_out_the_join_window_before_they_are_consumed(env: Env) -> None:
    simulation(env, PREF).serve_events(40)
    config = fast_config(env.root, join_window_s=3600.0)
    result = Trainer(config, env.store, env.registry, log=lambda _: None).run_round()
    assert result.outcome in ("published", "refused")
    # Every event is consumed; no generation is settled yet, so the generation cursor stays.
    assert cursor(env)["feedback_seq"] == env.store.max_seq()[1]
    assert cursor(env)["generation_seq"] == 0


def test_with_a_join_window_each_feedback_event_is_trained_on_in_one_round_only(
    env: Env,
) -> None:
    config = fast_config(env.root, join_window_s=30.0, replay_sample_size=0)
    simulation(env, PREF, seed=1).serve_events(40)
    first = Trainer(config, env.store, env.registry, log=lambda _: None).run_round()
    assert first.outcome in ("published", "refused"), first.reason
    # An hour later every generation has settled; the second round reads only the new events.
    simulation(env, PREF, seed=2).serve_events(40)
    later = time.time() + 3600.0
    second = Trainer(
        config, env.store, env.registry, log=lambda _: None, clock=lambda: later
    ).run_round()
    assert second.outcome in ("published", "refused"), second.reason
    assert second.figures["window_events"] == second.figures["new_events"]
    assert cursor(env)["generation_seq"] == env.store.max_seq()[0]


def test_the_loop_wakes_as_soon_as_k_new_events_are_stored_and_stops_on_request(env: Env) -> None:
    config = fast_config(
        env.root, interval_s=600.0, wake_after_feedback_events=20, poll_interval_s=0.05
    )
    stop = threading.Event()
    lines: list[str] = []
    trainer = Trainer(config, env.store, env.registry, stop=stop, log=lines.append)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(trainer.run()))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not lines and time.monotonic() < deadline:  # the first round: nothing to learn
            time.sleep(0.02)
        assert lines and "too little data" in lines[0]
        simulation(env, PREF).serve_events(40)
        while env.registry.live() != "v0002" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert env.registry.live() == "v0002", lines  # long before the 600 s interval
    finally:
        stop.set()
        thread.join(timeout=60)
    assert codes == [0]


@pytest.mark.postgres
def test_a_round_reads_and_keeps_its_cursor_in_a_postgresql_store(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from pg_support import fresh_schema, schema_url

    from feedloop.core.registry import open_registry
    from feedloop.core.store import open_store

    with fresh_schema("trainer") as schema:
        registry = open_registry(tmp_path / "registry")
        registry.publish(tiny_checkpoint, reason="pretrained", make_live=True)
        env = Env(tmp_path, open_store(schema_url(schema)), registry)
        try:
            simulation(env, PREF).serve_events(40)
            result = Trainer(
                fast_config(tmp_path), env.store, registry, log=lambda _: None
            ).run_round()
            assert result.outcome == "published", result.reason
            assert cursor(env)["feedback_seq"] == env.store.max_seq()[1]
        finally:
            env.close()

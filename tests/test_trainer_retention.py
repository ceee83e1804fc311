"""A prune in the middle of a trainer round: it deletes the rows earlier rounds consumed and
none of the round's own window (its new events, the generations they name, its held-out share),
and the round goes on to its verdict (real SQLite store, directory registry, simulated users)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from trainer_support import TRAIN_PROMPTS, Env, env, fast_config, one_torch_thread

from feedloop.core.store.retention import DAY_S, PruneReport, StorePruner, StoreRetentionPolicy
from feedloop.demo.simulate import Simulation
from feedloop.demo.simusers import IncludeWord, SimulatedUser
from feedloop.trainer import loop
from feedloop.trainer.loop import Trainer

__all__ = ["env", "one_torch_thread"]


def serve(env: Env, seed: int, events: int = 40) -> None:
    user = SimulatedUser(IncludeWord("little"), seed=seed, client_id="app")
    Simulation(env.store, env.registry, user, TRAIN_PROMPTS, seed=seed).serve_events(events)


def test_a_prune_during_a_round_keeps_its_window_and_the_round_completes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(fast_config(env.root), env.store, env.registry, log=lambda _: None)
    serve(env, seed=0)
    assert trainer.run_round().outcome == "published"
    serve(env, seed=1)
    cursor = trainer.cursor(env.registry.live() or "")
    window_generations = {
        g.generation_id for g in env.store.generations_after(cursor.generation_seq, 10_000)
    }
    window_events = {e.event_id for e in env.store.feedback_after(cursor.feedback_seq, 10_000)}
    # A month later by the pruner's clock: everything round 1 consumed is old enough to go.
    pruner = StorePruner(
        env.store,
        StoreRetentionPolicy(retain_s=DAY_S, min_age_s=0.0),
        clock=lambda: time.time() + 30 * DAY_S,
        sleep=lambda _: None,
    )
    reports: list[PruneReport] = []
    signals = loop.learning_signals

    def prune_then_signals(*args: Any, **kwargs: Any) -> Any:
        reports.append(pruner.run_once())  # the window is read; rewards and the gate to come
        return signals(*args, **kwargs)

    monkeypatch.setattr(loop, "learning_signals", prune_then_signals)
    second = trainer.run_round()

    assert second.outcome in ("published", "refused"), second.reason
    assert second.figures["new_events"] == len(window_events) >= 40
    assert reports and reports[0].rows.generations > 0  # round 1's consumed rows went
    kept = env.store.get_generations(sorted(window_generations))
    assert set(kept) == window_generations
    assert {
        e.event_id for e in env.store.feedback_after(cursor.feedback_seq, 10_000)
    } >= window_events

"""Exploration through the trainer: what a round divides by, reports and reweights.

The simulation explores as the server does (core.exploration, served_as=exploration, behaviour
log-probs of the exploration distribution); the round must take its importance ratios against
those logged log-probs, report exploration's cost by arm, and apply the declared rebalancing and
shaping where the rewards are assembled.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from trainer_support import TRAIN_PROMPTS, env, fast_config, one_torch_thread  # noqa: F401

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.exploration import Exploration
from feedloop.core.store.base import SERVED_EXPLORATION, SERVED_LIVE
from feedloop.demo.simulate import Simulation
from feedloop.demo.simusers import IncludeWord, SimulatedUser
from feedloop.trainer.algorithms import make_algorithm
from feedloop.trainer.data import Cursor, build_experience, read_window
from feedloop.trainer.signals import learning_signals


def explored_simulation(env, share: float, *, mix=None) -> Simulation:  # noqa: F811
    user = SimulatedUser(IncludeWord("the"), seed=3, **({"mix": mix} if mix else {}))
    return Simulation(
        env.store,
        env.registry,
        user,
        TRAIN_PROMPTS,
        seed=4,
        requests_per_batch=16,
        exploration=Exploration(share=share, temperature=2.5, top_k=40),
    )


def test_the_importance_ratio_divides_by_the_logged_exploration_logprobs(env) -> None:  # noqa: F811
    sim = explored_simulation(env, 1.0)
    sim.serve_batch()
    records = list(env.store.generations_after(0, 1000))
    assert records and all(r.served_as == SERVED_EXPLORATION for r in records)
    assert all(r.sampling["temperature"] == 2.5 and r.sampling["top_k"] == 40 for r in records)
    policy, _ = load_checkpoint(env.registry.checkpoint_dir("v0001"))
    experience, _ = build_experience(policy.tokenizer, [(r, 1.0, 1.0) for r in records], [])
    assert experience is not None
    config = fast_config(env.root, importance_weight_max=1e9)
    targets = make_algorithm(config).prepare(policy, policy, experience, 0.0)
    mask = experience.batch.output_mask > 0
    # pi_old is the policy that sampled, so pi_old / mu_explore is exactly
    # exp(policy_logprobs - exploration logprobs); were the raw policy's log-probs used, or the
    # ratio inverted, these would be 1 or their inverses.
    logged_policy = torch.zeros_like(experience.behaviour_logprobs)
    for i, r in enumerate(records):
        logged_policy[i, : len(r.policy_logprobs)] = torch.tensor(r.policy_logprobs)
    expected = torch.exp(logged_policy - experience.behaviour_logprobs)
    assert torch.allclose(targets.importance[mask], expected[mask], rtol=1e-3, atol=1e-4)
    assert (expected[mask] - 1).abs().max() > 0.1  # the exploration distribution differs
    assert torch.allclose(targets.old_logprobs[mask], logged_policy[mask], atol=1e-4), (
        "the logged raw log-probs are the sampling policy's"
    )


def test_a_round_reports_exploration_cost_by_arm_rebalancing_and_shaping(env) -> None:  # noqa: F811
    sim = explored_simulation(env, 0.5, mix={"rating": 1.0})
    sim.serve_events(200)
    stored = list(env.store.generations_after(0, 5000))
    assert {SERVED_EXPLORATION, SERVED_LIVE} == {r.served_as for r in stored}
    config = fast_config(
        env.root,
        rating_class_balance=1.0,
        feedback_kind_balance=0.0,
        shaping=("finished:0.25",),
        heldout_share=0.0,
        unrated="leave-out",
    )
    window = read_window(
        env.store, Cursor(), config, now=time.time() + 1.0, live_version="v0001", seed=0
    )
    policy, _ = load_checkpoint(env.registry.checkpoint_dir("v0001"))
    signals = learning_signals(window, policy.tokenizer, config)
    figures = signals.figures
    arms = figures["reward_by_arm"]
    assert arms["policy"]["rated"] > 0 and arms["exploration"]["rated"] > 0
    classes = figures["rating_classes"]
    total = sum(classes.values())
    assert figures["rating_class_weights"] == {
        c: total / (len(classes) * n) for c, n in classes.items()
    }
    assert figures["shaping"]["finished"]["weight"] == 0.25
    # Every example's reward is its rating plus the finishing bonus; a rating's weight is its
    # class's.
    plain = fast_config(env.root, heldout_share=0.0, unrated="leave-out", rating_class_balance=0.0)
    unshaped = learning_signals(window, policy.tokenizer, plain)
    by_id = {g.generation_id: (r, w) for g, r, w in unshaped.examples}
    for g, r, w in signals.examples:
        base, base_w = by_id[g.generation_id]
        assert r == pytest.approx(base + (0.25 if g.finished else 0.0))
        rated_class = "liked" if base > 0 else "disliked" if base < 0 else "neutral"
        assert w == pytest.approx(base_w * figures["rating_class_weights"][rated_class])


def test_stale_generations_weigh_less_by_the_declared_half_life(env) -> None:  # noqa: F811
    sim = explored_simulation(env, 0.0, mix={"rating": 1.0})
    sim.serve_events(40)
    config = fast_config(env.root, heldout_share=0.0, unrated="leave-out", data_half_life_s=60.0)
    window = read_window(
        env.store, Cursor(), config, now=time.time() + 1.0, live_version="v0001", seed=0
    )
    # Age half of the window by two half-lives, as if it had been served before a change.
    ids = sorted(window.generations)
    for gid in ids[::2]:
        g = window.generations[gid]
        window.generations[gid] = dataclasses.replace(g, created_at=g.created_at - 120.0)
    policy, _ = load_checkpoint(env.registry.checkpoint_dir("v0001"))
    aged = learning_signals(window, policy.tokenizer, config)
    plain = learning_signals(
        window, policy.tokenizer, dataclasses.replace(config, data_half_life_s=0.0)
    )
    newest = max(g.created_at for g in window.generations.values())
    base = {g.generation_id: w for g, _, w in plain.examples}
    assert len(aged.examples) == len(plain.examples) > 0
    for g, _, w in aged.examples:
        expected = base[g.generation_id] * 0.5 ** ((newest - g.created_at) / 60.0)
        assert w == pytest.approx(expected)
    report = aged.figures["data_age_weights"]
    assert report["half_life_s"] == 60.0 and report["min_weight"] == pytest.approx(0.25, abs=0.01)


def test_feedback_kind_balance_is_applied_and_reported_on_its_own(env) -> None:  # noqa: F811
    sim = explored_simulation(env, 0.0)  # every kind of feedback
    sim.serve_events(120)
    config = fast_config(
        env.root, rating_class_balance=0.0, feedback_kind_balance=1.0, unrated="leave-out"
    )
    now = time.time() + 1.0
    window = read_window(env.store, Cursor(), config, now=now, live_version="v0001", seed=0)
    policy, _ = load_checkpoint(env.registry.checkpoint_dir("v0001"))
    figures = learning_signals(window, policy.tokenizer, config).figures
    kinds = {}
    for e in window.events:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    assert len(kinds) > 1
    n = sum(kinds.values())
    assert figures["feedback_kind_weights"] == pytest.approx(
        {k: n / (len(kinds) * c) for k, c in kinds.items()}
    )
    assert set(figures["rating_class_weights"].values()) == {1.0}

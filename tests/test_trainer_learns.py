"""It learns: simulated users' noisy feedback raises the live policy's reward, fluency kept.

Through the whole loop (real SQLite store, trainer rounds with the default TrainConfig, the
gate, registry publishes), starting from the default pretrained policy. The full curves for
all three algorithms and three preferences are bench/learning_curves.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from trainer_support import EVAL_PROMPTS, SPLIT, Env, make_env, one_torch_thread, simulation

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.evaluation import perplexity
from feedloop.demo.simulate import mean_true_reward
from feedloop.demo.simusers import IncludeWord
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.gate import heldout_pairs
from feedloop.trainer.loop import Trainer

__all__ = ["one_torch_thread"]
ROUNDS = 4
EVENTS_PER_ROUND = 256


@pytest.fixture
def env(tmp_path: Path, pretrained_checkpoint: Path) -> Iterator[Env]:
    environment = make_env(tmp_path, pretrained_checkpoint)
    yield environment
    environment.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "gain", "ratio"),
    # Soft Q-learning learns more slowly here (docs/learning.md): a smaller margin, still
    # twice the standard error of the difference.
    [("actor-critic", 0.08, 2.0), ("q-learning", 0.04, 1.5)],
)
def test_the_algorithm_raises_the_simulated_reward_clearly_within_the_perplexity_bound(
    env: Env, pretrained_checkpoint: Path, algorithm: str, gain: float, ratio: float
) -> None:
    preference = IncludeWord("good")
    prompts = EVAL_PROMPTS[:300]
    pretrained, _ = load_checkpoint(pretrained_checkpoint)
    before = mean_true_reward(pretrained, preference, prompts, seed=5)

    # Defaults throughout, except the join window: simulated users answer at once.
    config = TrainConfig(
        data_dir=env.root, algorithm=algorithm, join_window_s=0.0, publish_as="live"
    )
    trainer = Trainer(config, env.store, env.registry, log=lambda _: None)
    sim = simulation(env, preference, seed=11, requests_per_batch=32)
    outcomes = []
    for _ in range(ROUNDS):
        sim.serve_events(EVENTS_PER_ROUND)
        outcomes.append(trainer.run_round().outcome)

    live, _ = load_checkpoint(env.registry.checkpoint_dir(str(env.registry.live())))
    after = mean_true_reward(live, preference, prompts, seed=5)
    pairs = heldout_pairs(SPLIT.test, 0)
    perplexity_ratio = perplexity(live, pairs) / perplexity(pretrained, pairs)

    assert "published" in outcomes
    # 300 prompts: a standard error of about 0.02 on each mean; these margins are several.
    assert after >= before + gain, (before, after, outcomes)
    assert after >= ratio * before, (before, after, outcomes)
    assert perplexity_ratio <= config.gate_max_perplexity_ratio_reference

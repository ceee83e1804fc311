"""Shared set-up of the trainer's tests: a registry with a live policy, a store, a simulation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from feedloop.core.corpus import load_phrases, split_corpus
from feedloop.core.registry import ModelRegistry, open_registry
from feedloop.core.store import ReplayStore, open_store
from feedloop.demo.simulate import Simulation, corpus_prompts
from feedloop.demo.simusers import Preference, SimulatedUser
from feedloop.trainer.config import TrainConfig

SPLIT = split_corpus(load_phrases(), seed=0)
TRAIN_PROMPTS = corpus_prompts(SPLIT.train, seed=1)
EVAL_PROMPTS = corpus_prompts(SPLIT.validation, seed=2)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """The trainer's default; on two shared cores more threads only spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Env:
    root: Path
    store: ReplayStore
    registry: ModelRegistry

    def close(self) -> None:
        self.store.close()
        self.registry.close()


def make_env(root: Path, checkpoint: Path) -> Env:
    """A store and a registry whose live version (v0001) is the given checkpoint."""
    registry = open_registry(root / "registry")
    registry.publish(checkpoint, reason="pretrained", make_live=True)
    return Env(root, open_store(str(root / "replay.sqlite3")), registry)


@pytest.fixture
def env(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Env]:
    """A store and a registry whose live version is the tiny policy; closed after the test."""
    environment = make_env(tmp_path, tiny_checkpoint)
    yield environment
    environment.close()


@pytest.fixture
def hf_env(tmp_path: Path, hf_checkpoint: Path) -> Iterator[Env]:
    """The same, whose live version is the tiny Hugging Face policy."""
    environment = make_env(tmp_path, hf_checkpoint)
    yield environment
    environment.close()


def fast_config(root: Path, **overrides: Any) -> TrainConfig:
    """Defaults, shrunk where only the mechanics are under test (not learning)."""
    values: dict[str, Any] = dict(
        data_dir=root,
        join_window_s=0.0,
        min_feedback_events=8,
        rm_steps=30,
        gate_kl_prompts=16,
        max_updates_per_round=3,
        minibatch_size=32,
        replay_sample_size=64,
        gate_min_ope_samples=5,
        torch_threads=1,
        publish_as="live",  # the mechanics of a round; trials have tests of their own
    )
    values.update(overrides)
    return TrainConfig(**values)


def simulation(
    env: Env,
    preference: Preference,
    *,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    requests_per_batch: int = 8,
) -> Simulation:
    user = SimulatedUser(preference, seed=seed, **({"mix": mix} if mix else {}))
    return Simulation(
        env.store,
        env.registry,
        user,
        TRAIN_PROMPTS,
        seed=seed,
        requests_per_batch=requests_per_batch,
    )


# Small rounds: these tests are about processes and durability, not learning.
FAST_FLAGS = [
    "--join-window-s",
    "0",
    "--min-feedback-events",
    "8",
    "--rm-steps",
    "30",
    "--gate-kl-prompts",
    "16",
    "--max-updates-per-round",
    "3",
    "--minibatch-size",
    "32",
    "--replay-sample-size",
    "64",
    "--gate-min-ope-samples",
    "5",
    "--publish-as",
    "live",
    "--metrics-port",
    "0",
]

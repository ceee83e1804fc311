"""Shared fixtures: checkpoints every part's tests can use.

- tiny_checkpoint: a small policy pretrained for one short epoch (seconds): for tests that need
  real weights and a real tokenizer but not fluent phrases.
- hf_checkpoint: a tiny GPT-2-style Hugging Face policy (2 layers, width 32, a BPE tokenizer of
  320 tokens trained on part of the corpus), random weights, saved as a checkpoint (seconds);
  tests that use it are skipped where the hf extra (transformers) is not installed.
- pretrained_checkpoint: the real default policy (the one `feedloop pretrain` builds and the
  README's setup builds first); built here if missing, which takes a few minutes once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from feedloop.core.config import default_data_dir
from feedloop.core.pretrain import PretrainConfig, ensure_default_checkpoint, pretrain

TINY = dict(
    epochs=1,
    embedding_dim=16,
    hidden_dim=32,
    value_hidden_dim=16,
    batch_size=256,
    eval_samples=20,
    resume=False,
    torch_threads=1,
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    result = pretrain(PretrainConfig(data_dir=root, **TINY), progress=False)  # type: ignore[arg-type]
    return result.checkpoint


HF_TINY = dict(vocab_size=320, layers=2, width=32, heads=2, context=160, value_hidden_dim=16)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from feedloop.core.checkpoint import save_checkpoint
    from feedloop.core.corpus import load_phrases
    from feedloop.core.hf_build import TinyGPTConfig, tiny_policy

    policy = tiny_policy(load_phrases()[:600], TinyGPTConfig(**HF_TINY))  # type: ignore[arg-type]
    directory = tmp_path_factory.mktemp("hf") / "tiny-hf"
    save_checkpoint(policy, directory, version="tiny-hf")
    return directory


@pytest.fixture(scope="session")
def pretrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the default pretrained policy (tests may not alter the user's own)."""
    data_dir = Path(os.environ.get("FEEDLOOP_DATA_DIR", default_data_dir()))
    source = ensure_default_checkpoint(data_dir, progress=False)
    copy = tmp_path_factory.mktemp("pretrained") / "default-policy"
    shutil.copytree(source, copy)
    return copy


@pytest.fixture
def tiny_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint that a test may damage."""
    copy = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, copy)
    return copy

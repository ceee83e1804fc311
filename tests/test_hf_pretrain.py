"""`feedloop pretrain --architecture hf-causal-lm`: a tiny GPT-2 and its BPE tokenizer made
from a corpus, trained by the same supervised loop as the GRU, saved as an HF checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.corpus import load_phrases
from feedloop.core.hf_policy import HFCausalPolicy
from feedloop.core.pretrain import PretrainConfig
from feedloop.core.tokenizer import SPECIAL_TOKENS


def test_the_pretrain_command_builds_and_trains_a_tiny_hf_policy(tmp_path: Path) -> None:
    corpus = tmp_path / "phrases.txt"
    corpus.write_text("\n".join(load_phrases()[:400]) + "\n", encoding="utf-8")
    output = tmp_path / "tiny-hf"
    out = subprocess.run(
        [
            sys.executable, "-m", "feedloop", "pretrain", "--quiet",
            "--architecture", "hf-causal-lm", "--corpus", str(corpus), "--output", str(output),
            "--epochs", "2", "--embedding-dim", "32", "--heads", "2", "--bpe-vocab", "300",
            "--value-hidden-dim", "16", "--batch-size", "64", "--eval-samples", "10",
            "--torch-threads", "1",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "stopped by epochs" in out.stdout
    policy, manifest = load_checkpoint(output)
    assert isinstance(policy, HFCausalPolicy)
    assert manifest.version == "pretrained"
    assert manifest.hyperparameters["prompt_template"] == "keywords: {keywords} =>"
    assert tuple(policy.tokenizer.tokens[:5]) == SPECIAL_TOKENS and policy.tokenizer.offset == 0
    assert policy.tokenizer.vocab_size == 300
    assert policy.model.config.n_embd == 32 and policy.model.config.n_layer == 2
    history = manifest.training_summary["history"]
    assert len(history) == 2
    assert history[1]["train_loss"] < history[0]["train_loss"]  # it learns
    assert not (tmp_path / "tiny-hf.pretrain-state.pt").exists()


def test_an_unknown_architecture_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="architecture must be one of gru-seq2seq, hf-causal-lm"):
        PretrainConfig(architecture="mamba")

"""Supervised pretraining: teacher forcing on (keywords -> phrase) pairs from the corpus.

This is the first stage of the RLHF pipeline: a policy that already writes fluent phrases that
usually contain their keyword, which RL then fine-tunes from users' feedback and which stays the
reference policy of the trainer's KL leash.

Each epoch draws a fresh prompt for every training phrase (one or two of its keywords), so the
model learns to honour any keyword of a phrase. Validation perplexity is measured on prompts
fixed by the seed; the best epoch is kept (early stopping with patience). The run is
deterministic for a seed and resumable: after every epoch its state is saved beside the output,
and a run started again continues from there. Only epochs and validation perplexity end it, so
the default policy does not depend on how fast or busy the machine is; a wall-time budget is an
option, off by default, for a run that must end by a deadline.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from feedloop.core.checkpoint import save_checkpoint
from feedloop.core.config import default_data_dir, describe
from feedloop.core.corpus import load_phrases, make_pairs, split_corpus
from feedloop.core.errors import CheckpointError
from feedloop.core.evaluation import contains_keywords, keyword_inclusion, perplexity
from feedloop.core.gru import GRUConfig, GRUPolicy
from feedloop.core.policy import Policy, TokenBatch, token_logprobs
from feedloop.core.tokenizer import EOS_ID, Tokenizer

DEFAULT_CHECKPOINT_NAME = "default-policy"
ARCHITECTURE_NAMES = ("gru-seq2seq", "hf-causal-lm")


def default_checkpoint_dir(data_dir: Path) -> Path:
    """Where `feedloop pretrain` puts the default policy and the server looks for it."""
    return Path(data_dir) / DEFAULT_CHECKPOINT_NAME


@dataclass(frozen=True)
class PretrainConfig:
    corpus: Path | None = field(
        default=None,
        metadata={"help": "UTF-8 file, one phrase per line; empty: the shipped corpus"},
    )
    data_dir: Path = field(
        default_factory=default_data_dir, metadata={"help": "feedloop's data directory"}
    )
    output: Path | None = field(
        default=None,
        metadata={"help": "checkpoint directory to write; empty: DATA_DIR/default-policy"},
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the split, the prompts and the weights"}
    )
    epochs: int = field(
        default=40, metadata={"help": "most epochs (early stopping may end sooner)"}
    )
    patience: int = field(
        default=4,
        metadata={"help": "epochs without a better validation perplexity before stopping"},
    )
    max_minutes: float | None = field(
        default=None,
        metadata={
            "help": "wall-time budget of this invocation, off by default: training stops after "
            "the epoch that passes it, so the result depends on the machine's speed and load"
        },
    )
    batch_size: int = field(default=128, metadata={"help": "phrases per optimiser step"})
    learning_rate: float = field(default=4e-3, metadata={"help": "Adam learning rate"})
    lr_decay: float = field(default=0.93, metadata={"help": "learning rate factor per epoch"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    architecture: str = field(
        default="gru-seq2seq",
        metadata={
            "help": "gru-seq2seq (the default policy) or hf-causal-lm (a tiny GPT-2 with a BPE "
            "tokenizer trained on the corpus; needs the hf extra)"
        },
    )
    embedding_dim: int = field(
        default=128, metadata={"help": "token embedding size (hf-causal-lm: the model's width)"}
    )
    layers: int = field(default=2, metadata={"help": "hf-causal-lm: transformer blocks"})
    heads: int = field(default=4, metadata={"help": "hf-causal-lm: attention heads"})
    bpe_vocab: int = field(
        default=1024, metadata={"help": "hf-causal-lm: BPE vocabulary size, specials included"}
    )
    hidden_dim: int = field(default=256, metadata={"help": "GRU state size"})
    value_hidden_dim: int = field(default=128, metadata={"help": "value head hidden size"})
    dropout: float = field(default=0.1, metadata={"help": "dropout while pretraining"})
    min_count: int = field(default=1, metadata={"help": "rarest word kept in the vocabulary"})
    max_vocab: int = field(default=4000, metadata={"help": "largest vocabulary, specials included"})
    max_keywords: int = field(default=2, metadata={"help": "most keywords in a training prompt"})
    torch_threads: int = field(default=2, metadata={"help": "torch intra-op threads"})
    resume: bool = field(default=True, metadata={"help": "continue an interrupted run"})
    eval_samples: int = field(
        default=600, metadata={"help": "test prompts sampled for the keyword-inclusion figure"}
    )

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURE_NAMES:
            raise ValueError(
                f"architecture must be one of {', '.join(ARCHITECTURE_NAMES)}, "
                f"got {self.architecture!r}"
            )
        for name in ("epochs", "batch_size", "embedding_dim", "hidden_dim", "max_vocab", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError("max_minutes must be > 0 (or unset: no time budget)")

    @property
    def output_dir(self) -> Path:
        return self.output or default_checkpoint_dir(self.data_dir)


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Path
    summary: dict[str, Any]


def encode_pairs(
    tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]
) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [tokenizer.encode_prompt(p) for p, _ in pairs]
    outputs = [[*tokenizer.encode(t), EOS_ID] for _, t in pairs]
    return prompts, outputs


def sequence_nll(
    policy: Policy, prompts: list[list[int]], outputs: list[list[int]]
) -> torch.Tensor:
    """Summed negative log-likelihood per sequence (teacher forcing), shape (B,)."""
    batch = TokenBatch.from_lists(prompts, outputs)
    logprobs = token_logprobs(policy.teacher_forced(batch).logits, batch.output_ids)
    return -(logprobs * batch.output_mask).sum(dim=1)


def chance_inclusion(prompts: Sequence[str], phrases: Sequence[str], seed: int) -> float:
    """The same figure for a phrase drawn at random from the corpus: what chance gives."""
    rng = random.Random(seed)
    hits = 0
    for prompt in prompts:
        hits += contains_keywords(prompt, rng.choice(phrases))
    return hits / max(len(prompts), 1)


def new_policy(config: PretrainConfig, texts: Sequence[str]) -> Policy:
    """A freshly initialised policy of config's architecture, its tokenizer built on texts."""
    if config.architecture == "hf-causal-lm":
        from feedloop.core.hf_build import TinyGPTConfig, tiny_policy

        sizes = TinyGPTConfig(
            vocab_size=config.bpe_vocab,
            layers=config.layers,
            width=config.embedding_dim,
            heads=config.heads,
            dropout=config.dropout,
            value_hidden_dim=config.value_hidden_dim,
        )
        return tiny_policy(texts, sizes, seed=config.seed)
    tokenizer = Tokenizer.build(texts, min_count=config.min_count, max_size=config.max_vocab)
    return GRUPolicy(
        GRUConfig(
            vocab_size=tokenizer.vocab_size,
            embedding_dim=config.embedding_dim,
            hidden_dim=config.hidden_dim,
            value_hidden_dim=config.value_hidden_dim,
            dropout=config.dropout,
        ),
        tokenizer,
    )


def _state_path(config: PretrainConfig) -> Path:
    return config.output_dir.with_name(config.output_dir.name + ".pretrain-state.pt")


def pretrain(config: PretrainConfig, *, progress: bool = True) -> PretrainResult:
    """Train a policy on the corpus and write it as a checkpoint to config.output_dir."""
    started = time.monotonic()
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    phrases = load_phrases(config.corpus)
    split = split_corpus(phrases, seed=config.seed)
    policy = new_policy(config, split.train)
    tokenizer = policy.tokenizer
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    validation_pairs = make_pairs(
        split.validation, random.Random(config.seed), max_keywords=config.max_keywords
    )
    test_pairs = make_pairs(
        split.test, random.Random(config.seed + 1), max_keywords=config.max_keywords
    )

    history: list[dict[str, float]] = []
    best_ppl, best_state, stale, first_epoch = math.inf, None, 0, 0
    stopped_by = "epochs"
    state_path = _state_path(config)
    if config.resume and state_path.exists():
        saved = torch.load(state_path, weights_only=True)
        policy.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        best_state, best_ppl = saved["best_model"], float(saved["best_ppl"])
        stale, first_epoch = int(saved["stale"]), int(saved["epoch"]) + 1
        torch.set_rng_state(saved["torch_rng"])  # dropout masks continue as if never stopped
        history = [
            dict(zip(("epoch", "train_loss", "val_ppl"), row, strict=True))
            for row in saved["history"].tolist()
        ]
        print(
            f"pretrain: resuming after epoch {first_epoch} "
            f"(best validation perplexity {best_ppl:.2f})"
        )

    for epoch in range(first_epoch, config.epochs):
        policy.train()
        rng = random.Random(config.seed * 1000 + epoch)
        pairs = make_pairs(split.train, rng, max_keywords=config.max_keywords)
        rng.shuffle(pairs)
        prompts, outputs = encode_pairs(tokenizer, pairs)
        steps = range(0, len(pairs), config.batch_size)
        bar = tqdm(
            steps, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False
        )
        losses = []
        for i in bar:
            nll = sequence_nll(
                policy, prompts[i : i + config.batch_size], outputs[i : i + config.batch_size]
            )
            n_tokens = sum(len(o) for o in outputs[i : i + config.batch_size])
            loss = nll.sum() / n_tokens
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        schedule.step()
        val_ppl = perplexity(policy, validation_pairs)
        train_loss = sum(losses) / len(losses)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_ppl": val_ppl})
        improved = val_ppl < best_ppl - 1e-4
        if improved:
            best_ppl, stale = val_ppl, 0
            best_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        else:
            stale += 1
        if progress:
            print(
                f"epoch {epoch + 1}: train loss {train_loss:.3f}  "
                f"validation perplexity {val_ppl:.2f}" + ("  *" if improved else "")
            )
        _save_state(
            state_path, policy, optimizer, schedule, best_state, best_ppl, stale, epoch, history
        )
        if stale >= config.patience:
            stopped_by = "early stopping"
            print(
                f"pretrain: early stop after epoch {epoch + 1} "
                f"(no better validation perplexity for {stale} epochs)"
            )
            break
        elapsed_min = (time.monotonic() - started) / 60
        if config.max_minutes is not None and elapsed_min >= config.max_minutes:
            stopped_by = "time budget"
            print(
                f"pretrain: time budget of {config.max_minutes} min reached after epoch "
                f"{epoch + 1}; this policy depends on the machine's speed"
            )
            break

    if best_state is not None:
        policy.load_state_dict(best_state)
    policy.eval()
    test_prompts = [p for p, _ in test_pairs][: config.eval_samples]
    summary: dict[str, Any] = {
        "stage": "supervised pretraining",
        "corpus": str(config.corpus or "shipped"),
        "phrases": {
            "train": len(split.train),
            "validation": len(split.validation),
            "test": len(split.test),
        },
        "vocab_size": tokenizer.vocab_size,
        "epochs_run": len(history),
        "stopped_by": stopped_by,
        "history": history,
        "validation_perplexity": best_ppl,
        "test_perplexity": perplexity(policy, test_pairs),
        "keyword_inclusion_t1": keyword_inclusion(policy, test_prompts, seed=config.seed + 7),
        "keyword_inclusion_chance": chance_inclusion(test_prompts, split.train, seed=config.seed),
        "wall_time_s": round(time.monotonic() - started, 1),
        "config": describe(config),
    }
    _write_atomically(policy, config.output_dir, summary)
    state_path.unlink(missing_ok=True)
    return PretrainResult(config.output_dir, summary)


def _save_state(
    path, policy, optimizer, schedule, best_state, best_ppl, stale, epoch, history
) -> None:  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rows = torch.tensor(
        [[h["epoch"], h["train_loss"], h["val_ppl"]] for h in history], dtype=torch.float64
    )
    torch.save(
        {
            "model": policy.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "best_model": best_state,
            "best_ppl": best_ppl,
            "stale": stale,
            "epoch": epoch,
            "history": rows,
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    os.replace(tmp, path)


def _write_atomically(policy: Policy, output: Path, summary: dict[str, Any]) -> None:
    """Write the checkpoint beside output and rename it in, so output is never half-written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(policy, tmp, version="pretrained", training_summary=summary)
    if output.exists():
        old = output.with_name(output.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)


def ensure_default_checkpoint(data_dir: Path, *, progress: bool = True) -> Path:
    """The default policy's checkpoint, pretrained now with the defaults if it is missing."""
    from feedloop.core.checkpoint import load_checkpoint

    path = default_checkpoint_dir(data_dir)
    try:
        load_checkpoint(path)
    except CheckpointError:
        pretrain(PretrainConfig(data_dir=data_dir), progress=progress)
    return path

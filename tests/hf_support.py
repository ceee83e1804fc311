"""A user's own Hugging Face model directory, as a user would have one, built here (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from feedloop.core.corpus import load_phrases

ENDOFTEXT = "<|endoftext|>"


def build_user_model(directory: Path) -> Path:
    """A GPT-2 saved by save_pretrained beside a GPT-2-style tokenizer.json (byte-level BPE,
    `<|endoftext|>` its only special token, not feedloop's five): the shifted-ids case."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(load_phrases()[:300], trainer)
    tokenizer.add_special_tokens([ENDOFTEXT])  # last, as in GPT-2
    eos = tokenizer.token_to_id(ENDOFTEXT)
    torch.manual_seed(3)
    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size() + 4,  # padded past the tokenizer, as some are
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def make_adapter(base_dir: Path, target: Path, *, rank: int = 4, seed: int = 1) -> Any:
    """An adapter over base_dir's model, A and B drawn from seed (B non-zero: it changes the
    outputs), saved as a checkpoint at target."""
    from feedloop.core.checkpoint import base_digest, load_checkpoint, save_checkpoint
    from feedloop.core.hf_lora import LoRASpec, attach, default_targets
    from feedloop.core.hf_policy import HFCausalPolicy

    base, manifest = load_checkpoint(base_dir)
    assert isinstance(base, HFCausalPolicy)
    digest = base_digest(manifest.files)
    adapted = attach(base, LoRASpec(rank, 8, default_targets(base.model)), digest, share_base=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    save_checkpoint(adapted, target, version="adapter", parent_version="base")
    return adapted

"""A tiny GPT-2-style policy built here, from nothing downloaded: the HF path's test model.

The tokenizer is a byte-level BPE (as GPT-2's; Sennrich et al., 2016; Radford et al., 2019)
trained by `tokenizers` on the corpus's training split, with feedloop's five special tokens as
its ids 0-4 so that its ids are feedloop's. The model is transformers' GPT-2 from a config
(random weights, seeded); `feedloop pretrain --architecture hf-causal-lm` then trains it on the
same (keywords -> phrase) pairs as the GRU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from feedloop.core.hf_policy import HFCausalPolicy
from feedloop.core.hf_tokenizer import DEFAULT_PROMPT_TEMPLATE, HFTokenizer
from feedloop.core.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS


@dataclass(frozen=True)
class TinyGPTConfig:
    """Sizes of the tiny model: the defaults make about 0.2M parameters, trained in minutes."""

    vocab_size: int = 1024  # BPE merges stop here (specials and the 256 bytes included)
    layers: int = 2
    width: int = 64
    heads: int = 4
    context: int = 128  # positions: a template prompt and a phrase fit with room to spare
    dropout: float = 0.1
    value_hidden_dim: int = 64
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE


def train_bpe(texts: Sequence[str], vocab_size: int, template: str) -> str:
    """A byte-level BPE trained on texts (lower-cased, NFKC), as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The template is in every prompt: its words become tokens of their own.
    tokenizer.train_from_iterator([*texts, template.replace("{keywords}", "")], trainer)
    return str(tokenizer.to_str())


def tiny_policy(texts: Sequence[str], config: TinyGPTConfig, *, seed: int = 0) -> HFCausalPolicy:
    """A fresh tiny GPT-2 policy with a BPE tokenizer trained on texts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = HFTokenizer.from_json(
        train_bpe(texts, config.vocab_size, config.prompt_template),
        prompt_template=config.prompt_template,
    )
    model_config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=config.context,
        n_embd=config.width,
        n_layer=config.layers,
        n_head=config.heads,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(model_config)
    return HFCausalPolicy(model.eval(), tokenizer, value_hidden_dim=config.value_hidden_dim)

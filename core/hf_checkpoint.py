"""Checkpoints of Hugging Face causal-LM policies (core/hf_import.py makes one of a user's model).

A checkpoint is a model directory as transformers writes it, plus feedloop's two files:

    config.json              the model's configuration (transformers; no `auto_map`)
    model.safetensors        its weights (or model-0000N-of-0000M.safetensors + the index)
    generation_config.json   transformers' (kept, unused)
    tokenizer.json           the `tokenizers` tokenizer
    value_head.safetensors   the critic beside the LM; its metadata names the vocabulary and
                             hidden size it was made for
    manifest.json            feedloop's manifest: sha256 of every file above, the prompt
                             template, the value head's size

Loading never executes code from the directory: weights come only from safetensors (a
directory holding only pickled weights, pytorch_model.bin and the like, is refused, never
unpickled), `trust_remote_code` is off (a config that names its own code in `auto_map` is
refused) and nothing is downloaded (`local_files_only`). Every refusal is a CheckpointError
that names the file and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from feedloop.core.errors import CheckpointError
from feedloop.core.hf_policy import HFCausalPolicy
from feedloop.core.hf_tokenizer import KEYWORDS, HFTokenizer, read_tokenizer_json
from feedloop.core.policy import Policy
from feedloop.core.weights import load_verified_state

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"  # the name core/checkpoint.py gives every tokenizer
MANIFEST = "manifest.json"
VALUE_HEAD = "value_head.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _quiet() -> None:
    """No progress bars or advice from transformers in a server's or trainer's log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def save_files(policy: Policy, directory: Path) -> list[str]:
    """Write a policy's model directory and value head; the names written."""
    if not isinstance(policy, HFCausalPolicy):
        raise TypeError(f"not a Hugging Face policy: {type(policy).__name__}")
    _quiet()
    policy.model.save_pretrained(directory)
    policy.tokenizer.save(directory / TOKENIZER)
    save_value_head(policy, directory)
    return sorted(_names(directory))


def save_value_head(policy: HFCausalPolicy, directory: Path) -> None:
    """The critic beside the LM, its metadata naming the vocabulary and width it was made for."""
    head = {k: v.detach().contiguous().cpu() for k, v in policy.value_head.state_dict().items()}
    metadata = {
        "vocab_size": str(policy.tokenizer.vocab_size - policy.tokenizer.offset),
        "hidden_size": str(policy.model.config.hidden_size),
    }
    save_file(head, str(directory / VALUE_HEAD), metadata=metadata)


def _names(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return [f.name for f in directory.iterdir() if f.is_file() and f.name != MANIFEST]


def check_model_files(directory: Path, names: list[str]) -> None:
    """Refuse a model directory that would need pickle or remote code, or lacks a tokenizer."""
    weights = [n for n in names if n.endswith(".safetensors") and n != VALUE_HEAD]
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if not weights:
        found = f" (found only pickled weights: {', '.join(sorted(pickled))})" if pickled else ""
        raise CheckpointError(
            f"{directory}: no safetensors weights{found}; feedloop never unpickles weights: "
            "save the model with save_pretrained(DIR, safe_serialization=True)"
        )
    if TOKENIZER not in names:
        raise CheckpointError(
            f"{directory / TOKENIZER}: missing tokenizer: save a fast tokenizer beside the model "
            "(tokenizer.save_pretrained(DIR) writes tokenizer.json)"
        )
    if CONFIG not in names:
        raise CheckpointError(f"{directory / CONFIG}: missing model config")
    config = read_config(directory)
    if config.get("auto_map"):
        raise CheckpointError(
            f"{directory / CONFIG}: the model needs remote code (auto_map "
            f"{sorted(config['auto_map'])}); feedloop loads with trust_remote_code off: use a "
            "model type that transformers ships"
        )
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{directory / CONFIG}: model_type {model_type!r} is not one transformers ships "
            "(it would need remote code, or a newer transformers)"
        )


def read_config(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG}: unreadable model config: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{directory / CONFIG}: not a JSON object")
    return data


def load_model(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    _quiet()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=torch.float32,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: the model does not load: {exc}") from exc
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{directory}: {name} has non-finite values")
    return model.eval()


def tokenizer_of(directory: Path, config: dict[str, Any], prompt_template: str) -> HFTokenizer:
    try:
        return HFTokenizer.from_json(
            read_tokenizer_json(directory / TOKENIZER),
            prompt_template=prompt_template,
            eos_token_id=_single(config.get("eos_token_id")),
            bos_token_id=_single(config.get("bos_token_id")),
            unk_token_id=_single(config.get("unk_token_id")),
        )
    except Exception as exc:  # tokenizers raises its own exception type
        raise CheckpointError(f"{directory / TOKENIZER}: bad tokenizer: {exc}") from exc


def _single(value: Any) -> int | None:
    """A config's token id (some list several end-of-text ids: the first one ends phrases)."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return int(value) if value is not None else None


def load_policy(
    directory: Path, hyper: dict[str, Any], files: list[str], *, model: Any = None
) -> Policy:
    """The policy of a checksummed checkpoint directory (its manifest's hyperparameters and
    file names), every refusal a CheckpointError. model: the directory's model, already
    loaded (a model process's resident base, the same files by digest): not read again."""
    check_model_files(directory, files)
    template = hyper.get("prompt_template", KEYWORDS)
    tokenizer = tokenizer_of(directory, read_config(directory), template)
    if model is None:
        model = load_model(directory)
    try:
        policy = HFCausalPolicy(
            model, tokenizer, value_hidden_dim=int(hyper.get("value_hidden_dim", 64))
        )
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    load_value_head(policy, directory / VALUE_HEAD)
    return policy


def load_value_head(policy: HFCausalPolicy, head_path: Path) -> None:
    """Load a value head file into policy's after checking the vocabulary it was made for."""
    try:
        with safe_open(str(head_path), framework="pt") as f:
            made_for = f.metadata() or {}
        head = load_file(str(head_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{head_path}: unreadable value head: {exc}") from exc
    tokenizer = policy.tokenizer
    vocab = tokenizer.vocab_size - tokenizer.offset
    if made_for.get("vocab_size") != str(vocab):
        raise CheckpointError(
            f"{head_path}: vocabulary mismatch: the value head was made for a vocabulary of "
            f"{made_for.get('vocab_size', 'unknown')} tokens, this model's tokenizer has {vocab}"
        )
    load_verified_state(policy.value_head, head, head_path)

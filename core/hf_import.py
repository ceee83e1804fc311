"""A user's Hugging Face model directory made into a feedloop checkpoint (`feedloop serve
--policy DIR`, `feedloop import-model`): the model as it is, a fresh value head, a manifest."""

from __future__ import annotations

from pathlib import Path

import torch

from feedloop.core import hf_checkpoint
from feedloop.core.checkpoint import Manifest, save_checkpoint
from feedloop.core.errors import CheckpointError
from feedloop.core.hf_policy import HFCausalPolicy
from feedloop.core.hf_tokenizer import KEYWORDS


def import_model_dir(
    source: Path,
    target: Path,
    *,
    prompt_template: str = KEYWORDS,
    value_hidden_dim: int = 64,
    seed: int = 0,
) -> Manifest:
    """Make a user's model directory (config, safetensors, tokenizer.json) a checkpoint.

    The model is written again by save_pretrained (safetensors) with its tokenizer.json; a
    value head is added, freshly initialised from `seed` (the trainer's critic learns it), and
    the manifest. Refuses (CheckpointError) what loading would refuse, before writing anything.
    """
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: not a directory")
    names = [f.name for f in source.iterdir() if f.is_file()]
    hf_checkpoint.check_model_files(source, names)
    tokenizer = hf_checkpoint.tokenizer_of(
        source, hf_checkpoint.read_config(source), prompt_template
    )
    model = hf_checkpoint.load_model(source)
    torch.manual_seed(seed)
    try:
        policy = HFCausalPolicy(model, tokenizer, value_hidden_dim=value_hidden_dim)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    return save_checkpoint(
        policy, target, version="imported", training_summary={"imported_from": str(source)}
    )

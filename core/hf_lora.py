"""LoRA adapters over a Hugging Face causal LM: a publication of a few MB over a base that every
replica already holds (Hu et al., 2021, 'LoRA: Low-Rank Adaptation of Large Language Models').

    W x  ─▶  W x + (alpha / rank) · B A x      A: (rank, in), B: (out, rank), B = 0 at first

The layers are peft's (`inject_adapter_in_model`: the model keeps its class and its forward, so
sampling and teacher forcing run unchanged), on the modules `targets` names (by default the
attention projections of GPT-2- and Llama-style blocks). Only A, B and the value head train;
the base's weights are frozen and never leave the base's checkpoint.

An adapter checkpoint (architecture `hf-causal-lm-lora`) holds

    adapter_model.safetensors   the LoRA tensors, under peft's names (never pickle)
    adapter_config.json         peft's config, so that peft's own PeftModel.from_pretrained
                                reads the adapter too (feedloop reads the manifest)
    value_head.safetensors      the critic, trained beside the adapter
    manifest.json               rank, alpha, targets and the base's content digest

The base is named by content, not by version: `base_digest` hashes the base checkpoint's model
files (their names and sha256s; its value head aside), so the same weights have the same digest
in every registry and on every replica. Loading an adapter takes its base from the resident
bases a model process holds (`bases`, by digest: nothing of the base is read again) or finds it
beside the adapter (a sibling folder holding the full checkpoint with that digest: a registry's
versions; core/checkpoint.py resolves it), and refuses, by name, an adapter whose base is not
there, whose file is missing or pickled, or whose rank or target modules do not fit the base.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from feedloop.core import hf_checkpoint
from feedloop.core.errors import CheckpointError
from feedloop.core.hf_policy import HFCausalPolicy
from feedloop.core.hf_tokenizer import HFTokenizer
from feedloop.core.policy import Policy
from feedloop.core.weights import check_tensors

ARCHITECTURE = "hf-causal-lm-lora"  # core/checkpoint.py's LORA_ARCHITECTURE
MANIFEST = hf_checkpoint.MANIFEST
ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# peft's PeftModel saves its adapter's tensors under this prefix; feedloop writes the same names.
PEFT_PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# Default targets, tried in order: the first family whose every module the model has.
DEFAULT_TARGETS = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Mistral, Qwen, Gemma, OPT
    ("c_attn", "c_proj"),  # GPT-2: fused qkv, attention and MLP outputs
    ("query_key_value", "dense"),  # GPT-NeoX, Falcon, Bloom
)


@dataclass(frozen=True)
class LoRASpec:
    """An adapter's shape: rank, scale alpha (the update is scaled by alpha / rank), and the
    module names (suffixes of the model's module paths) that carry one."""

    rank: int
    alpha: int
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, int) or self.alpha < 1:
            raise ValueError(f"lora alpha must be an integer >= 1, got {self.alpha!r}")
        if not self.targets or not all(t and t.replace("_", "a").isalnum() for t in self.targets):
            raise ValueError(
                f"lora targets must be module names such as q_proj, got {list(self.targets)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: Any) -> LoRASpec:
        try:
            return cls(int(data["rank"]), int(data["alpha"]), tuple(data["targets"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad lora spec {data!r}: {exc}") from exc


def _linear_names(model: Any) -> set[str]:
    """The last path component of every linear layer (nn.Linear, GPT-2's Conv1D) of model."""
    from transformers.pytorch_utils import Conv1D

    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and name
    }


def default_targets(model: Any) -> tuple[str, ...]:
    """The attention projections of model's blocks (ValueError when no family fits)."""
    names = _linear_names(model)
    for family in DEFAULT_TARGETS:
        if set(family) <= names:
            return family
    raise ValueError(
        f"no default LoRA targets for model_type {model.config.model_type!r}: name them "
        f"(--lora-targets) among its linear layers: {', '.join(sorted(names))}"
    )


def check_targets(model: Any, spec: LoRASpec) -> None:
    """ValueError naming the targets that are no linear layer of model."""
    names = _linear_names(model)
    missing = [t for t in spec.targets if t not in names]
    if missing:
        raise ValueError(
            f"target modules {missing} are not linear layers of the base "
            f"({model.config.model_type}: {', '.join(sorted(names))})"
        )


def _peft_config(model: Any, spec: LoRASpec) -> Any:
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    # GPT-2's Conv1D stores its weight as (in, out): peft must transpose it.
    conv = any(
        isinstance(getattr(m, "base_layer", m), Conv1D) and n.rsplit(".", 1)[-1] in spec.targets
        for n, m in model.named_modules()
    )
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,  # dropout would make the served and recomputed log-probs differ
        fan_in_fan_out=conv,
        bias="none",
    )


class LoRAPolicy(HFCausalPolicy):
    """An HF causal-LM policy with LoRA adapters on its model; only they and the value head
    train."""

    architecture = ARCHITECTURE

    def __init__(
        self,
        model: Any,
        tokenizer: HFTokenizer,
        *,
        value_hidden_dim: int,
        spec: LoRASpec,
        base: str,
    ) -> None:
        super().__init__(model, tokenizer, value_hidden_dim=value_hidden_dim)
        self.spec = spec
        self.base_digest = base

    def hyperparameters(self) -> dict[str, Any]:
        lora = {"lora": self.spec.to_dict(), "base_digest": self.base_digest}
        return {**super().hyperparameters(), **lora}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's names (its PeftModel's state_dict keys)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model)
        return {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}


def attach(policy: HFCausalPolicy, spec: LoRASpec, digest: str, *, share_base: bool) -> LoRAPolicy:
    """policy's model with fresh LoRA adapters (B = 0: the same outputs as policy), its value head
    copied. share_base: the new policy's base layers are policy's own tensors (a model process
    holds one base for every adapter); otherwise policy's model itself is adapted in place."""
    from peft import inject_adapter_in_model

    check_targets(policy.model, spec)
    model = policy.model
    if share_base:
        # Copy the module tree, not the tensors: every parameter and buffer is the base's.
        shared: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
        model = copy.deepcopy(model, shared)
    model = inject_adapter_in_model(_peft_config(model, spec), model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    adapted = LoRAPolicy(
        model,
        policy.tokenizer,
        value_hidden_dim=policy.value_hidden_dim,
        spec=spec,
        base=digest,
    )
    adapted.value_head.load_state_dict(policy.value_head.state_dict())
    return adapted.train(policy.training)


def adapt(
    policy: Policy, digest: str, rank: int, alpha: int, targets: tuple[str, ...] = ()
) -> Policy:
    """policy as the trainer trains it with LoRA: a full HF policy (digest: its checkpoint's
    base digest) with fresh adapters of rank and alpha on targets (empty: default_targets)
    over its weights, frozen; an adapter's policy as it is (it keeps its own rank and
    targets). ValueError for a policy that is no Hugging Face causal LM."""
    if isinstance(policy, LoRAPolicy):
        return policy
    if not isinstance(policy, HFCausalPolicy):
        raise ValueError(
            f"lora_rank needs an hf-causal-lm policy; the live version is {policy.architecture}"
        )
    spec = LoRASpec(rank, alpha, targets or default_targets(policy.model))
    return attach(policy, spec, digest, share_base=False)


# -- checkpoints -----------------------------------------------------------------------------


def save_files(policy: Policy, directory: Path) -> list[str]:
    """Write an adapter checkpoint's files (the manifest is the caller's); the names written."""
    if not isinstance(policy, LoRAPolicy):
        raise TypeError(f"not a LoRA policy: {type(policy).__name__}")
    spec = {k: json.dumps(v) for k, v in policy.spec.to_dict().items()}
    metadata = {"base_digest": policy.base_digest, **spec}
    save_file(policy.adapter_state(), str(directory / ADAPTER), metadata=metadata)
    peft_config = _peft_config(policy.model, policy.spec).to_dict()
    peft_config["base_model_name_or_path"] = f"sha256:{policy.base_digest}"
    peft_config["target_modules"] = sorted(peft_config["target_modules"])
    text = json.dumps(peft_config, indent=2, sort_keys=True, default=str)
    (directory / ADAPTER_CONFIG).write_text(text, encoding="utf-8")
    hf_checkpoint.save_value_head(policy, directory)
    return [ADAPTER, ADAPTER_CONFIG, hf_checkpoint.VALUE_HEAD]


def load_adapter(
    directory: Path, hyper: dict[str, Any], files: list[str], base_for: Callable[[str], Policy]
) -> LoRAPolicy:
    """The LoRA policy of a checksummed adapter checkpoint over its base; base_for(digest) gives
    the base policy (CheckpointError when there is none)."""
    pickled = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise CheckpointError(
            f"{directory / pickled[0]}: pickled adapter weights; feedloop never unpickles "
            f"weights: save the adapter as {ADAPTER} (safetensors)"
        )
    if ADAPTER not in files:
        raise CheckpointError(f"{directory / ADAPTER}: missing adapter weights")
    try:
        spec = LoRASpec.from_dict(hyper.get("lora"))
        digest = str(hyper["base_digest"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory / MANIFEST}: bad adapter manifest: {exc}") from exc
    base = base_for(digest)
    if not isinstance(base, HFCausalPolicy) or isinstance(base, LoRAPolicy):
        raise CheckpointError(f"{directory}: its base is not a full hf-causal-lm checkpoint")
    try:
        policy = attach(base, spec, digest, share_base=True)
    except ValueError as exc:
        raise CheckpointError(f"{directory / MANIFEST}: {exc}") from exc
    path = directory / ADAPTER
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable adapter weights: {exc}") from exc
    _load_adapter_state(policy, tensors, path)
    hf_checkpoint.load_value_head(policy, directory / hf_checkpoint.VALUE_HEAD)
    return policy.eval()


def _load_adapter_state(policy: LoRAPolicy, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy an adapter's tensors into policy's LoRA layers after checking every name and shape
    against the adapter its manifest declares over this base (CheckpointError)."""
    from peft import set_peft_model_state_dict

    check_tensors(
        policy.adapter_state(),
        tensors,
        path,
        names_mismatch=(
            f"the adapter's tensors do not fit target modules {list(policy.spec.targets)} "
            "of this base"
        ),
        shape_needs=(
            f"; rank {policy.spec.rank} over this base needs {{shape}} (rank or base mismatch)"
        ),
    )
    state = {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in tensors.items()}
    result = set_peft_model_state_dict(policy.model, state)
    left = list(getattr(result, "unexpected_keys", None) or [])
    if left:
        raise CheckpointError(f"{path}: peft left tensors unloaded: {left[:2]}")

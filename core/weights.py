"""Loading tensors into a module only after checking them: the one check every checkpoint uses."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from feedloop.core.errors import CheckpointError


def check_tensors(
    expected: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    path: Path,
    *,
    names_mismatch: str = "tensors do not match the architecture",
    shape_needs: str = ", the architecture needs {shape}",
) -> None:
    """CheckpointError unless weights has exactly expected's names, each with its shape and
    only finite floats. names_mismatch and shape_needs word the refusal for the caller's kind
    of checkpoint (shape_needs gets the expected shape as {shape})."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: {names_mismatch} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            needs = shape_needs.format(shape=tuple(expected[name].shape))
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}{needs}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: {name} has non-finite values")


def load_verified_state(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path
) -> None:
    """Load weights into module after checking names, shapes and finiteness (CheckpointError)."""
    check_tensors(module.state_dict(), weights, path)
    module.load_state_dict(weights)

"""Loading tensors into a module only after checking them: the one check every checkpoint uses."""

from __future__ import annotations

from pathlib import Path

import torch

from feedloop.core.errors import CheckpointError


def load_verified_state(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path
) -> None:
    """Load weights into module after checking names, shapes and finiteness (CheckpointError)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the architecture "
                f"needs {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: {name} has non-finite values")
    module.load_state_dict(weights)

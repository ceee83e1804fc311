"""Ways to damage a checkpoint after it was published: each one must be refused by the server.

Every function takes a published version's directory and damages it in place. Those named
`*_consistent` also rewrite the manifest's checksums to match the damaged files, so the damage
reaches the checks that come after the checksum (safetensors parsing, finite weights, shapes,
architecture) instead of being caught by the checksum alone.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from feedloop.core.checkpoint import MANIFEST, TOKENIZER, WEIGHTS, sha256_of


def _edit_manifest(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / MANIFEST
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def _rehash(directory: Path) -> None:
    def edit(data: dict) -> None:
        data["files"] = {name: sha256_of(directory / name) for name in data["files"]}

    _edit_manifest(directory, edit)


def flipped_weight_bytes(directory: Path) -> None:
    """Bit rot: the last bytes of the weights change; the manifest is untouched."""
    weights = directory / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    weights.write_bytes(bytes(data))


def wrong_manifest_checksum(directory: Path) -> None:
    _edit_manifest(directory, lambda data: data["files"].__setitem__(WEIGHTS, "0" * 64))


def truncated_weights_consistent(directory: Path) -> None:
    """A half-written weights file whose checksum was (wrongly) recorded as it is."""
    weights = directory / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _rehash(directory)


def empty_weights_consistent(directory: Path) -> None:
    (directory / WEIGHTS).write_bytes(b"")
    _rehash(directory)


def nan_weights_consistent(directory: Path) -> None:
    tensors = load_file(str(directory / WEIGHTS))
    name = sorted(n for n, t in tensors.items() if t.is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(directory / WEIGHTS), metadata={"architecture": "gru-seq2seq"})
    _rehash(directory)


def inf_weights_consistent(directory: Path) -> None:
    tensors = load_file(str(directory / WEIGHTS))
    name = sorted(n for n, t in tensors.items() if t.is_floating_point())[-1]
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, str(directory / WEIGHTS), metadata={"architecture": "gru-seq2seq"})
    _rehash(directory)


def wider_architecture_consistent(directory: Path) -> None:
    """The manifest says the network is twice as wide as the weights it ships."""

    def edit(data: dict) -> None:
        data["hyperparameters"]["hidden_dim"] *= 2

    _edit_manifest(directory, edit)


def unknown_architecture_consistent(directory: Path) -> None:
    _edit_manifest(directory, lambda data: data.__setitem__("architecture", "transformer-lm"))


def missing_tensor_consistent(directory: Path) -> None:
    tensors = load_file(str(directory / WEIGHTS))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(directory / WEIGHTS), metadata={"architecture": "gru-seq2seq"})
    _rehash(directory)


def shrunk_vocabulary_consistent(directory: Path) -> None:
    """A tokenizer from another run: fewer tokens than the embedding has rows."""
    path = directory / TOKENIZER
    data = json.loads(path.read_text(encoding="utf-8"))
    data["tokens"] = data["tokens"][: len(data["tokens"]) // 2]
    path.write_text(json.dumps(data), encoding="utf-8")
    _rehash(directory)


def unreadable_manifest(directory: Path) -> None:
    (directory / MANIFEST).write_text("{ not json", encoding="utf-8")


def pickled_weights_consistent(directory: Path, marker: Path) -> None:
    """Weights replaced by a pickle that, if ever unpickled, creates `marker` (then raises)."""
    (directory / WEIGHTS).write_bytes(pickle.dumps(_Exploit(str(marker))))
    _rehash(directory)


class _Exploit:
    """Unpickling runs `open(marker, "w")`: proof of code execution if the marker appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


DAMAGES: dict[str, Callable[[Path], None]] = {
    "flipped-bytes": flipped_weight_bytes,
    "wrong-manifest-checksum": wrong_manifest_checksum,
    "truncated-weights": truncated_weights_consistent,
    "empty-weights": empty_weights_consistent,
    "nan-weights": nan_weights_consistent,
    "inf-weights": inf_weights_consistent,
    "incompatible-architecture": wider_architecture_consistent,
    "unknown-architecture": unknown_architecture_consistent,
    "missing-tensor": missing_tensor_consistent,
    "vocabulary-mismatch": shrunk_vocabulary_consistent,
    "unreadable-manifest": unreadable_manifest,
}

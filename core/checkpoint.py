"""Checkpoints: a directory with safetensors weights, the tokenizer and a JSON manifest.

    manifest.json       version, parent, architecture + hyperparameters, sha256 of every file,
                        creation time, parameter count, a free-form training summary
    weights.safetensors tensors only: loading never executes code (no pickle anywhere)
    tokenizer.json      the vocabulary, so nothing is rebuilt at load time

That is the GRU's layout; an architecture declares its own files (`ARCHITECTURES`): a Hugging
Face causal LM's checkpoint is a model directory as `save_pretrained` writes it (config.json,
model.safetensors), its tokenizer.json and value_head.safetensors (core/hf_checkpoint.py); a
LoRA adapter's is its adapter and value head, its manifest naming the base by content digest
(core/hf_lora.py).

`load_checkpoint` verifies all of it (checksums, architecture, shapes, vocabulary, finite
weights) and raises one CheckpointError that says what is wrong and where.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from feedloop.core.errors import CheckpointError
from feedloop.core.gru import GRUConfig, GRUPolicy
from feedloop.core.policy import Policy
from feedloop.core.tokenizer import SPECIAL_TOKENS, Tokenizer
from feedloop.core.weights import load_verified_state

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TOKENIZER = "tokenizer.json"
FORMAT_VERSION = 1
# A Hugging Face causal LM's full checkpoint, and a LoRA adapter over one (core/hf_lora.py).
HF_ARCHITECTURE = "hf-causal-lm"
LORA_ARCHITECTURE = "hf-causal-lm-lora"
# A full checkpoint's files that are not its model: an adapter brings its own value head.
NOT_BASE_MODEL = (MANIFEST, "value_head.safetensors")


@dataclass(frozen=True)
class Architecture:
    """How one architecture's checkpoints are written and read.

    save(policy, directory) writes its files and returns their names; load(directory, manifest,
    bases) builds and verifies the policy from files already checksummed, raising
    CheckpointError (bases: see load_checkpoint); required_files: what a manifest of this
    architecture must list.
    """

    save: Callable[[Policy, Path], list[str]]
    load: Callable[[Path, Manifest, Bases | None], Policy]
    required_files: tuple[str, ...]


# Resident base models of LoRA adapters, by content digest (core/hf_lora.py): a model process
# keeps one per base, so an adapter loads without reading its base again.
Bases = MutableMapping[str, Any]


def _save_state_dict(policy: Policy, directory: Path) -> list[str]:
    state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"architecture": policy.architecture})
    policy.tokenizer.save(directory / TOKENIZER)
    return [WEIGHTS, TOKENIZER]


def _load_gru(directory: Path, manifest: Manifest, bases: Bases | None) -> Policy:
    try:
        tokenizer = Tokenizer.load(directory / TOKENIZER)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory / TOKENIZER}: bad tokenizer: {exc}") from exc
    if tokenizer.tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise CheckpointError(f"{directory / TOKENIZER}: special tokens out of place")
    try:
        policy = GRUPolicy(GRUConfig(**manifest.hyperparameters), tokenizer)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / MANIFEST}: hyperparameters do not fit: {exc}") from exc
    try:
        weights = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS}: unreadable weights: {exc}") from exc
    load_verified_state(policy, weights, directory / WEIGHTS)
    return policy


def _save_hf(policy: Policy, directory: Path) -> list[str]:
    from feedloop.core import hf_checkpoint  # transformers only where a model needs it

    return hf_checkpoint.save_files(policy, directory)


def _load_hf(directory: Path, manifest: Manifest, bases: Bases | None) -> Policy:
    try:
        from feedloop.core import hf_checkpoint, hf_lora
    except ImportError as exc:
        raise CheckpointError(
            f"{directory / MANIFEST}: architecture {manifest.architecture} needs the hf extra "
            f"(pip install 'feedloop[hf]'): {exc}"
        ) from exc
    files = list(manifest.files)
    if manifest.architecture == LORA_ARCHITECTURE:

        def base_for(digest: str) -> Policy:
            resident = bases.get(digest) if bases is not None else None
            if resident is not None:
                return resident  # type: ignore[no-any-return]
            found = find_base(directory, digest, tuple(bases or ()))
            return load_checkpoint(found, bases=bases)[0]  # added to bases there

        return hf_lora.load_adapter(directory, manifest.hyperparameters, files, base_for)
    # A model already resident (the base of adapters loaded before) is not read again.
    digest = base_digest(manifest.files)
    resident = bases.get(digest) if bases is not None else None
    model = resident.model if resident is not None else None
    policy = hf_checkpoint.load_policy(directory, manifest.hyperparameters, files, model=model)
    if bases is not None:  # the base of the adapters trained over it
        bases.setdefault(digest, policy)
    return policy


def _save_lora(policy: Policy, directory: Path) -> list[str]:
    from feedloop.core import hf_lora

    return hf_lora.save_files(policy, directory)


# Architecture name -> how its checkpoints are written and read. A new policy is added here.
ARCHITECTURES = {
    GRUPolicy.architecture: Architecture(_save_state_dict, _load_gru, (WEIGHTS, TOKENIZER)),
    HF_ARCHITECTURE: Architecture(
        _save_hf, _load_hf, ("config.json", TOKENIZER, "value_head.safetensors")
    ),
    # The adapter file itself is checked by the loader, which names a pickled one as such.
    LORA_ARCHITECTURE: Architecture(_save_lora, _load_hf, ("value_head.safetensors",)),
}


@dataclass(frozen=True)
class Manifest:
    version: str
    parent_version: str | None
    architecture: str
    hyperparameters: dict[str, Any]
    files: dict[str, str]
    created_at: str
    parameter_count: int
    training_summary: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(**data)

    def with_version(self, version: str) -> Manifest:
        return Manifest(**{**self.__dict__, "version": version})


def base_digest(files: dict[str, str]) -> str:
    """A base model's content digest: sha256 over its checkpoint's model files' names and
    sha256s (a manifest's `files`; value head aside), the same in every registry and replica."""
    lines = "".join(f"{n}\0{h}\n" for n, h in sorted(files.items()) if n not in NOT_BASE_MODEL)
    return hashlib.sha256(lines.encode()).hexdigest()


def provided_base(manifest: Manifest) -> str | None:
    """The base digest a version provides to adapters: a full HF checkpoint's, else None."""
    return base_digest(manifest.files) if manifest.architecture == HF_ARCHITECTURE else None


def needed_base(manifest: Manifest) -> str | None:
    """The base digest an adapter version needs (its manifest's), else None."""
    if manifest.architecture != LORA_ARCHITECTURE:
        return None
    digest = manifest.hyperparameters.get("base_digest")
    return digest if isinstance(digest, str) else ""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write the manifest durably (temporary file, fsync, rename)."""
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def save_checkpoint(
    policy: Policy,
    directory: Path,
    *,
    version: str = "unpublished",
    parent_version: str | None = None,
    training_summary: dict[str, Any] | None = None,
) -> Manifest:
    """Write policy to directory (created; must be empty or absent), every file fsynced."""
    directory.mkdir(parents=True, exist_ok=True)
    names = ARCHITECTURES[policy.architecture].save(policy, directory)
    for name in names:
        with (directory / name).open("rb") as f:
            os.fsync(f.fileno())
    manifest = Manifest(
        version=version,
        parent_version=parent_version,
        architecture=policy.architecture,
        hyperparameters=policy.hyperparameters(),
        files={name: sha256_of(directory / name) for name in names},
        created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        parameter_count=policy.parameter_count(),
        training_summary=training_summary or {},
    )
    write_manifest(directory, manifest)
    fsync_dir(directory)
    return manifest


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest.from_dict(data)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing manifest") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest: {exc}") from exc
    if manifest.format != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {manifest.format}")
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Check that every file the manifest names exists and matches its sha256."""
    architecture = ARCHITECTURES.get(manifest.architecture)
    required = architecture.required_files if architecture else (WEIGHTS, TOKENIZER)
    for name in required:
        if name not in manifest.files:
            raise CheckpointError(f"{directory / MANIFEST}: no checksum for {name}")
    for name in manifest.files:
        # Registries copy these names into their own folders: a path would write elsewhere.
        if not name or Path(name).name != name or name in (".", "..", MANIFEST):
            raise CheckpointError(f"{directory / MANIFEST}: {name!r} is not a plain file name")
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: file named in the manifest is missing")
        actual = sha256_of(path)
        if actual != expected:
            raise CheckpointError(
                f"{path}: sha256 {actual[:12]}… does not match the manifest's {expected[:12]}…"
            )


def find_base(directory: Path, digest: str, resident: tuple[str, ...] = ()) -> Path:
    """The full HF checkpoint beside directory whose base digest is digest (CheckpointError
    naming the replica's resident bases, when it has some, and where it looked)."""
    here = directory.resolve()
    for sibling in sorted(here.parent.iterdir()):
        if sibling == here or not (sibling / MANIFEST).is_file():
            continue
        try:
            manifest = read_manifest(sibling)
        except CheckpointError:
            continue
        whole = all((sibling / name).is_file() for name in manifest.files)  # not pruned
        if whole and provided_base(manifest) == digest:
            return sibling
    names = ", ".join(d[:12] + "…" for d in resident)
    mine = f"this replica's base is {names} and " if resident else ""
    raise CheckpointError(
        f"{directory}: the adapter was made for base {digest[:12]}…; {mine}no full checkpoint "
        f"beside it ({here.parent}) has that digest: publish the adapter's base first, or "
        "train the adapter over a base the replicas have"
    )


def load_checkpoint(directory: Path, *, bases: Bases | None = None) -> tuple[Policy, Manifest]:
    """Load and verify a checkpoint; the policy comes back in eval() mode.

    bases: resident LoRA bases by digest, used and filled (a model process's); without it an
    adapter's base is loaded from beside it every time."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    architecture = ARCHITECTURES.get(manifest.architecture)
    if architecture is None:
        raise CheckpointError(
            f"{directory / MANIFEST}: unknown architecture {manifest.architecture!r} "
            f"(known: {', '.join(sorted(ARCHITECTURES))})"
        )
    policy = architecture.load(directory, manifest, bases)
    if policy.parameter_count() != manifest.parameter_count:
        raise CheckpointError(
            f"{directory / MANIFEST}: parameter_count {manifest.parameter_count} != "
            f"{policy.parameter_count()}"
        )
    return policy.eval(), manifest

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from feedloop.core.checkpoint import (
    MANIFEST,
    TOKENIZER,
    WEIGHTS,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    sha256_of,
)
from feedloop.core.errors import CheckpointError


def rehash(directory: Path) -> None:
    """Make the manifest's checksums match the files again (to reach the deeper checks)."""
    data = json.loads((directory / MANIFEST).read_text())
    data["files"] = {name: sha256_of(directory / name) for name in data["files"]}
    (directory / MANIFEST).write_text(json.dumps(data))


def edit_manifest(directory: Path, **changes) -> None:
    data = json.loads((directory / MANIFEST).read_text())
    data.update(changes)
    (directory / MANIFEST).write_text(json.dumps(data))


def test_save_and_load_round_trip_weights_tokenizer_and_manifest(tiny_checkpoint, tmp_path):
    policy, manifest = load_checkpoint(tiny_checkpoint)
    assert (
        manifest.architecture == "gru-seq2seq"
        and manifest.parameter_count == policy.parameter_count()
    )
    assert set(manifest.files) == {WEIGHTS, TOKENIZER}
    assert "validation_perplexity" in manifest.training_summary
    save_checkpoint(
        policy,
        tmp_path / "again",
        version="x",
        parent_version=manifest.version,
        training_summary={"note": "copy"},
    )
    again, m2 = load_checkpoint(tmp_path / "again")
    assert m2.parent_version == manifest.version and m2.training_summary == {"note": "copy"}
    for (k, a), (_, b) in zip(policy.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert again.tokenizer == policy.tokenizer


def test_a_changed_weights_file_fails_its_checksum(tiny_copy):
    with (tiny_copy / WEIGHTS).open("r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match=r"weights.safetensors: sha256 .* does not match"):
        load_checkpoint(tiny_copy)


def test_a_truncated_weights_file_is_refused(tiny_copy):
    data = (tiny_copy / WEIGHTS).read_bytes()
    (tiny_copy / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tiny_copy)
    rehash(tiny_copy)
    with pytest.raises(CheckpointError, match="unreadable weights"):
        load_checkpoint(tiny_copy)


def test_nan_weights_are_refused_and_named(tiny_copy):
    weights = load_file(str(tiny_copy / WEIGHTS))
    weights["output.bias"][3] = float("nan")
    save_file(weights, str(tiny_copy / WEIGHTS))
    rehash(tiny_copy)
    with pytest.raises(CheckpointError, match=r"output\.bias has non-finite values"):
        load_checkpoint(tiny_copy)


def test_shapes_that_do_not_fit_the_architecture_are_refused(tiny_copy):
    hp = read_manifest(tiny_copy).hyperparameters
    edit_manifest(tiny_copy, hyperparameters={**hp, "hidden_dim": hp["hidden_dim"] * 2})
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(tiny_copy)


def test_an_unknown_architecture_is_refused(tiny_copy):
    edit_manifest(tiny_copy, architecture="transformer-xl")
    with pytest.raises(CheckpointError, match="unknown architecture 'transformer-xl'"):
        load_checkpoint(tiny_copy)


def test_a_vocabulary_that_does_not_fit_is_refused(tiny_copy):
    tokens = json.loads((tiny_copy / TOKENIZER).read_text())
    tokens["tokens"] = tokens["tokens"][:-1]
    (tiny_copy / TOKENIZER).write_text(json.dumps(tokens))
    rehash(tiny_copy)
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_checkpoint(tiny_copy)


def test_missing_manifest_or_file_is_named(tiny_copy):
    (tiny_copy / TOKENIZER).unlink()
    with pytest.raises(
        CheckpointError, match=r"tokenizer\.json: file named in the manifest is missing"
    ):
        load_checkpoint(tiny_copy)
    (tiny_copy / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="missing manifest"):
        load_checkpoint(tiny_copy)


class Boom:
    def __reduce__(self):
        return (Path.touch, (Path(MARKER),))


MARKER = "/tmp/feedloop-pickle-was-executed"


def test_a_planted_pickle_is_never_executed(tiny_copy):
    Path(MARKER).unlink(missing_ok=True)
    (tiny_copy / WEIGHTS).write_bytes(pickle.dumps({"output.bias": Boom()}))
    rehash(tiny_copy)
    with pytest.raises(CheckpointError):
        load_checkpoint(tiny_copy)
    assert not Path(MARKER).exists()
    torch.save({"x": Boom()}, tiny_copy / WEIGHTS)
    rehash(tiny_copy)
    with pytest.raises(CheckpointError):
        load_checkpoint(tiny_copy)
    assert not Path(MARKER).exists()

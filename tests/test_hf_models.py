"""A user's own Hugging Face model directory as a policy, and the models feedloop refuses.

The "user's model" is built here as a user would have it: a GPT-2 saved by `save_pretrained`
beside a tokenizer.json whose only special token is `<|endoftext|>` (not feedloop's five), so
feedloop's ids are the model's shifted by five. Each refusal names the problem and the file.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_support import build_user_model
from safetensors.torch import load_file, save_file

from feedloop.core.checkpoint import (
    MANIFEST,
    load_checkpoint,
    save_checkpoint,
    sha256_of,
)
from feedloop.core.errors import CheckpointError
from feedloop.core.hf_import import import_model_dir
from feedloop.core.hf_policy import HFCausalPolicy
from feedloop.core.policy import SampleRequest, TokenBatch
from feedloop.core.sampling import SamplingParams
from feedloop.core.tokenizer import EOS_ID


@pytest.fixture(scope="module")
def user_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_user_model(tmp_path_factory.mktemp("user") / "my-model")


@pytest.fixture(scope="module")
def imported(user_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("imported") / "checkpoint"
    import_model_dir(user_model_dir, target, prompt_template="Keywords: {keywords}. Phrase:")
    return target


def test_a_users_model_directory_becomes_a_policy_with_shifted_ids(imported, user_model_dir):
    policy, manifest = load_checkpoint(imported)
    assert isinstance(policy, HFCausalPolicy)
    assert manifest.architecture == "hf-causal-lm"
    tokenizer = policy.tokenizer
    assert tokenizer.offset == 5
    assert tokenizer.decode(tokenizer.encode("a calm sea")) == "a calm sea"
    # feedloop's <eos> stands for the model's end-of-text token
    assert (
        tokenizer.model_eos_id
        == json.loads((user_model_dir / "config.json").read_text())["eos_token_id"]
    )
    with torch.no_grad():
        batch = TokenBatch.from_lists([policy.encode_prompt("ocean")], [[EOS_ID]])
        logits = policy.teacher_forced(batch).logits
        model_ids = torch.tensor([[i - 5 for i in policy.encode_prompt("ocean")]])
        model_logits = policy.model(input_ids=model_ids).logits[0, -1]
    assert torch.allclose(logits[0, 0, EOS_ID], model_logits[tokenizer.model_eos_id], atol=1e-5)
    assert float(logits[0, 0, tokenizer.model_eos_id + 5]) < -1e8  # never drawn under its own id
    assert float(logits[0, 0, :EOS_ID].max()) < -1e8


def test_a_users_model_samples_exactly_and_ends_at_its_end_of_text(imported):
    policy, _ = load_checkpoint(imported)
    reqs = [
        SampleRequest(policy.encode_prompt(p), SamplingParams(seed=s, max_tokens=10, **kw), 3)
        for s, (p, kw) in enumerate(
            [("ocean", {}), ("garden", {"temperature": 0.8, "top_k": 30}), ("tea", {"top_p": 0.8})]
        )
    ]
    outs = policy.sample(reqs)
    prompts = [r.prompt_ids for r in reqs for _ in range(r.num_candidates)]
    params = [r.params for r in reqs for _ in range(r.num_candidates)]
    flat = [o for row in outs for o in row]
    scored = policy.score(prompts, [o.token_ids for o in flat], params)
    for o, s in zip(flat, scored, strict=True):
        assert all(abs(a - b) < 1e-5 for a, b in zip(o.behaviour_logprobs, s, strict=True))
        assert all(t >= 5 for t in o.phrase_ids)  # only the model's own tokens, shifted
        assert isinstance(policy.decode(o.token_ids), str)
    alone = policy.sample([reqs[1]])[0]
    assert [o.token_ids for o in alone] == [o.token_ids for o in outs[1]]


def test_the_imported_checkpoint_keeps_the_declared_prompt_template(imported):
    policy, manifest = load_checkpoint(imported)
    assert manifest.hyperparameters["prompt_template"] == "Keywords: {keywords}. Phrase:"
    ids = [i - 5 for i in policy.encode_prompt("ocean")]
    assert policy.tokenizer.compiled.decode(ids) == "Keywords: ocean. Phrase:"


def copy_of(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


def test_a_model_without_a_tokenizer_is_refused_by_name(user_model_dir, tmp_path):
    bad = copy_of(user_model_dir, tmp_path)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing tokenizer"):
        import_model_dir(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.marker),))


def test_pickle_only_weights_are_refused_and_never_unpickled(user_model_dir, tmp_path):
    bad = copy_of(user_model_dir, tmp_path)
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError, match=r"no safetensors weights.*pytorch_model\.bin"):
        import_model_dir(bad, tmp_path / "out")
    assert not marker.exists()


def test_a_model_that_needs_remote_code_is_refused(user_model_dir, tmp_path):
    bad = copy_of(user_model_dir, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(CheckpointError, match="needs remote code"):
        import_model_dir(bad, tmp_path / "out")


def test_a_tokenizer_larger_than_the_models_embedding_is_refused(imported, tmp_path):
    bad = copy_of(imported, tmp_path)
    tokens = json.loads((bad / "tokenizer.json").read_text())
    vocab = tokens["model"]["vocab"]
    for i in range(50):
        vocab[f"zzextra{i}"] = len(vocab) + 1  # past the model's 305 rows (a sparse id)
    (bad / "tokenizer.json").write_text(json.dumps(tokens))
    rehash(bad, "tokenizer.json")
    with pytest.raises(CheckpointError, match="vocabulary mismatch"):
        load_checkpoint(bad)


def test_a_value_head_made_for_another_vocabulary_is_refused(imported, tmp_path):
    bad = copy_of(imported, tmp_path)
    head = load_file(str(bad / "value_head.safetensors"))
    save_file(head, str(bad / "value_head.safetensors"), metadata={"vocab_size": "50257"})
    rehash(bad, "value_head.safetensors")
    with pytest.raises(CheckpointError, match="value head was made for a vocabulary of 50257"):
        load_checkpoint(bad)


def test_a_manifest_listing_pickled_weights_is_refused(imported, tmp_path):
    bad = copy_of(imported, tmp_path)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["files"]["pytorch_model.bin"] = manifest["files"].pop("model.safetensors")
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        load_checkpoint(bad)


def test_non_finite_model_weights_are_refused(imported, tmp_path):
    policy, _ = load_checkpoint(imported)
    with torch.no_grad():
        next(policy.model.parameters())[0, 0] = float("nan")
    save_checkpoint(policy, tmp_path / "nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(tmp_path / "nan")


def rehash(directory: Path, name: str) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][name] = sha256_of(directory / name)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_the_tokenizer_travels_to_the_server_process_as_its_json(imported):
    policy, _ = load_checkpoint(imported)
    copy = pickle.loads(pickle.dumps(policy.tokenizer))
    assert copy._compiled is None or copy is not policy.tokenizer
    assert copy.encode_prompt("ocean") == policy.tokenizer.encode_prompt("ocean")
    assert copy.decode(policy.tokenizer.encode("warm sun")) == "warm sun"
    assert copy == policy.tokenizer


def test_a_tokenizer_without_end_of_text_or_a_template_without_keywords_is_refused(imported):
    from feedloop.core.hf_tokenizer import HFTokenizer

    text = (imported / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="declares no end-of-text token"):
        HFTokenizer.from_json(text, eos_token_id=None)
    with pytest.raises(ValueError, match="no \\{keywords\\} placeholder"):
        HFTokenizer.from_json(text, prompt_template="Phrase:", eos_token_id=0)


def test_a_manifest_naming_a_path_outside_the_checkpoint_is_refused(imported, tmp_path):
    bad = copy_of(imported, tmp_path)
    (tmp_path / "elsewhere.json").write_text("{}")
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["files"]["../elsewhere.json"] = sha256_of(tmp_path / "elsewhere.json")
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"'\.\./elsewhere\.json' is not a plain file name"):
        load_checkpoint(bad)

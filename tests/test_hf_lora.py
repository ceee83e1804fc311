"""LoRA adapters over the tiny Hugging Face policy: what trains, what an adapter checkpoint
holds and how it loads over its base, every refusal by name, the registry keeping an adapter's
base, the trainer's rounds publishing adapters, and the model process loading an adapter
without reloading its base."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_support import make_adapter
from trainer_support import Env, fast_config, hf_env, one_torch_thread, simulation

pytest.importorskip("peft")

from feedloop.core import hf_checkpoint as hf_files
from feedloop.core.checkpoint import (
    MANIFEST,
    base_digest,
    load_checkpoint,
    read_manifest,
)
from feedloop.core.errors import CheckpointError, RegistryError
from feedloop.core.hf_lora import ADAPTER, LoRAPolicy, LoRASpec, attach, default_targets
from feedloop.core.hf_policy import HFCausalPolicy
from feedloop.core.policy import SampleRequest
from feedloop.core.registry import DirectoryRegistry, LivePointer
from feedloop.core.registry.retention import (
    RegistrySnapshot,
    RetentionPolicy,
    VersionFacts,
    plan_prune,
)
from feedloop.core.sampling import SamplingParams
from feedloop.demo.simusers import IncludeWord
from feedloop.server.model_process import OK, REFUSED, _Models
from feedloop.trainer.algorithms import ALGORITHMS
from feedloop.trainer.loop import Trainer

__all__ = ["hf_env", "one_torch_thread"]
PARAMS = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, seed=5)


def load_base(directory: Path) -> tuple[HFCausalPolicy, str]:
    policy, manifest = load_checkpoint(directory)
    assert isinstance(policy, HFCausalPolicy)
    return policy, base_digest(manifest.files)


@pytest.fixture
def registry(tmp_path: Path, hf_checkpoint: Path) -> Iterator[DirectoryRegistry]:
    """A registry whose v0001 is the tiny HF policy (the base) and v0002 an adapter over it."""
    opened = DirectoryRegistry(tmp_path / "registry")
    opened.publish(hf_checkpoint, reason="base", make_live=True)
    make_adapter(hf_checkpoint, tmp_path / "adapter")
    opened.publish(tmp_path / "adapter", reason="adapter", make_live=True)
    yield opened
    opened.close()


def test_a_fresh_adapter_changes_nothing_and_only_it_and_the_value_head_train(
    hf_checkpoint: Path,
) -> None:
    base, digest = load_base(hf_checkpoint)
    assert default_targets(base.model) == ("c_attn", "c_proj")
    adapted = attach(base, LoRASpec(4, 8, ("c_attn", "c_proj")), digest, share_base=True)
    prompt = base.encode_prompt("ocean")
    request = [SampleRequest(prompt, PARAMS, 3)]
    assert adapted.sample(request) == base.sample(request)  # B = 0: the base's outputs
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or n.startswith("value_head.") for n in trainable)
    # 2 layers x (attention c_attn, c_proj + MLP c_proj) x (A, B) + the value head's 4
    assert len(trainable) == 2 * 3 * 2 + 4
    # The base's tensors are shared, not copied.
    assert adapted.model.transformer.wte.weight is base.model.transformer.wte.weight


def test_llama_style_blocks_default_to_their_attention_projections() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    assert default_targets(LlamaForCausalLM(config)) == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_an_adapter_checkpoint_names_its_base_by_digest_and_loads_exactly(
    registry: DirectoryRegistry, hf_checkpoint: Path, tmp_path: Path
) -> None:
    saved = make_adapter(hf_checkpoint, tmp_path / "again")
    adapter_dir = registry.checkpoint_dir("v0002")
    manifest = read_manifest(adapter_dir)
    assert manifest.architecture == "hf-causal-lm-lora"
    assert sorted(manifest.files) == ["adapter_config.json", ADAPTER, "value_head.safetensors"]
    assert manifest.hyperparameters["lora"] == {
        "rank": 4,
        "alpha": 8,
        "targets": ["c_attn", "c_proj"],
    }
    assert manifest.hyperparameters["base_digest"] == base_digest(
        read_manifest(hf_checkpoint).files
    )
    adapter_bytes = (adapter_dir / ADAPTER).stat().st_size
    assert adapter_bytes * 5 < (hf_checkpoint / "model.safetensors").stat().st_size

    # Loaded from the registry, over the base found beside it: the same samples and log-probs.
    loaded, _ = load_checkpoint(adapter_dir)
    assert isinstance(loaded, LoRAPolicy)
    prompt = saved.encode_prompt("morning coffee")
    request = [SampleRequest(prompt, PARAMS, 3)]
    samples = loaded.sample(request)[0]
    assert samples == saved.eval().sample(request)[0]
    base, _ = load_base(hf_checkpoint)
    assert samples != base.sample(request)[0]  # the adapter does change the policy
    recomputed = saved.score([prompt] * 3, [s.token_ids for s in samples], [PARAMS] * 3)
    gaps = [
        abs(a - b)
        for s, r in zip(samples, recomputed, strict=True)
        for a, b in zip(s.behaviour_logprobs, r, strict=True)
    ]
    assert max(gaps) < 1e-5

    # peft itself reads the adapter (its names and config are peft's).
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base.model, adapter_dir).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert torch.allclose(
            peft_model(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-6
        )


def _rewrite_manifest(directory: Path, change: Any) -> None:
    data = json.loads((directory / MANIFEST).read_text())
    change(data)
    (directory / MANIFEST).write_text(json.dumps(data))


def _other_digest(d: dict[str, Any]) -> None:
    d["hyperparameters"]["base_digest"] = "0" * 64


def _missing_file(d: dict[str, Any]) -> None:
    pass  # the file goes, the manifest still names it


def _pickled(d: dict[str, Any]) -> None:
    data = d["files"].pop(ADAPTER)
    d["files"]["adapter_model.bin"] = data


def _rank(d: dict[str, Any]) -> None:
    d["hyperparameters"]["lora"]["rank"] = 2


def _targets(d: dict[str, Any]) -> None:
    d["hyperparameters"]["lora"]["targets"] = ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_other_digest, "made for base 000000000000…; this replica's base is"),
        (_missing_file, "adapter_model.safetensors: file named in the manifest is missing"),
        (_pickled, "adapter_model.bin: pickled adapter weights; feedloop never unpickles"),
        (_rank, "rank 2 over this base needs (2, 32) (rank or base mismatch)"),
        (_targets, "target modules ['q_proj', 'v_proj'] are not linear layers of the base"),
    ],
)
def test_a_bad_adapter_is_refused_by_name_and_the_resident_base_is_untouched(
    registry: DirectoryRegistry, tmp_path: Path, change: Any, message: str
) -> None:
    bad = tmp_path / "versions" / "bad"
    bad.parent.mkdir()
    shutil.copytree(registry.checkpoint_dir("v0002"), bad)
    _rewrite_manifest(bad, change)
    if change is _missing_file:
        (bad / ADAPTER).unlink()
    if change is _pickled:
        (bad / ADAPTER).rename(bad / "adapter_model.bin")
    bases: dict[str, Any] = {}
    base, _ = load_checkpoint(registry.checkpoint_dir("v0001"), bases=bases)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(bad, bases=bases)
    assert message in str(refused.value)
    assert list(bases.values()) == [base]
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_the_registry_refuses_an_adapter_whose_base_it_lacks(
    tmp_path: Path, hf_checkpoint: Path
) -> None:
    make_adapter(hf_checkpoint, tmp_path / "adapter")
    registry = DirectoryRegistry(tmp_path / "registry")
    try:
        with pytest.raises(RegistryError, match=r"publish its base \(the full checkpoint\) first"):
            registry.publish(tmp_path / "adapter")
        assert registry.versions() == []
        registry.publish(hf_checkpoint)
        assert registry.publish(tmp_path / "adapter") == "v0002"
    finally:
        registry.close()


def test_retention_keeps_the_base_of_every_adapter_it_keeps() -> None:
    keep_one = RetentionPolicy(keep_last=1, keep_best=0, keep_rollback=0)
    full = VersionFacts(None, {}, False, provides_base="b1")
    # v0004, live, an adapter without a parent among the versions: nothing else keeps a base.
    adapter = VersionFacts(None, {}, False, needs_base="b1")
    facts = {"v0001": full, "v0002": full, "v0003": adapter, "v0004": adapter}
    plan = plan_prune(RegistrySnapshot(facts, LivePointer("v0004"), frozenset()), keep_one)
    # The oldest version that provides the base is kept for it; one copy is enough.
    assert plan.keep == {"v0001": ("base",), "v0004": ("live", "reference", "last")}
    assert plan.prune == ("v0002", "v0003")
    # A provider kept anyway (pinned) serves: no second copy.
    plan = plan_prune(RegistrySnapshot(facts, LivePointer("v0004"), frozenset({"v0002"})), keep_one)
    assert plan.keep == {"v0002": ("pinned",), "v0004": ("live", "reference", "last")}
    # Nothing kept needs the base: it is pruned like any version.
    plan = plan_prune(RegistrySnapshot(facts, LivePointer("v0002"), frozenset()), keep_one)
    assert plan.prune == ("v0001", "v0003")


def test_a_prune_of_the_registry_never_deletes_a_base_an_adapter_needs(
    registry: DirectoryRegistry, tmp_path: Path, hf_checkpoint: Path
) -> None:
    make_adapter(hf_checkpoint, tmp_path / "second", seed=2)
    registry.publish(tmp_path / "second", make_live=True)  # v0003
    plan = registry.prune(RetentionPolicy(keep_last=1, keep_best=0, keep_rollback=0))
    assert plan.keep == {"v0001": ("base",), "v0003": ("live", "reference", "last")}
    assert registry.pruned_versions() == ["v0002"]
    load_checkpoint(registry.checkpoint_dir("v0003"))  # its base still loads beside it


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_trains_only_the_adapter_and_publishes_it(
    hf_env: Env, hf_checkpoint: Path, algorithm: str
) -> None:
    simulation(hf_env, IncludeWord("little"), requests_per_batch=8).serve_events(24)
    config = fast_config(
        hf_env.root, algorithm=algorithm, gate_max_perplexity_ratio_live=10.0, lora_rank=4
    )
    trainer = Trainer(config, hf_env.store, hf_env.registry, log=lambda _: None)
    result = trainer.run_round()

    assert result.outcome == "published", result.reason
    manifest = hf_env.registry.manifest(result.version)
    assert manifest.architecture == "hf-causal-lm-lora"
    summary = manifest.training_summary
    assert summary["update_steps"] > 0 and summary["corrections"] > 0  # RL and SFT both ran
    assert summary["logprob_mismatch_max"] < 1e-5
    # The policy the trainer trained and gated (cached) is the one published: the adapter
    # over the untouched base.
    trained = trainer.policy(result.version)
    assert isinstance(trained, LoRAPolicy)
    base, _ = load_base(hf_checkpoint)
    frozen = {k: v for k, v in trained.model.state_dict().items() if ".lora_" not in k}
    own = base.model.state_dict()
    assert all(torch.equal(v, own[k.replace(".base_layer", "")]) for k, v in frozen.items())
    moved = [v.abs().max().item() for k, v in trained.model.state_dict().items() if "lora_B" in k]
    assert max(moved) > 0  # the update trained the adapter
    published, _ = load_checkpoint(hf_env.registry.checkpoint_dir(result.version))
    request = [SampleRequest(base.encode_prompt("ocean"), PARAMS, 2)]
    assert published.sample(request) == trained.eval().sample(request)


def test_a_round_over_a_live_adapter_publishes_the_next_adapter_over_the_same_base(
    hf_env: Env, hf_checkpoint: Path
) -> None:
    simulation(hf_env, IncludeWord("little"), requests_per_batch=8).serve_events(24)
    config = fast_config(hf_env.root, gate_max_perplexity_ratio_live=10.0, lora_rank=4)
    first = Trainer(config, hf_env.store, hf_env.registry, log=lambda _: None).run_round()
    assert first.outcome == "published", first.reason
    simulation(hf_env, IncludeWord("little"), requests_per_batch=8, seed=1).serve_events(24)
    # A new trainer: the live adapter is loaded from the registry, over its base beside it.
    second = Trainer(config, hf_env.store, hf_env.registry, log=lambda _: None).run_round()
    assert second.outcome == "published", second.reason
    digests = {
        hf_env.registry.manifest(v).hyperparameters["base_digest"]
        for v in (first.version, second.version)
    }
    assert digests == {base_digest(read_manifest(hf_checkpoint).files)}


class _Pipe:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...]) -> None:
        self.sent.append(message)


def test_the_model_process_swaps_adapters_over_one_resident_base(
    registry: DirectoryRegistry,
    tmp_path: Path,
    hf_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_adapter(hf_checkpoint, tmp_path / "second", seed=2)
    registry.publish(tmp_path / "second")  # v0003
    reads: list[Path] = []
    load_model = hf_files.load_model
    monkeypatch.setattr(hf_files, "load_model", lambda d: reads.append(d) or load_model(d))
    pipe = _Pipe()
    models = _Models(pipe)  # type: ignore[arg-type]
    for call, version in enumerate(["v0002", "v0003", "v0001"]):
        models.load(call, version, str(registry.checkpoint_dir(version)))
    assert [m[1] for m in pipe.sent] == [OK, OK, OK]
    assert reads == [registry.checkpoint_dir("v0001")]  # the base was read once, for v0002
    embedding = [models.policies[v].model.transformer.wte.weight for v in ("v0002", "v0003")]
    assert embedding[0] is embedding[1]
    request = [SampleRequest(models.policies["v0001"].encode_prompt("ocean"), PARAMS, 2)]
    outputs = {v: models.policies[v].sample(request)[0] for v in ("v0001", "v0002", "v0003")}
    assert len({str(o) for o in outputs.values()}) == 3  # three policies, one base

    # A refused adapter leaves every loaded version serving.
    bad = registry.root / "versions" / "v0009"
    shutil.copytree(registry.checkpoint_dir("v0003"), bad)
    _rewrite_manifest(bad, _other_digest)
    models.load(9, "v0009", str(bad))
    assert pipe.sent[-1][1] == REFUSED and "this replica's base is" in pipe.sent[-1][2]
    assert sorted(models.policies) == ["v0001", "v0002", "v0003"]

    # The base stays resident while any loaded version uses it, and goes with the last.
    (digest,) = models.bases
    for version in ("v0001", "v0002"):
        models.policies.pop(version)
        models.drop_unused_bases()
        assert list(models.bases) == [digest]  # v0003, an adapter, still names it
    models.policies.pop("v0003")
    models.drop_unused_bases()
    assert models.bases == {}
    models.load(10, "v0001", str(registry.checkpoint_dir("v0001")))  # the full version alone
    models.drop_unused_bases()
    assert list(models.bases) == [digest]


def test_a_postgresql_registry_stores_an_adapter_beside_its_base_and_keeps_the_base(
    tmp_path: Path, hf_checkpoint: Path
) -> None:
    from pg_support import fresh_schema, require_postgres, schema_url

    from feedloop.core.registry.postgres import PostgresRegistry

    require_postgres()
    make_adapter(hf_checkpoint, tmp_path / "adapter")
    make_adapter(hf_checkpoint, tmp_path / "second", seed=2)
    with fresh_schema("lora") as schema:
        registry = PostgresRegistry(schema_url(schema), cache_dir=tmp_path / "cache")
        try:
            with pytest.raises(RegistryError, match="publish its base"):
                registry.publish(tmp_path / "adapter")
            registry.publish(hf_checkpoint, make_live=True)
            registry.publish(tmp_path / "adapter", make_live=True)
            registry.publish(tmp_path / "second", make_live=True)
            plan = registry.prune(RetentionPolicy(keep_last=1, keep_best=0, keep_rollback=0))
            assert plan.keep == {"v0001": ("base",), "v0003": ("live", "reference", "last")}
            # A fresh cache: the adapter's folder comes with its base beside it.
            shutil.rmtree(tmp_path / "cache", ignore_errors=True)
            policy, _ = load_checkpoint(registry.checkpoint_dir("v0003"))
            assert isinstance(policy, LoRAPolicy)
        finally:
            registry.close()


def test_lora_refuses_a_bad_spec_and_a_policy_that_is_no_hf_model(tiny_checkpoint: Path) -> None:
    from feedloop.core.hf_lora import adapt

    for rank, alpha, targets, message in [
        (0, 8, ("c_attn",), "lora rank must be an integer >= 1, got 0"),
        (4, 0, ("c_attn",), "lora alpha must be an integer >= 1, got 0"),
        (4, 8, (), "lora targets must be module names"),
        (4, 8, ("h.0/c_attn",), "lora targets must be module names"),
    ]:
        with pytest.raises(ValueError, match=message):
            LoRASpec(rank, alpha, targets)
    gru, _ = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="lora_rank needs an hf-causal-lm policy; the live"):
        adapt(gru, "0" * 64, 4, 8)

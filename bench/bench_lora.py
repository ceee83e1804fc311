"""Benchmark a LoRA adapter publication against a full checkpoint of the same HF model: bytes
published and the server's swap time.

    .venv/bin/python bench/bench_lora.py [--width 64 --layers 2]

The model is the tiny GPT-2 `feedloop pretrain --architecture hf-causal-lm` builds (its default
sizes; --width/--layers make a larger one), with random weights (sizes and times do not depend
on what the weights learned). One registry receives the base (v0001, live), `--swaps` full
checkpoints of the model with different weights (what a full fine-tune publishes every round)
and `--swaps` adapters of rank `--rank` over the base (what `--lora-rank` publishes). The bytes
of a publication are the files of its version's folder in the registry, manifest included.

A swap is what the server's watcher does on a new live version: the model process
(server/model_process.py, started by its client as in `feedloop serve`) reads the version,
verifies every checksum and tensor, loads it and warms it up with one sample call; the time is
the client's `load` call, end to end. The base stays resident after v0001 is loaded, so an
adapter swap reads only the adapter. Full and adapter swaps alternate, each version evicted
after its swap, and the first of each kind is left out of the figures (it pays the one-time
imports of transformers and peft). The same loads are then timed in this process without the
pipe and the warm-up (`load_s_*`: read, verify, load alone), and each kind samples the same 8
prompts x 4 candidates (`sample_s_per_token_*`: seconds per token drawn; an adapter is served
unmerged, its base shared, so every token pays its extra matmuls). Figures: medians over the
swaps, and their ratios, in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from feedloop.core.checkpoint import base_digest, load_checkpoint, save_checkpoint
from feedloop.core.corpus import load_phrases
from feedloop.core.hf_build import TinyGPTConfig, tiny_policy
from feedloop.core.hf_lora import LoRASpec, attach, default_targets
from feedloop.core.hf_policy import HFCausalPolicy
from feedloop.core.policy import SampleRequest
from feedloop.core.registry import DirectoryRegistry
from feedloop.core.sampling import SamplingParams
from feedloop.server.metrics import ServerMetrics
from feedloop.server.model_client import ModelProcessClient


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def perturbed(policy: HFCausalPolicy, seed: int) -> HFCausalPolicy:
    """policy with every weight moved a little: a full fine-tune's next publication."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(1e-3 * torch.randn(parameter.shape, generator=generator))
    return policy


def publish_versions(root: Path, args: argparse.Namespace) -> tuple[DirectoryRegistry, dict]:
    config = TinyGPTConfig(width=args.width, layers=args.layers, heads=max(1, args.width // 16))
    policy = tiny_policy(load_phrases()[:2000], config)
    save_checkpoint(policy, root / "base", version="base")
    registry = DirectoryRegistry(root / "registry")
    registry.publish(root / "base", make_live=True)
    base, manifest = load_checkpoint(root / "base")
    assert isinstance(base, HFCausalPolicy)
    digest = base_digest(manifest.files)
    spec = LoRASpec(args.rank, 2 * args.rank, default_targets(base.model))
    full, adapters, publish_s = [], [], {"full": [], "adapter": []}
    for i in range(args.swaps + 1):
        staging = root / f"full-{i}"
        save_checkpoint(perturbed(base, i), staging, version="full", parent_version="v0001")
        started = time.perf_counter()
        full.append(registry.publish(staging))
        publish_s["full"].append(time.perf_counter() - started)
    base, _ = load_checkpoint(root / "base")
    assert isinstance(base, HFCausalPolicy)
    for i in range(args.swaps + 1):
        adapted = attach(base, spec, digest, share_base=True)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, parameter in adapted.model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
        staging = root / f"adapter-{i}"
        save_checkpoint(adapted, staging, version="adapter", parent_version="v0001")
        started = time.perf_counter()
        adapters.append(registry.publish(staging))
        publish_s["adapter"].append(time.perf_counter() - started)
    facts = {
        "parameters": base.parameter_count(),
        "adapter_parameters": sum(t.numel() for t in adapted.adapter_state().values()),
        "targets": list(spec.targets),
        "full_versions": full,
        "adapter_versions": adapters,
        "publish_s": {k: statistics.median(v[1:]) for k, v in publish_s.items()},
    }
    return registry, facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=TinyGPTConfig.width)
    parser.add_argument("--layers", type=int, default=TinyGPTConfig.layers)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=7, help="timed swaps of each kind")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.torch_threads)  # here as in the model process
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        registry, facts = publish_versions(Path(tmp), args)
        full_bytes = [folder_bytes(registry.checkpoint_dir(v)) for v in facts["full_versions"]]
        adapter_bytes = [
            folder_bytes(registry.checkpoint_dir(v)) for v in facts["adapter_versions"]
        ]
        client = ModelProcessClient(ServerMetrics(), torch_threads=args.torch_threads)
        client.start()
        swap_s: dict[str, list[float]] = {"full": [], "adapter": []}
        try:
            client.load("v0001", registry.checkpoint_dir("v0001"))  # the replica's base
            pairs = zip(facts["full_versions"], facts["adapter_versions"], strict=True)
            for full, adapter in pairs:
                for kind, version in (("full", full), ("adapter", adapter)):
                    started = time.perf_counter()
                    client.load(version, registry.checkpoint_dir(version))
                    swap_s[kind].append(time.perf_counter() - started)
                    client.evict(version)
        finally:
            client.stop()
        # The same loads in this process, without the pipe and the warm-up sample: what reading,
        # verifying and loading cost alone (the base resident for the adapters, as there).
        load_s: dict[str, list[float]] = {"full": [], "adapter": []}
        bases: dict[str, object] = {}
        load_checkpoint(registry.checkpoint_dir("v0001"), bases=bases)
        loaded = {}
        for full, adapter in zip(facts["full_versions"], facts["adapter_versions"], strict=True):
            for kind, version in (("full", full), ("adapter", adapter)):
                started = time.perf_counter()
                loaded[kind] = load_checkpoint(registry.checkpoint_dir(version), bases=bases)[0]
                load_s[kind].append(time.perf_counter() - started)
        registry.close()
        # Serving an adapter unmerged (its base is shared) costs its extra matmuls every token.
        prompts = load_phrases()[:8]
        sample_s: dict[str, list[float]] = {"full": [], "adapter": []}
        for repeat in range(args.swaps):
            for kind, policy in loaded.items():
                requests = [
                    SampleRequest(policy.encode_prompt(p), SamplingParams(seed=repeat), 4)
                    for p in prompts
                ]
                started = time.perf_counter()
                outputs = policy.sample(requests)
                seconds = time.perf_counter() - started
                tokens = sum(len(o.token_ids) for row in outputs for o in row)
                sample_s[kind].append(seconds / tokens)
    result = {
        "model": f"GPT-2 width {args.width}, {args.layers} layers",
        "parameters": facts["parameters"],
        "rank": args.rank,
        "targets": facts["targets"],
        "adapter_parameters": facts["adapter_parameters"],
        "publish_bytes_full": statistics.median(full_bytes),
        "publish_bytes_adapter": statistics.median(adapter_bytes),
        "publish_bytes_ratio": statistics.median(full_bytes) / statistics.median(adapter_bytes),
        "publish_s_full": facts["publish_s"]["full"],
        "publish_s_adapter": facts["publish_s"]["adapter"],
        "swap_s_full_median": statistics.median(swap_s["full"][1:]),
        "swap_s_adapter_median": statistics.median(swap_s["adapter"][1:]),
        "swap_s_first": {k: v[0] for k, v in swap_s.items()},
        "load_s_full_median": statistics.median(load_s["full"][1:]),
        "load_s_adapter_median": statistics.median(load_s["adapter"][1:]),
        "sample_s_per_token_full_median": statistics.median(sample_s["full"]),
        "sample_s_per_token_adapter_median": statistics.median(sample_s["adapter"]),
        "swaps": args.swaps,
    }
    result["swap_ratio"] = result["swap_s_full_median"] / result["swap_s_adapter_median"]
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

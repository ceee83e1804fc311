"""The soak's log-prob mismatch (bench/hf_mismatch.py --store, `soak.py --logprob-mismatch`):
every generation in a store recomputed under the weights of the version that served it."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from feedloop.core.checkpoint import load_checkpoint, save_checkpoint
from feedloop.core.policy import SampleRequest
from feedloop.core.registry import DirectoryRegistry
from feedloop.core.sampling import SamplingParams
from feedloop.core.store import open_store
from feedloop.core.store.base import GenerationRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # a script's folder
from hf_mismatch import store_mismatch


def served(policy, version: str, seed: int) -> list[GenerationRecord]:
    params = SamplingParams(temperature=0.8, top_k=40, max_tokens=6, seed=seed)
    prompt_ids = policy.encode_prompt("ocean sunrise")
    samples = policy.sample([SampleRequest(prompt_ids, params, 3)])[0]
    return GenerationRecord.from_samples(
        samples,
        generation_ids=[f"{version}-{seed}-{i}" for i in range(3)],
        texts=[policy.decode(s.phrase_ids) for s in samples],
        request_id=f"{version}-{seed}",
        prompt="ocean sunrise",
        prompt_ids=prompt_ids,
        params=params,
        model_version=version,
        client_id="test",
        created_at=1.0,
    )


def test_each_generation_is_recomputed_under_the_version_that_served_it(hf_checkpoint, tmp_path):
    first, _ = load_checkpoint(hf_checkpoint)
    second = copy.deepcopy(first)
    with torch.no_grad():  # a swap to other weights: v0001's log-probs no longer fit v0002
        for p in second.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(second, tmp_path / "second", version="second")
    registry = DirectoryRegistry(tmp_path / "registry")
    v1 = registry.publish(hf_checkpoint, make_live=True)
    v2 = registry.publish(tmp_path / "second", make_live=True)
    registry.close()
    location = str(tmp_path / "replay.sqlite3")
    store = open_store(location)
    records = served(first, v1, 1) + served(second, v2, 2)
    store.append_generations(records)
    store.close()

    figures = store_mismatch(location, tmp_path / "registry")
    assert figures["generations"] == 6
    assert figures["tokens"] == sum(len(r.output_ids) for r in records)
    assert set(figures["versions"]) == {v1, v2}
    assert figures["max"] < 1e-5

    # One logged log-prob off by 1e-3: the figure shows it (the soak fails above 1e-5).
    store = open_store(location)
    wrong = served(second, v2, 3)
    wrong[0].behaviour_logprobs[0] -= 1e-3
    store.append_generations(wrong)
    store.close()
    figures = store_mismatch(location, tmp_path / "registry")
    assert figures["max"] == pytest.approx(1e-3, rel=1e-2)
    assert figures["versions"][v1]["max"] < 1e-5

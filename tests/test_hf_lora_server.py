"""A real server swaps from the tiny HF base to a LoRA adapter over it under concurrent load:
no request fails, the log-probs it logs under the adapter are the trainer's recompute, and a
pickled adapter is refused by name while the adapter live before keeps serving."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from hf_support import make_adapter
from server_harness import running_server, seeded_registry, test_config, wait_until

pytest.importorskip("peft")

from feedloop.core.checkpoint import MANIFEST, load_checkpoint
from feedloop.core.hf_lora import ADAPTER, LoRAPolicy
from feedloop.core.sampling import SamplingParams
from feedloop.trainer.mismatch import token_gaps
from feedloop.v1 import feedloop_pb2 as pb


def pickled_copy(adapter: Path, target: Path) -> Path:
    """The adapter with its weights under a pickle's name (the manifest's checksums still hold)."""
    target.mkdir()
    manifest = json.loads((adapter / MANIFEST).read_text())
    for name in manifest["files"]:
        (target / (name if name != ADAPTER else "adapter_model.bin")).write_bytes(
            (adapter / name).read_bytes()
        )
    manifest["files"]["adapter_model.bin"] = manifest["files"].pop(ADAPTER)
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


async def test_an_adapter_is_swapped_in_under_load_with_exact_log_probs(
    tmp_path: Path, hf_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", hf_checkpoint)
    make_adapter(hf_checkpoint, tmp_path / "adapter")
    versions_seen: list[str] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()
    async with running_server(test_config(tmp_path), registry=registry) as live:

        async def client(i: int) -> None:
            while not stop.is_set():
                sampling = pb.SamplingParams(max_tokens=8, temperature=0.9, top_k=50, seed=i + 1)
                try:
                    reply = await live.generation.Generate(
                        pb.GenerateRequest(
                            prompt=f"ocean {i}", num_candidates=2, sampling=sampling
                        ),
                        timeout=30,
                    )
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc)
                    continue
                versions_seen.append(reply.model_version)

        clients = [asyncio.ensure_future(client(i)) for i in range(8)]
        await wait_until(lambda: len(versions_seen) >= 16, timeout_s=60)
        await asyncio.to_thread(registry.publish, tmp_path / "adapter", make_live=True)
        await wait_until(lambda: versions_seen[-16:].count("v0002") == 16, timeout_s=60)

        # A pickled adapter: refused by name, the adapter live before keeps serving.
        bad = pickled_copy(registry.checkpoint_dir("v0002"), tmp_path / "pickled")
        await asyncio.to_thread(registry.publish, bad, make_live=True)
        await wait_until(lambda: live.server.metrics.tallies.swaps_refused == 1, timeout_s=60)
        served = len(versions_seen)
        await wait_until(lambda: len(versions_seen) >= served + 8, timeout_s=60)
        stop.set()
        await asyncio.gather(*clients)
        assert failures == []
        assert set(versions_seen) == {"v0001", "v0002"}
        assert versions_seen[-8:] == ["v0002"] * 8
        refused = [d for d in registry.history() if d.action == "refused"]
        assert refused[0].version == "v0003"
        assert "pickled adapter weights; feedloop never unpickles" in refused[0].reason
        await wait_until(lambda: live.server.generation_log.depth == 0)
        logged = [g for g in live.store.generations_after(0, 100_000) if g.model_version == "v0002"]

    # What the model process logged under the adapter is the trainer's recompute, per token.
    policy, _ = load_checkpoint(registry.checkpoint_dir("v0002"))
    assert isinstance(policy, LoRAPolicy)
    recomputed = policy.score(
        [g.prompt_ids for g in logged],
        [g.output_ids for g in logged],
        [SamplingParams.from_dict(g.sampling) for g in logged],
    )
    gaps = token_gaps([g.behaviour_logprobs for g in logged], recomputed)
    assert len(gaps) > 50 and max(gaps) < 1e-5
    registry.close()

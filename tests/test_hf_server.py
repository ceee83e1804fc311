"""The server and trainer end to end on the tiny Hugging Face policy: a real server samples it
in its model process, logs exact behaviour log-probs, takes feedback; one trainer round
publishes a candidate, the server swaps to it; a bad HF checkpoint is refused by name while
the live version keeps serving."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from server_harness import rating, running_server, seeded_registry, test_config, wait_until
from trainer_support import fast_config, one_torch_thread

pytest.importorskip("transformers")

from feedloop.core.checkpoint import MANIFEST, load_checkpoint, sha256_of
from feedloop.core.registry import DirectoryRegistry
from feedloop.core.sampling import SamplingParams
from feedloop.core.store import open_store
from feedloop.trainer.loop import Trainer
from feedloop.trainer.mismatch import token_gaps
from feedloop.v1 import feedloop_pb2 as pb

__all__ = ["one_torch_thread"]
PROMPTS = ["ocean", "morning coffee", "garden walk", "winter"]


async def test_a_real_server_serves_the_hf_policy_and_swaps_to_what_the_trainer_publishes(
    tmp_path: Path, hf_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", hf_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as live:
        for i in range(12):
            sampling = pb.SamplingParams(max_tokens=8, temperature=0.9, top_k=50, seed=i + 1)
            reply = await live.generation.Generate(
                pb.GenerateRequest(prompt=PROMPTS[i % 4], num_candidates=2, sampling=sampling),
                timeout=30,
            )
            assert reply.model_version == "v0001" and len(reply.candidates) == 2
        await wait_until(lambda: live.server.generation_log.depth == 0)
        logged = live.store.generations_after(0, 1000)
        assert len(logged) == 24

        # What the model process logged is the trainer's recompute, token for token.
        policy, _ = load_checkpoint(hf_checkpoint)
        recomputed = policy.score(
            [g.prompt_ids for g in logged],
            [g.output_ids for g in logged],
            [SamplingParams.from_dict(g.sampling) for g in logged],
        )
        gaps = token_gaps([g.behaviour_logprobs for g in logged], recomputed)
        assert gaps and max(gaps) < 1e-5
        assert logged[0].text == policy.decode(logged[0].output_ids)

        for n, g in enumerate(logged):
            ack = await live.feedback.Submit(
                rating(f"e{n}", g.generation_id, 1.0 if n % 2 else 0.0), timeout=10
            )
            assert ack.outcome == pb.FEEDBACK_OUTCOME_ACCEPTED

        store = open_store(str(tmp_path / "replay.sqlite3"))
        trainer_registry = DirectoryRegistry(tmp_path / "registry")
        try:
            config = fast_config(tmp_path, gate_max_perplexity_ratio_live=10.0)
            trainer = Trainer(config, store, trainer_registry, log=lambda _: None)
            result = await asyncio.to_thread(trainer.run_round)
        finally:
            store.close()
            trainer_registry.close()
        assert result.outcome == "published", result.reason
        await wait_until(lambda: live.server.live_version == result.version, timeout_s=60)
        reply = await live.generation.Generate(pb.GenerateRequest(prompt="ocean"), timeout=30)
        assert reply.model_version == result.version


async def test_a_bad_hf_checkpoint_is_refused_by_name_and_the_live_version_keeps_serving(
    tmp_path: Path, hf_checkpoint: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(hf_checkpoint, bad)
    head = load_file(str(bad / "value_head.safetensors"))
    save_file(head, str(bad / "value_head.safetensors"), metadata={"vocab_size": "50257"})
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["files"]["value_head.safetensors"] = sha256_of(bad / "value_head.safetensors")
    (bad / MANIFEST).write_text(json.dumps(manifest))

    registry = seeded_registry(tmp_path / "registry", hf_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as live:
        version = await asyncio.to_thread(registry.publish, bad, reason="bad", make_live=True)
        await wait_until(lambda: live.server.metrics.tallies.swaps_refused == 1, timeout_s=60)
        reply = await live.generation.Generate(pb.GenerateRequest(prompt="still"), timeout=30)
        assert reply.model_version == "v0001"
        refused = [d for d in registry.history() if d.action == "refused"]
        assert refused and refused[0].version == version
        assert "vocabulary mismatch" in refused[0].reason


def test_feedloop_serve_policy_serves_a_users_own_hf_model_directory(tmp_path: Path) -> None:
    """`feedloop serve --policy DIR` on a directory as save_pretrained leaves it: imported with
    the declared prompt template, published as v0001, served."""
    import grpc
    from hf_support import build_user_model
    from server_harness import serve_args, serve_process

    from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

    model = build_user_model(tmp_path / "my-model")
    template = "Keywords: {keywords}. Phrase:"
    args = serve_args(tmp_path / "data", "--policy", str(model), "--prompt-template", template)
    with (
        serve_process(args, timeout_s=120) as proc,
        grpc.insecure_channel(proc.grpc_address) as channel,
    ):
        assert proc.live == "v0001"
        generation = pb_grpc.GenerationStub(channel)
        reply = generation.Generate(
            pb.GenerateRequest(prompt="ocean", num_candidates=3), timeout=60
        )
        assert reply.model_version == "v0001" and len(reply.candidates) == 3
    registry = DirectoryRegistry(tmp_path / "data" / "registry")
    try:
        manifest = registry.manifest("v0001")
    finally:
        registry.close()
    assert manifest.architecture == "hf-causal-lm"
    assert manifest.hyperparameters["prompt_template"] == template


def test_serve_policy_refuses_a_directory_that_is_no_model(tmp_path: Path) -> None:
    from feedloop.server.app import StartupError, seed_registry

    (tmp_path / "empty").mkdir()
    registry = DirectoryRegistry(tmp_path / "registry")
    try:
        with pytest.raises(StartupError, match="neither a feedloop checkpoint"):
            seed_registry(registry, tmp_path, "here", tmp_path / "empty")
        assert registry.versions() == []
    finally:
        registry.close()

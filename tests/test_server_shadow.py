"""Shadow trials: a version scores live traffic, exactly as it would have sampled it, and serves
none of it."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from server_harness import running_server, seeded_registry, test_config, wait_until
from store_support import generation

from feedloop.core.checkpoint import load_checkpoint, save_checkpoint
from feedloop.core.sampling import SamplingParams
from feedloop.core.store import GenerationRecord
from feedloop.core.store.sqlite import SQLiteStore
from feedloop.server.errors import Unavailable
from feedloop.server.metrics import ServerMetrics
from feedloop.server.shadow import ShadowScorer
from feedloop.v1 import feedloop_pb2 as pb

SAMPLINGS = [
    pb.SamplingParams(),
    pb.SamplingParams(temperature=0.7, top_k=5),
    pb.SamplingParams(top_p=0.9, max_tokens=6),
    pb.SamplingParams(temperature=1.4, top_k=12, top_p=0.95),
]


@pytest.fixture(scope="module")
def other_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny policy with its output layer shifted: a version whose scores differ from live's."""
    policy, _ = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        noise = torch.randn(policy.output.bias.shape, generator=torch.Generator().manual_seed(5))
        policy.output.bias.add_(noise)
    directory = tmp_path_factory.mktemp("other") / "checkpoint"
    save_checkpoint(policy, directory, version="other")
    return directory


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path, other_checkpoint: Path):
    """v0001 live, v0002 (a different policy) published."""
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    registry.publish(other_checkpoint, reason="candidate")
    async with running_server(test_config(tmp_path), registry=registry) as r:
        yield r


async def start_shadow(live, share: float) -> None:
    await live.admin.StartTrial(
        pb.StartTrialRequest(version="v0002", mode=pb.TRIAL_MODE_SHADOW, share=share), timeout=10
    )
    await wait_until(lambda: live.server.live_model.shadow, timeout_s=20)


async def generate_many(live, count: int) -> list[pb.GenerateResponse]:
    """count requests of 1 to 3 candidates each, with several sampling parameters."""

    async def one(i: int) -> pb.GenerateResponse:
        request = pb.GenerateRequest(
            prompt=f"shadow {i % 5}", num_candidates=1 + i % 3, sampling=SAMPLINGS[i % 4]
        )
        return await live.generation.Generate(request, timeout=20)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def scored(live) -> float:
    return live.server.metrics.shadow_scored._value.get()


async def settled(live) -> None:
    """Every reply's records offered to the scorer, scored or dropped, and logged."""
    server = live.server
    await wait_until(lambda: server.batcher._unfinished == 0)
    await wait_until(lambda: server.shadow_scorer.depth == 0)
    await wait_until(lambda: server.generation_log.depth == 0)


def ids_of(replies: list[pb.GenerateResponse]) -> list[str]:
    return [c.generation_id for r in replies for c in r.candidates]


async def test_every_live_generation_gets_the_shadow_versions_own_score(
    live, other_checkpoint: Path
) -> None:
    await start_shadow(live, 1.0)
    replies = await generate_many(live, 24)
    pinned = await live.generation.Generate(
        pb.GenerateRequest(prompt="pinned", model_version="v0001"), timeout=10
    )
    ids = ids_of(replies)
    await wait_until(lambda: scored(live) >= len(ids), timeout_s=20)
    await settled(live)

    assert {(r.model_version, r.served_as) for r in replies} == {("v0001", "live")}
    store = live.server.store
    records = store.get_generations(ids)
    scores = store.shadow_scores("v0002", [*ids, pinned.candidates[0].generation_id])
    assert set(scores) == set(ids)  # every live generation, and not the pinned one
    shadow_policy, _ = load_checkpoint(other_checkpoint)
    ordered = [records[gid] for gid in ids]
    expected = shadow_policy.score(
        [r.prompt_ids for r in ordered],
        [r.output_ids for r in ordered],
        [SamplingParams.from_dict(r.sampling) for r in ordered],
    )
    for record, own in zip(ordered, expected, strict=True):
        score = scores[record.generation_id]
        assert score.version == "v0002"
        assert score.logprobs == pytest.approx(own, abs=1e-5)
    # The replies carry live's log-probabilities, never the shadow's.
    candidates = {c.generation_id: c for r in replies for c in r.candidates}
    for gid in ids:
        assert candidates[gid].log_prob == pytest.approx(sum(records[gid].behaviour_logprobs))
    assert any(
        abs(scores[gid].logprob - sum(records[gid].behaviour_logprobs)) > 1e-3 for gid in ids
    )


async def test_a_request_pinned_to_the_shadow_version_is_refused(live) -> None:
    await start_shadow(live, 1.0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(
            pb.GenerateRequest(prompt="pinned", model_version="v0002"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "shadow" in (err.value.details() or "")


async def test_a_shadow_share_of_zero_scores_nothing(live) -> None:
    await start_shadow(live, 0.0)
    replies = await generate_many(live, 12)
    await settled(live)
    assert scored(live) == 0
    assert live.server.store.shadow_scores("v0002", ids_of(replies)) == {}


async def test_a_shadow_share_scores_about_that_share_of_requests(live) -> None:
    await start_shadow(live, 0.3)
    replies = await generate_many(live, 300)
    await settled(live)
    scores = live.server.store.shadow_scores("v0002", ids_of(replies))
    sampled = [r for r in replies if r.candidates[0].generation_id in scores]
    # A request is scored whole or not at all.
    assert all(c.generation_id in scores for r in sampled for c in r.candidates)
    share = len(sampled) / len(replies)
    assert scored(live) == len(scores)  # none dropped
    assert 0.2 < share < 0.4  # binomial sd 0.026 at n=300: about 4 sd each way


async def test_ending_the_trial_stops_scoring(live) -> None:
    await start_shadow(live, 1.0)
    before = await generate_many(live, 6)
    await wait_until(lambda: scored(live) >= len(ids_of(before)), timeout_s=20)
    await live.admin.EndTrial(pb.EndTrialRequest(promote=False), timeout=10)
    await wait_until(lambda: live.server.live_model.shadow is None)
    after = await generate_many(live, 6)
    await settled(live)
    store = live.server.store
    assert len(store.shadow_scores("v0002", ids_of(before))) == len(ids_of(before))
    assert store.shadow_scores("v0002", ids_of(after)) == {}
    assert {(r.model_version, r.served_as) for r in after} == {("v0001", "live")}


class StuckModelClient:
    """A model process that takes every score call and answers none until released."""

    def __init__(self) -> None:
        self.calls: list[Future[Any]] = []
        self.called = threading.Event()

    def score(self, version: str, prompts: Any, outputs: Any, params: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.calls.append(future)
        self.called.set()
        return future


def requests_of(count: int, candidates: int) -> list[GenerationRecord]:
    """Live generations of `count` requests with `candidates` each."""
    return [
        dataclasses.replace(generation(f"{tag}-{c}"), request_id=tag)
        for tag in (uuid.uuid4().hex for _ in range(count))
        for c in range(candidates)
    ]


def test_a_full_shadow_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    metrics = ServerMetrics()
    model_client = StuckModelClient()
    shadow = SimpleNamespace(model=SimpleNamespace(version="v0002"), samples=lambda: True)
    store = SQLiteStore(tmp_path / "replay.db")
    scorer = ShadowScorer(
        SimpleNamespace(shadow=shadow),  # type: ignore[arg-type]
        model_client,  # type: ignore[arg-type]
        store,
        metrics,
        capacity=4,
        batch_max=100,
    )
    try:
        scorer.offer(requests_of(1, 2))  # taken at once: the call that never answers
        assert model_client.called.wait(5)
        scorer.offer(requests_of(3, 1))  # two fit beside it (4 rows), the third does not
        dropped = metrics.shadow_dropped.labels("queue_full")
        assert scorer.depth == 4 and dropped._value.get() == 1
        scorer.offer(requests_of(1, 2))  # still full
        assert scorer.depth == 4 and dropped._value.get() == 3
        model_client.calls[0].set_exception(Unavailable("the model process exited; retry"))
        failed = metrics.shadow_dropped.labels("model_failed")
        deadline = time.monotonic() + 5
        while failed._value.get() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert failed._value.get() == 2  # that batch is lost, counted; the queue moves on
    finally:
        for call in model_client.calls:
            if not call.done():
                call.set_exception(Unavailable("stopping"))
        scorer.stop()
        store.close()

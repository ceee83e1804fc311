"""Generate through a real server: batching, logging, seeds, pins, limits and back-pressure."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
from server_harness import flood_generate, running_server, seeded_registry, test_config, wait_until

from feedloop.core.policy import SampledOutput
from feedloop.core.sampling import SamplingParams
from feedloop.core.store import open_store
from feedloop.core.store.base import GenerationRecord
from feedloop.core.tokenizer import EOS_ID
from feedloop.v1 import feedloop_pb2 as pb


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        yield running


async def test_generate_returns_candidates_named_by_one_version_and_logs_each(live) -> None:
    reply = await live.generation.Generate(
        pb.GenerateRequest(
            prompt="ocean sunrise", num_candidates=3, sampling=pb.SamplingParams(max_tokens=6)
        ),
        timeout=10,
    )
    assert reply.model_version == "v0001"
    assert reply.request_id and reply.seed != 0
    assert len(reply.candidates) == 3
    ids = [c.generation_id for c in reply.candidates]
    assert len(set(ids)) == 3
    for c in reply.candidates:
        assert len(c.tokens) <= 6 and (c.tokens or c.finished)
        assert c.log_prob <= 0.0
    await wait_until(lambda: live.server.generation_log.depth == 0)
    stored = live.store.get_generations(ids)
    assert set(stored) == set(ids)
    for index, c in enumerate(reply.candidates):
        record = stored[c.generation_id]
        assert record.request_id == reply.request_id
        assert record.prompt == "ocean sunrise"
        assert record.model_version == "v0001"
        assert record.client_id == "anonymous"
        assert record.candidate_index == index and record.num_candidates == 3
        assert record.sampling["seed"] == reply.seed
        assert len(record.behaviour_logprobs) == len(record.output_ids)
        assert len(record.policy_logprobs) == len(record.output_ids)
        assert c.log_prob == pytest.approx(sum(record.behaviour_logprobs))
        assert record.text == c.text


async def test_the_log_holds_the_requests_sampling_parameters_with_defaults_and_seed_resolved(
    live,
) -> None:
    reply = await live.generation.Generate(
        pb.GenerateRequest(
            prompt="ocean", sampling=pb.SamplingParams(temperature=0.5, top_k=7, top_p=0.75)
        ),
        timeout=10,
    )
    await wait_until(lambda: live.server.generation_log.depth == 0)
    (record,) = live.store.get_generations([reply.candidates[0].generation_id]).values()
    assert SamplingParams.from_dict(record.sampling) == SamplingParams(
        temperature=0.5,
        top_k=7,
        top_p=0.75,
        max_tokens=live.server.config.default_max_tokens,
        seed=reply.seed,
    )


def test_records_carry_each_samples_tokens_and_both_logprobs_in_order() -> None:
    samples = [
        SampledOutput([5, 6, EOS_ID], [-0.5, -0.25, -0.125], [-0.75, -0.5, -0.25], True),
        SampledOutput([7, 8], [-1.0, -2.0], [-1.5, -2.5], False),
    ]
    params = SamplingParams(temperature=0.8, top_k=3, max_tokens=2, seed=99)
    records = GenerationRecord.from_samples(
        samples,
        generation_ids=["g1", "g2"],
        texts=["a b", "c d"],
        request_id="r1",
        prompt="ocean",
        prompt_ids=[4],
        params=params,
        model_version="v0007",
        client_id="app",
        created_at=12.5,
    )
    for index, (record, sample) in enumerate(zip(records, samples, strict=True)):
        assert record.output_ids == sample.token_ids and record.finished == sample.finished
        assert record.behaviour_logprobs == sample.behaviour_logprobs
        assert record.policy_logprobs == sample.policy_logprobs
        assert (record.candidate_index, record.num_candidates) == (index, 2)
        assert SamplingParams.from_dict(record.sampling) == params
        assert (record.request_id, record.prompt, record.prompt_ids) == ("r1", "ocean", [4])
        assert (record.model_version, record.client_id, record.created_at) == ("v0007", "app", 12.5)
    assert [(r.generation_id, r.text) for r in records] == [("g1", "a b"), ("g2", "c d")]


async def test_same_seed_gives_same_candidates_alone_or_under_concurrent_load(live) -> None:
    request = pb.GenerateRequest(
        prompt="quiet forest",
        num_candidates=2,
        sampling=pb.SamplingParams(seed=1234, temperature=0.9, top_p=0.9),
    )
    alone = await live.generation.Generate(request, timeout=10)
    others = [
        live.generation.Generate(pb.GenerateRequest(prompt=f"noise {i}"), timeout=10)
        for i in range(20)
    ]
    again, *_ = await asyncio.gather(live.generation.Generate(request, timeout=10), *others)
    assert [c.text for c in again.candidates] == [c.text for c in alone.candidates]
    assert [c.log_prob for c in again.candidates] == pytest.approx(
        [c.log_prob for c in alone.candidates]
    )
    assert again.seed == 1234


async def test_concurrent_requests_are_batched_together(live) -> None:
    replies = await asyncio.gather(
        *[
            live.generation.Generate(pb.GenerateRequest(prompt=f"p {i}"), timeout=10)
            for i in range(48)
        ]
    )
    assert len(replies) == 48
    batches = live.server.metrics.batch_rows.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    assert count < 48  # at least some requests shared a forward pass


async def test_request_id_is_kept_when_given(live) -> None:
    reply = await live.generation.Generate(
        pb.GenerateRequest(prompt="river", request_id="client-req-1"), timeout=10
    )
    assert reply.request_id == "client-req-1"


async def test_pinned_unknown_version_is_not_found_with_a_clear_message(live) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(
            pb.GenerateRequest(prompt="river", model_version="v0999"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "v0999" in err.value.details() and "v0001" in err.value.details()


async def test_pinned_loaded_version_is_served(live) -> None:
    reply = await live.generation.Generate(
        pb.GenerateRequest(prompt="river", model_version="v0001"), timeout=10
    )
    assert reply.model_version == "v0001"


BAD_REQUESTS = [
    ("prompt", pb.GenerateRequest(prompt="")),
    ("prompt", pb.GenerateRequest(prompt="x" * 600)),
    ("prompt", pb.GenerateRequest(prompt="!" * 200)),
    ("prompt", pb.GenerateRequest(prompt="\ufdfa" * 40)),  # 40 characters, 120 words after NFKC
    ("num_candidates", pb.GenerateRequest(prompt="a", num_candidates=9)),
    ("num_candidates", pb.GenerateRequest(prompt="a", num_candidates=-1)),
    (
        "sampling.temperature",
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(temperature=-1.0)),
    ),
    (
        "sampling.temperature",
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(temperature=float("nan"))),
    ),
    ("sampling.top_k", pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(top_k=-2))),
    ("sampling.top_p", pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(top_p=1.5))),
    (
        "sampling.max_tokens",
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(max_tokens=49)),
    ),
    (
        "sampling.max_tokens",
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(max_tokens=-3)),
    ),
    ("request_id", pb.GenerateRequest(prompt="a", request_id="r" * 129)),
    ("end_user", pb.GenerateRequest(prompt="a", end_user="u" * 129)),
    ("end_user", pb.GenerateRequest(prompt="a", end_user="u\x00")),
]


@pytest.mark.parametrize(("field", "request_"), BAD_REQUESTS, ids=[f for f, _ in BAD_REQUESTS])
async def test_invalid_generate_request_names_the_field_and_logs_nothing(
    live, field: str, request_: pb.GenerateRequest
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)
    assert live.server.generation_log.depth == 0
    assert live.store.counts().generations == 0


async def test_full_queue_answers_resource_exhausted(tmp_path: Path, tiny_checkpoint: Path) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, max_queue_size=2, max_batch_size=1)
    async with running_server(config, registry=registry) as running:
        results = await flood_generate(running)
    codes = {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert any(isinstance(r, pb.GenerateResponse) for r in results)


async def test_full_generation_log_answers_unavailable_before_compute(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    store = open_store(str(tmp_path / "replay.sqlite3"))
    gate = asyncio.Event()
    original = store.append_generations
    loop = asyncio.get_running_loop()

    def slow_append(records):  # blocks the writer until the test lets it go
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()
        return original(records)

    store.append_generations = slow_append  # type: ignore[method-assign]
    config = test_config(tmp_path, generation_buffer_size=2)
    async with running_server(config, registry=registry, store=store) as running:
        first = await running.generation.Generate(
            pb.GenerateRequest(prompt="a", num_candidates=2), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.generation.Generate(pb.GenerateRequest(prompt="b"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "generation log is full" in err.value.details()
        gate.set()
        await wait_until(lambda: running.server.generation_log.depth == 0)
        assert set(store.get_generations([c.generation_id for c in first.candidates])) == {
            c.generation_id for c in first.candidates
        }


async def test_expired_deadline_is_dropped_before_compute(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, max_batch_size=1)
    async with running_server(config, registry=registry) as running:
        # Fill the single worker with long requests so the short-deadline one waits in the queue.
        slow = [
            running.generation.Generate(
                pb.GenerateRequest(
                    prompt=f"p {i}",
                    num_candidates=1,
                    sampling=pb.SamplingParams(max_tokens=48, temperature=5.0),
                ),
                timeout=30,
            )
            for i in range(30)
        ]
        hurried = running.generation.Generate(pb.GenerateRequest(prompt="late"), timeout=0.001)
        results = await asyncio.gather(hurried, *slow, return_exceptions=True)
        assert isinstance(results[0], grpc.aio.AioRpcError)
        assert results[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: running.server.generation_log.depth == 0)
        stored = running.store.generations_after(0, 1000)
        assert "late" not in {g.prompt for g in stored}
        assert len(stored) == sum(isinstance(r, pb.GenerateResponse) for r in results)


async def test_cancelled_request_is_dropped_before_compute(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        worker = running.server.model_client
        original = worker.sample
        gate, busy = threading.Event(), threading.Event()

        def held_sample(version, requests):  # the dispatcher stays busy until the gate opens
            busy.set()
            gate.wait(10)
            return original(version, requests)

        worker.sample = held_sample
        try:
            first = running.generation.Generate(pb.GenerateRequest(prompt="first"), timeout=30)
            await wait_until(busy.is_set)
            doomed = running.generation.Generate(pb.GenerateRequest(prompt="doomed"), timeout=30)
            await wait_until(lambda: running.server.batcher.queue_depth == 1)
            doomed.cancel()
            job = running.server.batcher._jobs[0]
            await wait_until(lambda: job.cancelled)
        finally:
            gate.set()
        assert (await first).candidates
        dropped = running.server.metrics.dropped.labels("cancelled")
        await wait_until(lambda: dropped._value.get() == 1)
        await wait_until(lambda: running.server.generation_log.depth == 0)
        prompts = {g.prompt for g in running.store.generations_after(0, 1000)}
        assert prompts == {"first"}

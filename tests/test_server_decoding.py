"""Decoding knobs over gRPC Generate: temperature 0 is greedy (and unset is the default 1.0),
max_tokens leaves the end-of-phrase uncounted, and per-token log-probs come on request."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_harness import running_server, seeded_registry, test_config, wait_until

from feedloop.v1 import feedloop_pb2 as pb


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        yield running


async def generate(live, **fields) -> pb.GenerateResponse:
    return await live.generation.Generate(pb.GenerateRequest(**fields), timeout=10)  # type: ignore[no-any-return]


async def records_of(live, reply: pb.GenerateResponse) -> list:
    ids = [c.generation_id for c in reply.candidates]
    await wait_until(lambda: live.server.generation_log.depth == 0)
    stored = live.store.get_generations(ids)
    return [stored[i] for i in ids]


async def test_a_set_temperature_of_zero_decodes_greedily(live) -> None:
    replies = [
        await generate(
            live,
            prompt="quiet night",
            num_candidates=3,
            sampling=pb.SamplingParams(temperature=0.0, seed=seed, max_tokens=10),
        )
        for seed in (11, 12)
    ]
    texts = {c.text for reply in replies for c in reply.candidates}
    assert len(texts) == 1
    for reply in replies:
        for c in reply.candidates:
            assert c.log_prob == 0.0  # a point mass: every behaviour log-prob is 0
        for record in await records_of(live, reply):
            assert record.sampling["temperature"] == 0.0


async def test_an_unset_temperature_is_the_default_and_samples(live) -> None:
    reply = await generate(
        live, prompt="quiet night", num_candidates=8, sampling=pb.SamplingParams(seed=5)
    )
    assert len({tuple(c.tokens) for c in reply.candidates}) > 1
    for record in await records_of(live, reply):
        assert record.sampling["temperature"] == 1.0


async def test_max_tokens_counts_the_phrase_not_its_end(live) -> None:
    reply = await generate(
        live, prompt="ocean", num_candidates=8, sampling=pb.SamplingParams(max_tokens=2, seed=3)
    )
    for c, record in zip(reply.candidates, await records_of(live, reply), strict=True):
        assert len(c.tokens) <= 2
        assert len(record.output_ids) == len(c.tokens) + int(c.finished)


async def test_per_token_logprobs_come_on_request_and_sum_to_log_prob(live) -> None:
    plain = await generate(live, prompt="ocean", num_candidates=2)
    assert all(not c.token_logprobs for c in plain.candidates)
    reply = await generate(
        live,
        prompt="ocean",
        num_candidates=4,
        return_token_logprobs=True,
        sampling=pb.SamplingParams(temperature=0.7, seed=21),
    )
    for c, record in zip(reply.candidates, await records_of(live, reply), strict=True):
        assert len(c.token_logprobs) == len(c.tokens)
        assert list(c.token_logprobs) == pytest.approx(record.behaviour_logprobs[: len(c.tokens)])
        end = record.behaviour_logprobs[-1] if c.finished else 0.0
        assert c.log_prob == pytest.approx(sum(c.token_logprobs) + end)

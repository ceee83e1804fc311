"""Numbers that cannot poison training, and work whose caller has gone (issue 23, findings 3, 8).

- A temperature between 0 and MIN_TEMPERATURE is refused at the edge (1e-38 overflowed float32
  logits into NaN log-probabilities, which were stored); 0 stays greedy.
- A model answer carrying a non-finite log-probability is refused by the server (not served,
  not logged, counted), and the store refuses to keep such a row on both backends.
- The trainer skips a stored row it cannot learn from and says so, instead of aborting.
- A Generate whose caller has gone while the model ran is neither logged nor counted served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from pg_support import fresh_schema, schema_url
from server_harness import running_server, seeded_registry, test_config, wait_until
from store_support import generation, rating

from feedloop.core.errors import InvalidRecordError
from feedloop.core.policy import SampledOutput
from feedloop.core.sampling import (
    MIN_TEMPERATURE,
    InvalidSamplingParams,
    SamplingParams,
    sampling_probs,
)
from feedloop.core.store import open_store
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.data import Cursor, learnable, read_window
from feedloop.v1 import feedloop_pb2 as pb

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "replay.db")
    else:
        with fresh_schema("numbers") as schema:
            yield schema_url(schema)


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        yield running


# -- temperature ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-38, 1e-12, MIN_TEMPERATURE / 2, 0.0099])
def test_a_temperature_between_zero_and_the_bound_is_refused(temperature: float) -> None:
    with pytest.raises(InvalidSamplingParams) as err:
        SamplingParams(temperature=temperature)
    assert err.value.field == "temperature"
    assert "0 (greedy)" in err.value.problem and f"{MIN_TEMPERATURE:g}" in err.value.problem


@pytest.mark.parametrize("temperature", [0.0, MIN_TEMPERATURE, 0.5, 2.0])
def test_zero_and_temperatures_from_the_bound_up_are_accepted(temperature: float) -> None:
    assert SamplingParams(temperature=temperature).temperature == temperature


def test_sampling_at_the_bound_stays_finite_on_large_logits() -> None:
    """At MIN_TEMPERATURE, logits far larger than the policy's give a finite distribution whose
    every token with mass has a finite log-probability."""
    logits = torch.linspace(-80.0, 80.0, 50).repeat(3, 1)
    probs = sampling_probs(
        logits,
        torch.full((3,), MIN_TEMPERATURE),
        torch.tensor([0, 5, 0]),
        torch.tensor([1.0, 1.0, 0.9]),
    )
    assert bool(torch.isfinite(probs).all())
    kept = probs > 0
    assert bool(torch.isfinite(probs[kept].log()).all())
    # Below the bound the same division overflows: what the bound is there to refuse.
    assert not bool(torch.isfinite(logits / 1e-38).all())


async def test_generate_refuses_a_tiny_temperature_naming_the_field(live) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(
            pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(temperature=1e-38)),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("sampling.temperature:")
    assert live.server.metrics.tallies.generations_served == 0


# -- the store and the trainer ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_store_refuses_a_non_finite_log_probability(location: str, bad: float) -> None:
    store = open_store(location)
    try:
        good = generation("good")
        poisoned = dataclasses.replace(generation("poisoned"), behaviour_logprobs=[-0.5, bad])
        with pytest.raises(InvalidRecordError, match="poisoned"):
            store.append_generations([good, poisoned])
        raw = dataclasses.replace(generation("raw"), policy_logprobs=[bad])
        with pytest.raises(InvalidRecordError, match="raw"):
            store.append_generations([raw])
        assert store.get_generations(["good", "poisoned", "raw"]) == {}  # nothing of the batch
        store.append_generations([good])
        assert set(store.get_generations(["good"])) == {"good"}
    finally:
        store.close()


def test_learnable_refuses_non_finite_log_probabilities_and_bad_sampling() -> None:
    assert learnable(generation("g"))
    assert not learnable(dataclasses.replace(generation("g"), behaviour_logprobs=[math.nan]))
    assert not learnable(dataclasses.replace(generation("g"), policy_logprobs=[-math.inf]))
    tiny = {**generation("g").sampling, "temperature": 1e-38}
    assert not learnable(dataclasses.replace(generation("g"), sampling=tiny))


def test_the_trainer_skips_and_reports_rows_an_older_server_stored(tmp_path: Path) -> None:
    """Rows written before the store checked (straight into SQLite here) are skipped with a
    note and a figure; the round's other rows are read as usual."""
    path = tmp_path / "replay.db"
    store = open_store(str(path))
    try:
        store.append_generations([generation("good"), generation("other")])
        store.insert_feedback([rating("e1", "good"), rating("e2", "other")])
    finally:
        store.close()
    with sqlite3.connect(path) as conn:  # what the old server let through
        conn.execute(
            "UPDATE generations SET behaviour_logprobs = '[NaN, -0.5]' "
            "WHERE generation_id = 'other'"
        )
    store = open_store(str(path))
    try:
        config = TrainConfig(join_window_s=0.0, max_data_age_s=1e12, replay_sample_size=0)
        window = read_window(store, Cursor(), config, now=time.time(), live_version="v0001", seed=1)
    finally:
        store.close()
    assert set(window.generations) == {"good"}
    assert window.dropped_unusable == 1
    assert window.figures()["dropped_unusable"] == 1
    assert any("unusable" in note and "other" in note for note in window.notes)


# -- the server's side of the model process ------------------------------------------------------


def _rewrite_samples(live: Any, change: Any, delay_s: float = 0.0) -> None:
    """Make the running server's model answers pass through change(outputs) (after delay_s)."""
    client = live.server.model_client
    original = client.sample

    def sample(version: str, requests: list[Any]) -> Future[Any]:
        inner = original(version, requests)
        outer: Future[Any] = Future()

        def done(f: Future[Any]) -> None:
            outputs, seconds = f.result()
            if delay_s:
                time.sleep(delay_s)
            outer.set_result((change(outputs), seconds))

        inner.add_done_callback(done)
        return outer

    client.sample = sample


def _poison(outputs: list[list[SampledOutput]]) -> list[list[SampledOutput]]:
    return [
        [dataclasses.replace(s, behaviour_logprobs=[math.nan] * len(s.token_ids)) for s in samples]
        for samples in outputs
    ]


async def test_a_non_finite_model_answer_is_neither_served_nor_logged(live) -> None:
    _rewrite_samples(live, _poison)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(pb.GenerateRequest(prompt="hello"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "non-finite" in err.value.details()
    metrics = live.server.metrics
    assert metrics.nonfinite_logprobs._value.get() == 1
    assert metrics.tallies.generations_served == 0
    assert await asyncio.to_thread(live.server.generation_log.flush, 5.0)
    assert live.store.counts().generations == 0


async def test_a_generate_whose_caller_left_while_the_model_ran_is_not_served(live) -> None:
    """Finding 8: with a deadline shorter than the compute, the reply was still logged and
    counted as served, though nobody received it."""
    _rewrite_samples(live, lambda outputs: outputs, delay_s=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(pb.GenerateRequest(prompt="hello"), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    dropped = live.server.metrics.dropped
    await wait_until(
        lambda: (
            dropped.labels("cancelled_after_compute")._value.get()
            + dropped.labels("deadline_after_compute")._value.get()
            == 1
        )
    )
    assert live.server.metrics.tallies.generations_served == 0
    assert await asyncio.to_thread(live.server.generation_log.flush, 5.0)
    assert live.store.counts().generations == 0

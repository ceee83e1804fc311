"""Every gRPC error carries google.rpc details besides its message, read here as a client in any
language would (grpcio-status's from_call): BadRequest names the field at fault, RetryInfo says
how long to wait after back-pressure, ResourceInfo names what was not found; the Python client
exposes them and waits as long as the server asks before retrying."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from server_harness import (
    Running,
    flood_generate,
    rating,
    running_server,
    seeded_registry,
    test_config,
)

from feedloop.client.aio import AsyncFeedloopClient
from feedloop.client.client import FeedloopClient
from feedloop.client.errors import FeedloopClientError, FieldViolation
from feedloop.client.options import RetryPolicy
from feedloop.v1 import feedloop_pb2 as pb


def details(error: grpc.aio.AioRpcError, kind: type[Message]) -> list:
    """The details of one type in the google.rpc.Status that ended a call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status on {error.code()}: {error.details()}"
    assert status.message == error.details()
    found = []
    for detail in status.details:
        message = kind()
        if detail.Unpack(message):
            found.append(message)
    return found


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    return [
        v.field for d in details(error, error_details_pb2.BadRequest) for v in d.field_violations
    ]


def retry_delays_s(error: grpc.aio.AioRpcError) -> list[float]:
    return [
        d.retry_delay.ToNanoseconds() / 1e9 for d in details(error, error_details_pb2.RetryInfo)
    ]


def serving(tmp_path: Path, checkpoint: Path, **config: Any) -> AsyncContextManager[Running]:
    """An in-process server on a seeded registry, with config's settings."""
    registry = seeded_registry(tmp_path / "registry", checkpoint)
    return running_server(test_config(tmp_path, **config), registry=registry)


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    async with serving(tmp_path, tiny_checkpoint) as running:
        yield running


async def generation_id(live) -> str:
    reply = await live.generation.Generate(pb.GenerateRequest(prompt="green hills"), timeout=10)
    return reply.candidates[0].generation_id


@pytest.mark.parametrize(
    ("field", "request_"),
    [
        ("num_candidates", pb.GenerateRequest(prompt="a", num_candidates=9)),
        (
            "sampling.temperature",
            pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(temperature=-1.0)),
        ),
        ("prompt", pb.GenerateRequest(prompt="")),
    ],
)
async def test_a_bad_generate_request_carries_a_bad_request_naming_the_field(
    live, field: str, request_: pb.GenerateRequest
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: ")  # the message stays as it was
    assert violations(err.value) == [field]
    (bad_request,) = details(err.value, error_details_pb2.BadRequest)
    assert err.value.details() == f"{field}: {bad_request.field_violations[0].description}"
    assert retry_delays_s(err.value) == []  # an answer, not back-pressure: no retry invited


async def test_a_bad_feedback_event_carries_a_bad_request_naming_the_field(live) -> None:
    gid = await generation_id(live)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.feedback.Submit(rating("e1", gid, 9.0, pb.RATING_SCALE_THUMBS), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == ["rating.score"]


async def test_a_bad_event_in_a_stream_keeps_its_field_under_the_events_name(live) -> None:
    gid = await generation_id(live)

    async def events() -> AsyncIterator[pb.FeedbackEvent]:
        yield rating("ok", gid)
        yield rating("bad", gid, 9.0)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in live.feedback.SubmitStream(events(), timeout=30):
            pass
    assert err.value.details().startswith("event 'bad': rating.score")
    assert violations(err.value) == ["rating.score"]


async def test_feedback_on_an_unknown_generation_names_the_missing_resource(live) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.feedback.Submit(rating("e1", "never-generated"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    (resource,) = details(err.value, error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == ("generation", "never-generated")


async def test_a_rate_limited_call_says_when_a_token_is_back(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    async with serving(
        tmp_path, tiny_checkpoint, rate_limit_rps=0.1, rate_limit_burst=1
    ) as running:
        await running.generation.Generate(pb.GenerateRequest(prompt="a"), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.generation.Generate(pb.GenerateRequest(prompt="a"), timeout=10)
        sample = running.server.metrics.registry.get_sample_value
        counted = (
            sample("feedloop_rate_limited_total", {"method": "Generate"}),
            sample("feedloop_requests_total", {"method": "Generate", "code": "OK"}),
            sample("feedloop_requests_total", {"method": "Generate", "code": "RESOURCE_EXHAUSTED"}),
        )
    # Counted apart from the calls the server answered: no server error, no page.
    assert counted == (1.0, 1.0, None)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (delay_s,) = retry_delays_s(err.value)
    assert 5.0 < delay_s <= 10.0  # one token a 10 s, the last taken a moment ago
    (info,) = details(err.value, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("RATE_LIMITED", "feedloop")


async def test_a_full_queue_invites_a_retry_after_a_delay(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    async with serving(tmp_path, tiny_checkpoint, max_queue_size=2, max_batch_size=1) as running:
        results = await flood_generate(running)
    refusals = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert refusals and {r.code() for r in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(retry_delays_s(r) == [0.5] for r in refusals)
    assert all(
        [i.reason for i in details(r, error_details_pb2.ErrorInfo)] == ["QUEUE_FULL"]
        for r in refusals
    )


async def test_the_python_client_exposes_the_details(tmp_path: Path, tiny_checkpoint: Path) -> None:
    async with serving(
        tmp_path, tiny_checkpoint, rate_limit_rps=0.01, rate_limit_burst=2
    ) as running:

        def session() -> tuple[FeedloopClientError, FeedloopClientError]:
            with FeedloopClient(f"127.0.0.1:{running.server.grpc_port}") as client:
                with pytest.raises(FeedloopClientError) as bad:
                    client.generate("a", temperature=-1.0)
                client.generate("a")
                with pytest.raises(FeedloopClientError) as limited:
                    client.generate("a")  # the server asks for ~100 s: past the deadline
                return bad.value, limited.value

        bad, limited = await asyncio.to_thread(session)
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.field_violations == (
        FieldViolation("sampling.temperature", bad.message.removeprefix("sampling.temperature: ")),
    )
    assert bad.retry_delay_s is None
    assert limited.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limited.field_violations == ()
    assert limited.retry_delay_s is not None and 90.0 < limited.retry_delay_s <= 100.0


async def test_the_python_client_waits_as_long_as_retry_info_asks_then_succeeds(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    # Backoff alone would retry within 10 ms, into the still-empty bucket.
    quick = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
    async with serving(
        tmp_path, tiny_checkpoint, rate_limit_rps=2.0, rate_limit_burst=1
    ) as running:

        def session() -> tuple[float, str]:
            with FeedloopClient(
                f"127.0.0.1:{running.server.grpc_port}", retry=quick, timeout_s=10.0
            ) as client:
                client.generate("a")
                started = time.monotonic()
                reply = client.generate("a")  # refused at first: the bucket refills in 0.5 s
                return time.monotonic() - started, reply.model_version

        waited_s, version = await asyncio.to_thread(session)
    assert version == "v0001"
    assert 0.4 < waited_s < 5.0


async def test_the_asyncio_client_exposes_the_details_and_waits_as_asked(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    quick = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
    async with (
        serving(tmp_path, tiny_checkpoint, rate_limit_rps=2.0, rate_limit_burst=1) as running,
        AsyncFeedloopClient(f"127.0.0.1:{running.server.grpc_port}", retry=quick) as client,
    ):
        with pytest.raises(FeedloopClientError) as bad:
            await client.generate("a", top_p=1.5)
        started = time.monotonic()
        reply = await client.generate("a")  # the bad call took the token: refused, then served
        waited_s = time.monotonic() - started
    assert bad.value.field_violations[0].field == "sampling.top_p"
    assert reply.model_version == "v0001"
    assert 0.4 < waited_s < 5.0


def test_retries_wait_at_least_the_servers_delay_and_only_where_the_server_invites_them() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)
    unavailable, exhausted = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED
    assert policy.delay_s(1, unavailable, None) <= 0.01
    assert policy.delay_s(1, unavailable, 0.7) == 0.7
    assert policy.delay_s(1, exhausted, 0.7) == 0.7  # a refusal before any work: safe to repeat
    assert policy.delay_s(1, exhausted, None) is None  # a full disk says nothing: an answer
    assert policy.delay_s(3, unavailable, 0.7) is None  # attempts spent


def test_the_pushback_trailer_says_when_any_grpc_client_may_retry() -> None:
    from feedloop.core.errors import StoreFullError, StoreUnavailableError
    from feedloop.server.errors import (
        PUSHBACK_KEY,
        InContext,
        InvalidArgument,
        Overloaded,
        pushback_ms,
        rich_status,
    )

    assert pushback_ms(Overloaded("queue full"), time_remaining_s=10.0) == "500"
    assert pushback_ms(InContext(Overloaded("full"), "event e1"), time_remaining_s=None) == "500"
    # a wait past the caller's deadline: refuse now, with RetryInfo, rather than time out later
    assert pushback_ms(Overloaded("queue full"), time_remaining_s=0.4) == "-1"
    assert pushback_ms(StoreFullError("disk"), time_remaining_s=10.0) == "-1"  # an answer
    assert pushback_ms(StoreUnavailableError("down"), time_remaining_s=10.0) is None  # backoff
    assert pushback_ms(InvalidArgument("prompt", "empty"), time_remaining_s=10.0) is None
    status = rich_status(Overloaded("queue full"), time_remaining_s=10.0)
    assert (PUSHBACK_KEY, "500") in status.trailing_metadata
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert PUSHBACK_KEY not in dict(rich_status(InvalidArgument("p", "x")).trailing_metadata)

"""Operations: auth on and off, rate limit, TLS and mutual TLS, message size, health,
reflection and the metrics scrape (checked by promtool when it is installed)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
from client_tls import make_certificates, openssl_available
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_harness import rating, running_server, seeded_registry, test_config, wait_until

from feedloop.server.app import FeedloopServer, StartupError
from feedloop.server.auth import hash_key
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

KEYS_TOML = f"""
[[keys]]
name = "app"
sha256 = "{hash_key("app-secret")}"
roles = ["generate", "feedback"]

[[keys]]
name = "ops"
key = "ops-secret"
roles = ["admin"]
"""


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def secured(tmp_path: Path, tiny_checkpoint: Path):
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS_TOML)
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, auth_keys_file=keys)
    async with running_server(config, registry=registry) as running:
        yield running


async def test_auth_requires_a_known_key_with_the_methods_role(secured) -> None:
    request = pb.GenerateRequest(prompt="sea")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await secured.generation.Generate(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await secured.generation.Generate(request, metadata=bearer("guess"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await secured.generation.Generate(request, metadata=bearer("ops-secret"), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "generate" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await secured.admin.GetStatus(
            pb.GetStatusRequest(), metadata=bearer("app-secret"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    reply = await secured.generation.Generate(request, metadata=bearer("app-secret"), timeout=10)
    gid = reply.candidates[0].generation_id
    ack = await secured.feedback.Submit(
        rating("e1", gid), metadata=bearer("app-secret"), timeout=10
    )
    assert ack.outcome == pb.FEEDBACK_OUTCOME_ACCEPTED
    status = await secured.admin.GetStatus(
        pb.GetStatusRequest(), metadata=bearer("ops-secret"), timeout=10
    )
    assert status.generations_served == 1
    # The key's name is the client identity logged with generations and feedback.
    await wait_until(lambda: secured.server.generation_log.depth == 0)
    assert secured.store.get_generations([gid])[gid].client_id == "app"
    assert secured.store.feedback_for([gid])[0].client_id == "app"


async def test_feedback_stream_without_a_key_is_unauthenticated(secured) -> None:
    async def events():
        yield rating("s1", "whatever")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in secured.feedback.SubmitStream(events(), timeout=10):
            pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert secured.store.feedback_after(0, 10) == []


async def test_health_stays_open_when_auth_is_on(secured) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_non_loopback_bind_without_auth_is_refused(tmp_path: Path) -> None:
    server = FeedloopServer(test_config(tmp_path, host="0.0.0.0"))
    with pytest.raises(StartupError, match="without auth"):
        await server.start()
    await server.stop(0.0)


async def test_rate_limit_answers_resource_exhausted_once_the_bucket_is_empty(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, rate_limit_rps=0.001, rate_limit_burst=3)
    async with running_server(config, registry=registry) as running:
        results = []
        for _ in range(5):
            try:
                await running.generation.Generate(pb.GenerateRequest(prompt="a"), timeout=10)
                results.append("ok")
            except grpc.aio.AioRpcError as exc:
                results.append(exc.code())
    assert results == ["ok"] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


async def test_oversized_message_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, max_message_bytes=4096, max_prompt_chars=100_000)
    async with running_server(config, registry=registry) as running:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.generation.Generate(pb.GenerateRequest(prompt="x" * 10_000), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.skipif(not openssl_available(), reason="needs the openssl command")
async def test_mutual_tls_serves_clients_with_a_certificate_and_refuses_others(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    (tmp_path / "certs").mkdir()
    certs = make_certificates(tmp_path / "certs")
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(
        tmp_path,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca_cert,
    )
    server = FeedloopServer(config, registry=registry)
    await server.start()
    try:
        target = f"localhost:{server.grpc_port}"
        with_cert = grpc.ssl_channel_credentials(
            certs.ca_cert.read_bytes(),
            certs.client_key.read_bytes(),
            certs.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            reply = await pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(prompt="tls"), timeout=10
            )
            assert reply.candidates
        without_cert = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(target, without_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.GenerationStub(channel).Generate(
                    pb.GenerateRequest(prompt="tls"), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(2.0)


@pytest.fixture
async def open_server(tmp_path: Path, tiny_checkpoint: Path):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        yield running


async def test_health_is_serving_per_service_and_reflection_lists_the_services(
    open_server,
) -> None:
    health = health_pb2_grpc.HealthStub(open_server.channel)
    for service in ("", "feedloop.v1.Generation", "feedloop.v1.Feedback", "feedloop.v1.ModelAdmin"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    stub = reflection_pb2_grpc.ServerReflectionStub(open_server.channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    replies = [r async for r in stub.ServerReflectionInfo(ask(), timeout=10)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {
        "feedloop.v1.Generation",
        "feedloop.v1.Feedback",
        "feedloop.v1.ModelAdmin",
        "grpc.health.v1.Health",
    } <= names


async def test_health_goes_not_serving_when_draining(tmp_path: Path, tiny_checkpoint: Path) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    server = FeedloopServer(test_config(tmp_path), registry=registry)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="feedloop.v1.Generation"), timeout=10
        )
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.ensure_future(server.stop(1.0))
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        await stopping
    finally:
        await channel.close()
        await server.stop(0.0)


EXPECTED_SERIES = (
    'feedloop_requests_total{code="OK",method="Generate"}',
    'feedloop_requests_total{code="INVALID_ARGUMENT",method="Generate"}',
    "feedloop_request_duration_seconds_bucket",
    "feedloop_batch_queue_wait_seconds_bucket",
    "feedloop_batch_rows_bucket",
    "feedloop_batch_queue_depth",
    "feedloop_tokens_generated_total",
    "feedloop_generations_logged_total",
    'feedloop_feedback_events_total{kind="rating",outcome="accepted"}',
    'feedloop_feedback_rating_normalised_bucket{le="1.0",version="v0001"}',
    'feedloop_feedback_rating_normalised_sum{version="v0001"}',  # the mean-rating rule divides it
    'feedloop_feedback_version_wins_total{loser="other",winner="v0001"}',
    "feedloop_live_model_version_number 1.0",
    'feedloop_live_model_info{version="v0001"} 1.0',
    'feedloop_model_swaps_total{result="succeeded"} 1.0',
    "feedloop_model_swap_duration_seconds_count",
    'feedloop_store_write_duration_seconds_count{table="feedback"}',
    'feedloop_store_buffer_rows{table="generations"}',
)


async def test_metrics_scrape_has_every_series_and_passes_promtool(open_server) -> None:
    reply = await open_server.generation.Generate(pb.GenerateRequest(prompt="m"), timeout=10)
    await open_server.feedback.Submit(
        rating("m1", reply.candidates[0].generation_id, 1.0), timeout=10
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await open_server.generation.Generate(pb.GenerateRequest(prompt=""), timeout=10)
    await wait_until(lambda: open_server.server.generation_log.depth == 0)
    url = f"http://127.0.0.1:{open_server.server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    for series in EXPECTED_SERIES:
        assert series in text, series
    assert "feedloop_generations_logged_total 1.0" in text
    # The process's own series, as every Prometheus client exports them: this process's memory.
    assert sample_value(text, "process_resident_memory_bytes") > 10_000_000
    assert "python_info{" in text
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


def sample_value(text: str, series: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(series + " "))
    return float(line.rsplit(" ", 1)[1])


async def test_metrics_say_what_the_store_and_registry_take_and_what_each_disk_has_left(
    open_server, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{open_server.server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    store = open_server.server.store
    registry = open_server.server.registry
    assert sample_value(text, "feedloop_store_bytes") == pytest.approx(store.size_bytes(), rel=0.5)
    assert sample_value(text, "feedloop_store_bytes") > 0
    assert sample_value(text, "feedloop_registry_bytes") == registry.size_bytes() > 0
    usage = shutil.disk_usage(tmp_path)
    for volume, path in (
        ("data", tmp_path),
        ("store", tmp_path),
        ("registry", tmp_path / "registry"),
    ):
        labels = f'{{path="{path}",volume="{volume}"}}'
        assert sample_value(text, f"feedloop_disk_total_bytes{labels}") == usage.total
        free = sample_value(text, f"feedloop_disk_free_bytes{labels}")
        assert 0 < free <= usage.total


async def test_bytes_that_are_not_a_valid_message_are_invalid_argument(open_server) -> None:
    raw = open_server.channel.unary_unary("/feedloop.v1.Generation/Generate")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\x0a\x50abc", timeout=10)  # a length prefix longer than the message
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "feedloop.v1.GenerateRequest" in err.value.details()

    stream = open_server.channel.stream_stream("/feedloop.v1.Feedback/SubmitStream")

    async def undecodable():
        yield b"\x08\xff"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream(undecodable(), timeout=10):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert open_server.store.feedback_after(0, 10) == []

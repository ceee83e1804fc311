"""Mutual TLS names the identity: a key-file entry with `subject` is the identity of a call
whose verified client certificate has that common name and that sends no API key (issue 23,
tenancy). A key sent on the same channel still wins; roles and tenants apply alike."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from client_tls import make_certificates, openssl_available
from server_harness import seeded_registry, test_config

from feedloop.server.app import FeedloopServer, StartupError
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(not openssl_available(), reason="needs the openssl command")

KEYS = """
[[keys]]
name = "billing"
subject = "client"
tenant = "billing-tenant"
roles = ["generate", "feedback"]

[[keys]]
name = "other"
key = "k-other"
roles = ["generate", "feedback"]
"""


async def test_the_certificate_subject_names_the_caller_and_its_tenant(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    (tmp_path / "certs").mkdir()
    certs = make_certificates(tmp_path / "certs")
    (tmp_path / "keys.toml").write_text(KEYS, encoding="utf-8")
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(
        tmp_path,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca_cert,
        auth_keys_file=tmp_path / "keys.toml",
        unknown_generation_wait_ms=0.0,
    )
    server = FeedloopServer(config, registry=registry)
    await server.start()
    try:
        credentials = grpc.ssl_channel_credentials(
            certs.ca_cert.read_bytes(),
            certs.client_key.read_bytes(),
            certs.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(f"localhost:{server.grpc_port}", credentials) as channel:
            generation, feedback = pb_grpc.GenerationStub(channel), pb_grpc.FeedbackStub(channel)
            admin = pb_grpc.ModelAdminStub(channel)
            mine = await generation.Generate(pb.GenerateRequest(prompt="tls"), timeout=10)
            gid = mine.candidates[0].generation_id
            event = pb.FeedbackEvent(event_id="e", rating=pb.Rating(generation_id=gid, score=1))
            ack = await feedback.Submit(event, timeout=10)
            assert ack.outcome == pb.FEEDBACK_OUTCOME_ACCEPTED
            acks = [a async for a in feedback.SubmitStream(iter([event]), timeout=10)]
            assert [a.outcome for a in acks] == [pb.FEEDBACK_OUTCOME_DUPLICATE]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.GetStatus(pb.GetStatusRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "'billing'" in err.value.details()
            # A key on the same channel is that key's identity: another tenant here.
            other = (("authorization", "Bearer k-other"),)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await feedback.Submit(event, metadata=other, timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            theirs = await generation.Generate(
                pb.GenerateRequest(prompt="tls"), metadata=other, timeout=10
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generation.Generate(
                    pb.GenerateRequest(prompt="x"), metadata=(("authorization", "Bearer no"),)
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.generation_log is not None
        server.generation_log.flush(5.0)
        stored = server.store.get_generations([gid, theirs.candidates[0].generation_id])
        assert stored[gid].client_id == "billing-tenant"
        assert stored[theirs.candidates[0].generation_id].client_id == "other"
        assert [e.client_id for e in server.store.feedback_after(0, 10)] == ["billing-tenant"]
    finally:
        await server.stop(2.0)


async def test_subjects_without_mutual_tls_refuse_to_start(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text(KEYS, encoding="utf-8")
    server = FeedloopServer(test_config(tmp_path, auth_keys_file=tmp_path / "keys.toml"))
    with pytest.raises(StartupError, match="mutual TLS"):
        await server.start()

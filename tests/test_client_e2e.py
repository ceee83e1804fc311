"""The client library and command line against a real `feedloop serve` subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from client_tls import make_certificates, openssl_available

from feedloop.client import FeedloopClient, FeedloopClientError, Rating
from feedloop.demo.processes import start_server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    data_dir = tmp_path_factory.mktemp("served")
    shutil.copytree(tiny_checkpoint, data_dir / "default-policy")
    child = start_server(
        data_dir, "--torch-threads", "1", log_path=data_dir / "serve.log", timeout_s=120
    )
    try:
        yield child
    finally:
        assert child.stop() == 0, child.log_tail()


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "feedloop.client.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_client_generates_and_every_feedback_kind_is_stored_once(served):
    with FeedloopClient(served.banner["grpc"]) as client:
        client.wait_until_serving(timeout_s=30)
        reply = client.generate("green hills", n=3, seed=11, max_tokens=8)
        assert reply.model_version == served.banner["live"]
        assert len(reply.candidates) == 3
        same = client.generate("green hills", n=3, seed=11, max_tokens=8)
        assert [c.text for c in same.candidates] == [c.text for c in reply.candidates]
        ids = [c.generation_id for c in reply.candidates]
        before = client.status().feedback_accepted
        acks = [
            client.rate(ids[0], 5, scale="stars5"),
            client.rank(ids),
            client.compare(ids[1], ids[2]),
            client.correct(ids[2], "green hills at dawn"),
        ]
        assert [a.outcome for a in acks] == ["accepted"] * 4
        assert client.rate(ids[0], 5, scale="stars5", event_id=acks[0].event_id).duplicate
        streamed = client.submit_many([Rating(i, 0.5) for i in ids])
        assert [a.outcome for a in streamed] == ["accepted"] * 3
        status = client.status()
        assert status.feedback_accepted == before + 7
        assert status.feedback_duplicates >= 1


def test_real_server_errors_arrive_as_client_errors_with_their_codes(served):
    with FeedloopClient(served.banner["grpc"]) as client:
        with pytest.raises(FeedloopClientError) as raised:
            client.generate("")
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(FeedloopClientError) as raised:
            client.rate("no-such-generation", 1.0)
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(FeedloopClientError) as raised:
            client.generate("sea", model_version="v9999")
        assert raised.value.code == grpc.StatusCode.NOT_FOUND


async def test_async_client_against_the_real_server(served):
    from feedloop.client import AsyncFeedloopClient

    async with AsyncFeedloopClient(served.banner["grpc"]) as client:
        assert await client.health() == "SERVING"
        reply = await client.generate("quiet forest", n=2)
        ids = [c.generation_id for c in reply.candidates]
        acks = await client.submit_many([Rating(ids[0], 1.0, scale="thumbs")])
        assert acks[0].outcome == "accepted"
        models = await client.list_models()
        assert models.live_version == served.banner["live"]
        assert any(v.live for v in models.versions)


def test_command_line_round_trip_against_the_real_server(served):
    target = ("--target", served.banner["grpc"])
    generated = cli("generate", "ocean sunrise", "-n", "2", "--json", *target)
    assert generated.returncode == 0, generated.stderr
    ids = [c["generation_id"] for c in json.loads(generated.stdout)["candidates"]]
    rated = cli("feedback", "rate", ids[0], "1", "--scale", "thumbs", *target)
    assert rated.returncode == 0 and rated.stdout.startswith("accepted"), rated.stderr
    compared = cli("feedback", "compare", ids[0], ids[1], *target)
    assert compared.returncode == 0, compared.stderr
    models = cli("models", *target)
    assert models.returncode == 0 and f"live: {served.banner['live']}" in models.stdout
    status = cli("status", "--json", *target)
    assert json.loads(status.stdout)["live_version"] == served.banner["live"]
    missing = cli("feedback", "rate", "nope", "1", *target)
    assert missing.returncode == 4 and "NOT_FOUND" in missing.stderr
    assert "Traceback" not in missing.stderr
    unknown = cli("set-live", "v9999", *target)
    assert unknown.returncode == 4, unknown.stderr


@pytest.mark.skipif(not openssl_available(), reason="the openssl command is not installed")
def test_api_key_and_tls_against_a_real_server_with_auth_on(tmp_path, tiny_checkpoint):
    certs = make_certificates(tmp_path)
    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[[keys]]\nname = "app"\nkey = "app-key"\nroles = ["generate", "feedback"]\n\n'
        '[[keys]]\nname = "ops"\nkey = "ops-key"\nroles = ["admin"]\n'
    )
    shutil.copytree(tiny_checkpoint, tmp_path / "default-policy")
    child = start_server(
        tmp_path,
        "--auth-keys-file",
        str(keys),
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        log_path=tmp_path / "serve.log",
    )
    try:
        assert child.banner["auth"] == "on"
        target = child.banner["grpc"]
        tls = {"root_ca_path": certs.ca_cert, "tls_server_name": "localhost"}
        with FeedloopClient(target, api_key="app-key", **tls) as client:
            assert client.health() == "SERVING"
            reply = client.generate("sea", n=2)
            assert client.rate(reply.candidates[0].generation_id, 1.0).outcome == "accepted"
            with pytest.raises(FeedloopClientError) as raised:
                client.status()  # the app key has no admin role
            assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
        with FeedloopClient(target, api_key="wrong", **tls) as client:
            with pytest.raises(FeedloopClientError) as raised:
                client.generate("sea")
            assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
        common = (
            "--target",
            target,
            "--ca-cert",
            str(certs.ca_cert),
            "--tls-server-name",
            "localhost",
        )
        ok = cli("status", "--api-key", "ops-key", "--json", *common)
        assert ok.returncode == 0 and json.loads(ok.stdout)["live_version"], ok.stderr
        denied = cli("generate", "sea", "--api-key", "ops-key", *common)
        assert denied.returncode == 6 and "PERMISSION_DENIED" in denied.stderr
        plaintext = cli(
            "status", "--target", target, "--api-key", "ops-key", "--timeout", "3", "--retries", "0"
        )
        assert plaintext.returncode == 3, plaintext.stderr
    finally:
        assert child.stop() == 0, child.log_tail()

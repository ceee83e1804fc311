"""The project's own Python client against the real server: the contract holds end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from server_harness import running_server, seeded_registry, test_config

from feedloop.client.client import FeedloopClient
from feedloop.client.errors import FeedloopClientError
from feedloop.client.types import Comparison, Correction, Rating
from feedloop.server.auth import hash_key


def client_session(target: str) -> dict:
    """Everything a client app does in one session (blocking: run it off the server's loop)."""
    app = FeedloopClient(target, api_key="app-key")
    ops = FeedloopClient(target, api_key="ops-key")
    try:
        app.wait_until_serving(timeout_s=10)
        reply = app.generate("sunny beach", 3, max_tokens=8, seed=7)
        a, b, c = (cand.generation_id for cand in reply.candidates)
        outcomes = [
            app.rate(a, 4, scale="stars5", event_id="r1").outcome,
            app.rate(a, 4, scale="stars5", event_id="r1").outcome,
            app.rank([c, b, a], event_id="k1").outcome,
            app.compare(b, c, event_id="c1").outcome,
            app.correct(c, "a sunny beach at noon", event_id="x1").outcome,
        ]
        many = app.submit_many(
            [Rating(a, 1.0, "thumbs", f"m{i}") for i in range(20)]
            + [Comparison(a, b, "m-cmp"), Correction(b, "better", "m-cor")]
        )
        with pytest.raises(FeedloopClientError) as denied:
            app.status()
        status = ops.status()
        models = ops.list_models()
        return {
            "reply": reply,
            "outcomes": outcomes,
            "many": many,
            "denied": denied.value.code,
            "status": status,
            "models": models,
        }
    finally:
        app.close()
        ops.close()


async def test_python_client_drives_every_rpc_of_a_secured_server(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "app"\nsha256 = "{hash_key("app-key")}"\n'
        'roles = ["generate", "feedback"]\n'
        f'[[keys]]\nname = "ops"\nsha256 = "{hash_key("ops-key")}"\nroles = ["admin"]\n'
    )
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, auth_keys_file=keys)
    async with running_server(config, registry=registry) as running:
        seen = await asyncio.to_thread(client_session, f"127.0.0.1:{running.server.grpc_port}")
    assert seen["reply"].model_version == "v0001" and seen["reply"].seed == 7
    assert len(seen["reply"].candidates) == 3
    assert seen["outcomes"] == ["accepted", "duplicate", "accepted", "accepted", "accepted"]
    assert [r.outcome for r in seen["many"]] == ["accepted"] * 22
    assert seen["denied"] == grpc.StatusCode.PERMISSION_DENIED
    assert seen["status"].live_version == "v0001"
    assert seen["status"].feedback_accepted == 26 and seen["status"].feedback_duplicates == 1
    assert seen["models"].live_version == "v0001"
    assert seen["models"].versions[0].architecture == "gru-seq2seq"

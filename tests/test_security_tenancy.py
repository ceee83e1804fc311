"""Outside-in: tenants, server-issued replies and bounded inputs (issue 23, findings 1, 2, 5-7).

A real server with an API key file (in process, loopback, generated stubs): two keys of tenant
"acme", one of tenant "beta" (a key with no tenant is its own), a labeller's key, an admin's.
Each numbered finding of the issue is a test here that failed on the code before the fix:
1. the same event id from two tenants is two events (it was DUPLICATE and dropped), and within
   a tenant the same id with another body is ALREADY_EXISTS (it was a silent DUPLICATE);
   a tenant cannot give feedback on another tenant's generations (a labeller can);
2. a ranking spanning two replies that shared a client-chosen request_id is refused;
5. a 256-character version name is INVALID_ARGUMENT naming the limit (it was INTERNAL);
6. a huge SetLive reason is refused, and one stored before the bound cannot break ListModels;
7. unknown names are quoted by a short prefix, and no message names a file system path.
Store migration of existing stores (event ids unique per store -> per tenant) runs on both
backends at the end.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from pg_support import ADMIN_URL, fresh_schema, schema_url
from server_harness import running_server, seeded_registry, test_config

from feedloop.core.errors import ConfigError
from feedloop.core.migrations import migrate
from feedloop.core.store import open_store
from feedloop.core.store.schema import LATEST_VERSION, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from feedloop.server.auth import load_keys
from feedloop.server.limits import MAX_REASON_CHARS, MAX_VERSION_CHARS
from feedloop.v1 import feedloop_pb2 as pb

KEYS = {
    "acme-web": ("k-acme-web", 'tenant = "acme"', ["generate", "feedback"]),
    "acme-batch": ("k-acme-batch", 'tenant = "acme"', ["generate", "feedback"]),
    "beta": ("k-beta", "", ["generate", "feedback"]),
    "console": ("k-console", "", ["feedback", "labeller"]),
    "ops": ("k-ops", "", ["admin"]),
}
ACCEPTED = pb.FEEDBACK_OUTCOME_ACCEPTED
DUPLICATE = pb.FEEDBACK_OUTCOME_DUPLICATE


def md(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[name][0]}"),)


def keys_file(path: Path) -> Path:
    entries = [
        f'[[keys]]\nname = "{name}"\nkey = "{key}"\n{tenant}\nroles = {roles!r}\n'
        for name, (key, tenant, roles) in KEYS.items()
    ]
    path.write_text("\n".join(entries), encoding="utf-8")
    return path


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(
        tmp_path, auth_keys_file=keys_file(tmp_path / "keys.toml"), unknown_generation_wait_ms=0.0
    )
    async with running_server(config, registry=registry) as running:
        yield running


async def generate(live: Any, who: str, n: int = 2, request_id: str = "") -> pb.GenerateResponse:
    return await live.generation.Generate(
        pb.GenerateRequest(prompt="green hills", num_candidates=n, request_id=request_id),
        metadata=md(who),
        timeout=10,
    )


def rating(event_id: str, gid: str, score: float = 1.0) -> pb.FeedbackEvent:
    return pb.FeedbackEvent(event_id=event_id, rating=pb.Rating(generation_id=gid, score=score))


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    return err.value


def stored_events(live: Any) -> list[tuple[str, str]]:
    live.server.generation_log.flush(5.0)
    return [(e.client_id, e.event_id) for e in live.store.feedback_after(0, 10_000)]


# -- 1: tenancy -----------------------------------------------------------------------------


async def test_the_same_event_id_from_two_tenants_is_two_events(live) -> None:
    acme = (await generate(live, "acme-web")).candidates[0].generation_id
    beta = (await generate(live, "beta")).candidates[0].generation_id
    first = await live.feedback.Submit(rating("order-42", acme), metadata=md("acme-web"))
    second = await live.feedback.Submit(rating("order-42", beta), metadata=md("beta"))
    assert (first.outcome, second.outcome) == (ACCEPTED, ACCEPTED)
    assert sorted(stored_events(live)) == [("acme", "order-42"), ("beta", "order-42")]


async def test_a_tenants_keys_share_its_ids_and_a_changed_body_is_already_exists(live) -> None:
    gid = (await generate(live, "acme-web")).candidates[0].generation_id
    first = await live.feedback.Submit(rating("e-1", gid, 1.0), metadata=md("acme-web"))
    retry = await live.feedback.Submit(rating("e-1", gid, 1.0), metadata=md("acme-batch"))
    assert (first.outcome, retry.outcome) == (ACCEPTED, DUPLICATE)
    err = await refused(
        live.feedback.Submit(rating("e-1", gid, 0.0), metadata=md("acme-web"), timeout=10)
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.details().startswith("event_id: 'e-1' was already used")
    stored = live.store.get_feedback([("acme", "e-1")])
    assert stored["acme", "e-1"].score == 1.0  # the first event stands, unchanged
    # The same inside one stream: the retry is a duplicate, the changed one ends the stream.
    events = [rating("s-1", gid, 1.0), rating("s-1", gid, 1.0), rating("s-1", gid, 0.0)]
    acks = []
    with pytest.raises(grpc.aio.AioRpcError) as stream_err:
        async for ack in live.feedback.SubmitStream(iter(events), metadata=md("acme-web")):
            acks.append(ack.outcome)
    assert acks == [ACCEPTED, DUPLICATE]
    assert stream_err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert stored_events(live).count(("acme", "s-1")) == 1


async def test_a_tenant_cannot_judge_another_tenants_generations_a_labeller_can(live) -> None:
    reply = await generate(live, "acme-web", n=2)
    a, b = (c.generation_id for c in reply.candidates)
    cross = [
        rating("x-1", a),
        pb.FeedbackEvent(event_id="x-2", ranking=pb.Ranking(generation_ids=[a, b])),
        pb.FeedbackEvent(event_id="x-3", comparison=pb.Comparison(preferred_id=a, rejected_id=b)),
        pb.FeedbackEvent(event_id="x-4", correction=pb.Correction(generation_id=a, text="hi")),
    ]
    for event in cross:
        err = await refused(live.feedback.Submit(event, metadata=md("beta"), timeout=10))
        # Exactly what an unknown id gets: the answer does not tell that it exists.
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "no generation" in err.details()
    # Another key of the owning tenant may; so may the labeller's key, for any tenant.
    own = await live.feedback.Submit(rating("own", a), metadata=md("acme-batch"))
    labelled = await live.feedback.Submit(rating("lab", a), metadata=md("console"))
    assert own.outcome == labelled.outcome == ACCEPTED
    assert sorted(stored_events(live)) == [("acme", "own"), ("console", "lab")]
    assert {g.client_id for g in live.store.get_generations([a, b]).values()} == {"acme"}


# -- 2: replies are the server's word ---------------------------------------------------------


async def test_a_ranking_spanning_replies_that_share_a_request_id_is_refused(live) -> None:
    first = await generate(live, "acme-web", n=2, request_id="same")
    second = await generate(live, "acme-web", n=2, request_id="same")
    assert first.reply_id and second.reply_id and first.reply_id != second.reply_id
    ids = [c.generation_id for c in (*first.candidates, *second.candidates)]
    event = pb.FeedbackEvent(event_id="rank", ranking=pb.Ranking(generation_ids=ids))
    err = await refused(live.feedback.Submit(event, metadata=md("acme-web"), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one Generate reply" in err.details()
    own = pb.FeedbackEvent(
        event_id="rank-ok",
        ranking=pb.Ranking(generation_ids=[c.generation_id for c in first.candidates]),
    )
    assert (await live.feedback.Submit(own, metadata=md("acme-web"))).outcome == ACCEPTED
    stored = live.store.get_generations(ids)
    assert {stored[c.generation_id].reply_id for c in first.candidates} == {first.reply_id}


async def test_a_ranking_longer_than_a_reply_can_be_is_refused_before_any_lookup(live) -> None:
    limit = live.server.config.max_candidates
    ids = [f"{i:032x}" for i in range(limit + 1)]
    event = pb.FeedbackEvent(event_id="long", ranking=pb.Ranking(generation_ids=ids))
    err = await refused(live.feedback.Submit(event, metadata=md("acme-web"), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        f"ranking.generation_ids: at most {limit} ids (the candidates of one Generate reply), "
        f"got {limit + 1}"
    )


# -- 5, 6, 7: bounded inputs, short messages, no paths ------------------------------------------


async def test_a_long_version_name_is_invalid_argument_naming_the_limit(live) -> None:
    admin = md("ops")
    calls = {
        "SetLive": live.admin.SetLive(pb.SetLiveRequest(version="v" + "0" * 255), metadata=admin),
        "StartTrial": live.admin.StartTrial(
            pb.StartTrialRequest(version="v" * 1000, share=0.1), metadata=admin
        ),
        "SetPinned": live.admin.SetPinned(
            pb.SetPinnedRequest(version="v" * 100_000, pinned=True), metadata=admin
        ),
        "GetOnlineReport": live.admin.GetOnlineReport(
            pb.GetOnlineReportRequest(versions=["v" * 65]), metadata=admin
        ),
        "Generate": live.generation.Generate(
            pb.GenerateRequest(prompt="hi", model_version="x" * 100_000), metadata=md("beta")
        ),
    }
    for name, call in calls.items():
        err = await refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert f"at most {MAX_VERSION_CHARS} characters" in err.details(), name
        assert len(err.details()) < 120, name
    versions = await asyncio.to_thread(live.server.registry.versions)
    assert versions == ["v0001"]


async def test_a_huge_reason_is_refused_and_a_stored_one_cannot_break_list_models(live) -> None:
    admin = md("ops")
    err = await refused(
        live.admin.SetLive(pb.SetLiveRequest(version="v0001", reason="r" * 600_000), metadata=admin)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"reason: at most {MAX_REASON_CHARS} characters, got 600000"
    # Reasons an older server let into the history: the listing still fits in a reply.
    registry = live.server.registry
    for _ in range(2):
        await asyncio.to_thread(registry.set_live, "v0001", reason="r" * 600_000)
    listing = await live.admin.ListModels(pb.ListModelsRequest(), metadata=admin, timeout=10)
    assert max(len(d.reason) for d in listing.decisions) <= MAX_REASON_CHARS


async def test_unknown_names_are_quoted_short_and_no_message_names_a_path(live) -> None:
    admin = md("ops")
    root = str(live.server.registry.root)
    err = await refused(
        live.admin.SetLive(pb.SetLiveRequest(version="v9999"), metadata=admin, timeout=10)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "v9999" in err.details() and root not in err.details() and "<path>" in err.details()
    trailers = dict(err.trailing_metadata() or ())
    assert root.encode() not in trailers.get("grpc-status-details-bin", b"")
    gid = "g" * 128
    err = await refused(live.feedback.Submit(rating("q", gid), metadata=md("beta"), timeout=10))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert gid not in err.details() and "(128 characters)" in err.details()


# -- migration of existing stores ---------------------------------------------------------------

OLD_VERSION = 7  # event ids unique across the whole store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def old_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store at schema version 7 holding one generation and two events (seqs 1, 2; the
    highest seq ever handed out was 3: the third event was erased)."""
    if request.param == "sqlite":
        path = tmp_path / "old.db"
        conn = sqlite3.connect(path)
        with conn:
            migrate(
                conn,
                SQLITE_MIGRATIONS[:OLD_VERSION],
                placeholder="?",
                store_name="old",
                error=RuntimeError,
            )
            conn.execute(
                "INSERT INTO generations (generation_id, request_id, prompt, prompt_ids, "
                "output_ids, behaviour_logprobs, policy_logprobs, finished, text, sampling, "
                "model_version, client_id, created_at, candidate_index, num_candidates) "
                "VALUES ('g1', 'r', 'p', '[1]', '[2]', '[-0.5]', '[-0.5]', 1, 't', '{}', "
                "'v0001', 'acme', 1.0, 0, 1)"
            )
            for event_id in ("e1", "e2", "e3"):
                conn.execute(
                    "INSERT INTO feedback (event_id, kind, generation_ids, client_id, "
                    "received_at, score, scale) VALUES (?, 'rating', '[\"g1\"]', 'acme', 2.0, "
                    "1.0, 'unit')",
                    (event_id,),
                )
            conn.execute(
                "INSERT INTO feedback_generations SELECT 'g1', seq FROM feedback WHERE seq < 3"
            )
            conn.execute("DELETE FROM feedback WHERE event_id = 'e3'")
        conn.close()
        yield str(path)
        return
    with fresh_schema("migrate") as schema, psycopg.connect(ADMIN_URL) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        migrate(
            conn,
            POSTGRES_MIGRATIONS[:OLD_VERSION],
            placeholder="%s",
            store_name="old",
            error=RuntimeError,
        )
        conn.execute(
            "INSERT INTO generations (generation_id, request_id, prompt, prompt_ids, output_ids, "
            "behaviour_logprobs, policy_logprobs, finished, text, sampling, model_version, "
            "client_id, created_at, candidate_index, num_candidates) VALUES ('g1', 'r', 'p', "
            "'{1}', '{2}', '{-0.5}', '{-0.5}', TRUE, 't', '{}', 'v0001', 'acme', 1.0, 0, 1)"
        )
        for event_id in ("e1", "e2", "e3"):
            conn.execute(
                "INSERT INTO feedback (event_id, kind, generation_ids, client_id, received_at, "
                "score, scale) VALUES (%s, 'rating', '{g1}', 'acme', 2.0, 1.0, 'unit')",
                (event_id,),
            )
        conn.execute("DELETE FROM feedback WHERE event_id = 'e3'")
        conn.commit()
        yield schema_url(schema)


def test_an_existing_store_migrates_to_per_tenant_event_ids(old_store: str) -> None:
    from store_support import rating as stored_rating

    store = open_store(old_store)
    try:
        before = store.feedback_after(0, 10)
        assert [(e.seq, e.event_id, e.client_id) for e in before] == [
            (1, "e1", "acme"),
            (2, "e2", "acme"),
        ]
        assert store.get_generations(["g1"])["g1"].reply_id == ""
        assert [e.event_id for e in store.feedback_for(["g1"])] == ["e1", "e2"]
        beta = stored_rating("e1", "g1")
        beta.client_id = "beta"
        again = stored_rating("e2", "g1")
        again.client_id = "acme"
        assert store.insert_feedback([beta, again]) == [True, False]
        # Seqs never go back, past the erased third event too: the trainer's cursor holds.
        (new,) = [e for e in store.feedback_after(2, 10)]
        assert (new.client_id, new.event_id) == ("beta", "e1") and new.seq > 3
        assert [e.event_id for e in store.feedback_for(["g1"])] == ["e1", "e2", "e1"]
    finally:
        store.close()
    reopened = open_store(old_store)  # at the latest version now: nothing runs again
    reopened.close()
    assert LATEST_VERSION > OLD_VERSION


def test_the_key_file_groups_keys_into_tenants(tmp_path: Path) -> None:
    keys = load_keys(keys_file(tmp_path / "keys.toml"))
    by_name = {key.name: key for key in keys.values()}
    assert by_name["acme-web"].client_id == by_name["acme-batch"].client_id == "acme"
    assert by_name["beta"].client_id == "beta"  # no tenant: its own
    assert "labeller" in by_name["console"].roles
    for bad in ("tenant = 7", f'tenant = "{"t" * 129}"', 'tenant = "a\\nb"'):
        path = tmp_path / "bad.toml"
        path.write_text(f'[[keys]]\nname = "x"\nkey = "k"\n{bad}\nroles = ["feedback"]\n')
        with pytest.raises(ConfigError, match="tenant"):
            load_keys(path)

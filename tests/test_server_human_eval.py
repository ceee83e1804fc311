"""Human evaluation on an in-process server: verdicts through Feedback.SubmitVerdict (stored
once, a side's win also stored as comparison feedback, bad verdicts refused and storing
nothing), reports through ModelAdmin.GetHumanEvaluation, versions loaded through LoadVersion,
and the identity a caller declares with auth off."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from server_harness import running_server, seeded_registry, test_config

from feedloop.v1 import feedloop_pb2 as pb


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    """v0001 live, v0002 published (not loaded until asked for)."""
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    registry.publish(tiny_checkpoint, reason="candidate")
    async with running_server(test_config(tmp_path), registry=registry) as r:
        yield r


RATER = (("feedloop-client-name", "ann"),)


async def pair(live, prompt: str = "ocean sunrise") -> tuple[str, str]:
    """Candidates of v0002 and v0001 for one prompt, generated as rater ann."""
    a = await live.generation.Generate(
        pb.GenerateRequest(prompt=prompt, model_version="v0002"), metadata=RATER, timeout=10
    )
    b = await live.generation.Generate(
        pb.GenerateRequest(prompt=prompt, model_version="v0001"), metadata=RATER, timeout=10
    )
    return a.candidates[0].generation_id, b.candidates[0].generation_id


def verdict(vid: str, gid_a: str, gid_b: str, choice: int = 0, **fields) -> pb.EvaluationVerdict:
    message = dict(
        verdict_id=vid,
        session_id="session-1",
        version_a="v0002",
        generation_id_a=gid_a,
        version_b="v0001",
        generation_id_b=gid_b,
        choice=choice,
        a_shown_left=True,
    )
    message.update(fields)
    return pb.EvaluationVerdict(**message)


async def test_a_version_loads_on_request_and_verdicts_become_evaluation_and_comparisons(live):
    with pytest.raises(grpc.aio.AioRpcError) as unloaded:
        await pair(live)
    assert unloaded.value.code() == grpc.StatusCode.NOT_FOUND
    loaded = await live.admin.LoadVersion(pb.LoadVersionRequest(version="v0002"), timeout=30)
    assert set(loaded.loaded_versions) == {"v0001", "v0002"}

    gid_a, gid_b = await pair(live)
    ack = await live.feedback.SubmitVerdict(
        verdict("v1", gid_a, gid_b, pb.VERDICT_CHOICE_A), metadata=RATER, timeout=10
    )
    assert ack.outcome == pb.FEEDBACK_OUTCOME_ACCEPTED and ack.event_id == "v1"
    again = await live.feedback.SubmitVerdict(
        verdict("v1", gid_a, gid_b, pb.VERDICT_CHOICE_A), metadata=RATER, timeout=10
    )
    assert again.outcome == pb.FEEDBACK_OUTCOME_DUPLICATE
    gid_c, gid_d = await pair(live, "garden")
    await live.feedback.SubmitVerdict(
        verdict("v2", gid_c, gid_d, pb.VERDICT_CHOICE_TIE, a_shown_left=False),
        metadata=(("feedloop-client-name", "bob"),),
        timeout=10,
    )

    stored = live.store.verdicts_between("v0001", "v0002")
    assert [(v.verdict_id, v.rater, v.choice, v.prompt) for v in stored] == [
        ("v1", "ann", "a", "ocean sunrise"),
        ("v2", "bob", "tie", "garden"),
    ]
    # The win is comparison feedback under the rater's identity; the tie is not feedback.
    events = live.store.feedback_for([gid_a, gid_b, gid_c, gid_d])
    assert [(e.event_id, e.kind, e.generation_ids, e.client_id) for e in events] == [
        ("v1/comparison", "comparison", [gid_a, gid_b], "ann")
    ]
    generations = live.store.get_generations([gid_a])
    assert generations[gid_a].client_id == "ann"

    report = await live.admin.GetHumanEvaluation(
        pb.GetHumanEvaluationRequest(version_a="v0002", version_b="v0001"), timeout=10
    )
    assert (report.overall.verdicts, report.overall.a_wins, report.overall.ties) == (2, 1, 1)
    assert report.overall.a_win_rate == pytest.approx(0.75)
    assert 0 < report.overall.low < 0.75 < report.overall.high <= 1
    assert [(t.rater, t.verdicts) for t in report.raters] == [("ann", 1), ("bob", 1)]
    assert report.sessions == 1 and report.alpha == pytest.approx(0.05)
    metrics = live.server.metrics.registry
    assert metrics.get_sample_value(
        "feedloop_human_eval_win_rate",
        {"version_a": "v0002", "version_b": "v0001", "bound": "mean"},
    ) == pytest.approx(0.75)
    assert (
        metrics.get_sample_value(
            "feedloop_human_eval_verdicts_total", {"choice": "a", "outcome": "duplicate"}
        )
        == 1
    )


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        (dict(verdict_id=""), grpc.StatusCode.INVALID_ARGUMENT, "verdict_id"),
        (dict(session_id=""), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        (dict(choice=pb.VERDICT_CHOICE_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT, "choice"),
        (dict(version_b="v0002"), grpc.StatusCode.INVALID_ARGUMENT, "version_b"),
        (
            dict(version_a="v0001", version_b="v0002"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "generation_id_a",
        ),
        (dict(generation_id_b="nope"), grpc.StatusCode.NOT_FOUND, "generation_id_b"),
    ],
)
async def test_a_bad_verdict_is_refused_naming_its_field_and_stores_nothing(
    live, change, code, field
):
    await live.admin.LoadVersion(pb.LoadVersionRequest(version="v0002"), timeout=30)
    gid_a, gid_b = await pair(live)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await live.feedback.SubmitVerdict(
            verdict("bad", gid_a, gid_b, **{"choice": pb.VERDICT_CHOICE_A, **change}), timeout=10
        )
    assert refused.value.code() == code
    assert field in refused.value.details()
    assert live.store.verdicts_between("v0001", "v0002") == []
    assert live.store.feedback_for([gid_a, gid_b]) == []


async def test_candidates_of_two_prompts_are_not_a_pair(live):
    await live.admin.LoadVersion(pb.LoadVersionRequest(version="v0002"), timeout=30)
    gid_a, _ = await pair(live, "rain")
    _, gid_b = await pair(live, "garden")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await live.feedback.SubmitVerdict(
            verdict("x", gid_a, gid_b, pb.VERDICT_CHOICE_B), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "another prompt" in refused.value.details()
    assert live.store.feedback_for([gid_a, gid_b]) == []


async def test_report_and_load_refuse_bad_requests(live):
    for request, field in (
        (pb.GetHumanEvaluationRequest(version_a="v0001"), "version_b"),
        (pb.GetHumanEvaluationRequest(version_a="v1", version_b="v1"), "version_b"),
        (pb.GetHumanEvaluationRequest(version_a="v1", version_b="v2", alpha=1.5), "alpha"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await live.admin.GetHumanEvaluation(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith(field)
    empty = await live.admin.GetHumanEvaluation(
        pb.GetHumanEvaluationRequest(version_a="v0002", version_b="v0001"), timeout=10
    )
    assert empty.overall.verdicts == 0 and (empty.overall.low, empty.overall.high) == (0, 1)
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await live.admin.LoadVersion(pb.LoadVersionRequest(version="v0099"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_declared_name_is_the_identity_only_with_auth_off():
    """With auth off the declared name names the caller (and its rate-limit bucket); with auth
    on the key does, whatever name the caller declares."""
    from feedloop.server.auth import ApiKey, Authenticator, Refused, admit, hash_key
    from feedloop.server.ratelimit import RateLimiter

    declared = (("feedloop-client-name", "ann"),)
    limiter = RateLimiter(rate_per_s=0.001, burst=1)

    def who(authenticator, limiter, metadata, role):
        caller = admit(authenticator, limiter, metadata, role)
        assert caller.key_name == caller.client_id  # the bucket and the stored identity agree
        return caller.client_id

    assert who(Authenticator(None), limiter, declared, "feedback") == "ann"
    assert (
        who(Authenticator(None), limiter, (("feedloop-client-name", "bob"),), "feedback") == "bob"
    )
    with pytest.raises(Refused):  # ann's bucket is empty; bob's was separate
        who(Authenticator(None), limiter, declared, "feedback")
    assert who(Authenticator(None), limiter, (), "feedback") == "anonymous"
    assert (
        who(Authenticator(None), RateLimiter(0, 0), (("feedloop-client-name", " \x07"),), "x")
        == "anonymous"
    )
    keys = {hash_key("secret"): ApiKey("rater-7", frozenset({"feedback"}))}
    with_key = (("authorization", "Bearer secret"), *declared)
    assert who(Authenticator(keys), RateLimiter(0, 0), with_key, "feedback") == "rater-7"


async def test_the_cli_prints_the_evaluation_as_a_table_and_as_json(live, capsys):
    import asyncio
    import json

    from feedloop.client.commands import main

    await live.admin.LoadVersion(pb.LoadVersionRequest(version="v0002"), timeout=30)
    for i, choice in enumerate((pb.VERDICT_CHOICE_A, pb.VERDICT_CHOICE_BOTH_BAD)):
        gid_a, gid_b = await pair(live, f"prompt {i}")
        await live.feedback.SubmitVerdict(verdict(f"c{i}", gid_a, gid_b, choice), timeout=10)
    target = f"127.0.0.1:{live.server.grpc_port}"
    assert await asyncio.to_thread(main, ["human-eval", "v0002", "v0001", "--target", target]) == 0
    table = capsys.readouterr().out
    assert "2 verdicts from 1 raters in 1 sessions" in table
    assert re.search(r"^overall +2 +1 +0 +0 +1 +0.750 \[0.198, 0.973\]$", table, re.M)
    code = await asyncio.to_thread(
        main, ["human-eval", "v0001", "v0002", "--target", target, "--json"]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["version_a"] == "v0001"
    assert (report["overall"]["b_wins"], report["overall"]["both_bad"]) == (1, 1)
    assert report["overall"]["a_win_rate"] == pytest.approx(0.25)
    assert [t["rater"] for t in report["raters"]] == ["anonymous"]
    bad = await asyncio.to_thread(main, ["human-eval", "v1", "v1", "--target", target])
    assert bad == 5 and "version_b" in capsys.readouterr().err

"""The client command line: tables by default, JSON on request, exit codes that mean something,
and one clear line on stderr for every error (no traceback)."""

from __future__ import annotations

import json
import socket

import grpc
import pytest
from client_fake_server import FakeServer

from feedloop.client import commands
from feedloop.client.cli import main as feedloop_main

COMMANDS = [
    "generate",
    "feedback",
    "models",
    "status",
    "set-live",
    "rollback",
    "canary",
    "trainer",
    "online-report",
]


@pytest.fixture
def fake():
    with FakeServer() as server:
        yield server


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = feedloop_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def generation_ids(capsys, fake) -> list[str]:
    code, out, _ = run(capsys, "generate", "sea", "-n", "3", "--target", fake.target, "--json")
    assert code == 0
    return [c["generation_id"] for c in json.loads(out)["candidates"]]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_examples_and_exit_codes(capsys, name):
    code, out, _ = run(capsys, name, "--help")
    assert code == 0
    assert "examples:" in out and f"feedloop {name}" in out
    assert "exit codes:" in out and "FEEDLOOP_TARGET" in out


def test_generate_prints_a_table_naming_the_version_and_each_generation_id(capsys, fake):
    code, out, err = run(
        capsys,
        "generate",
        "ocean sunrise",
        "-n",
        "2",
        "--seed",
        "5",
        "--temperature",
        "0.8",
        "--target",
        fake.target,
    )
    assert code == 0 and err == ""
    assert out.startswith("model v0001")
    assert "generation_id" in out and "ocean sunrise #1" in out
    assert "seed 5" in out


def test_generate_prints_token_logprobs_on_request(capsys, fake):
    code, out, _ = run(capsys, "generate", "rain", "--token-logprobs", "--target", fake.target)
    assert code == 0
    assert "1: rain -0.500  #0 -0.500" in out


def test_generate_json_is_machine_readable(capsys, fake):
    code, out, _ = run(capsys, "generate", "rain", "-n", "2", "--json", "--target", fake.target)
    assert code == 0
    reply = json.loads(out)
    assert reply["model_version"] == "v0001" and len(reply["candidates"]) == 2
    assert set(reply["candidates"][0]) == {
        "generation_id",
        "text",
        "tokens",
        "log_prob",
        "finished",
        "token_logprobs",
    }
    assert reply["candidates"][0]["token_logprobs"] == []  # only with --token-logprobs


def test_every_feedback_kind_is_accepted_and_a_repeated_event_id_is_a_duplicate(capsys, fake):
    ids = generation_ids(capsys, fake)
    target = ("--target", fake.target)
    for argv in (
        ("rate", ids[0], "4", "--scale", "stars5"),
        ("rank", *ids),
        ("compare", ids[0], ids[1]),
        ("correct", ids[2], "calm sea at dawn"),
    ):
        code, out, err = run(capsys, "feedback", *argv, *target)
        assert (code, err) == (0, "")
        assert out.startswith("accepted: event ")
    assert len(fake.script.stored_events) == 4

    argv = ("feedback", "rate", ids[0], "1", "--scale", "thumbs", "--event-id", "key-1", *target)
    assert run(capsys, *argv)[1].startswith("accepted")
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0 and json.loads(out) == {"event_id": "key-1", "outcome": "duplicate"}


def test_models_status_set_live_and_rollback_print_tables_and_json(capsys, fake):
    target = ("--target", fake.target)
    code, out, _ = run(capsys, "models", *target)
    assert code == 0 and out.startswith("live: v0001") and "decisions:" in out
    assert "perplexity=12.5" in out
    code, out, _ = run(capsys, "set-live", "v0002", "--reason", "test", *target)
    assert (code, out.strip()) == (0, "live: v0002 (was v0001)")
    code, out, _ = run(capsys, "status", "--json", *target)
    assert code == 0 and json.loads(out)["live_version"] == "v0002"
    code, out, _ = run(capsys, "status", *target)
    assert "live_version" in out and "v0002" in out
    code, out, _ = run(capsys, "rollback", "--json", *target)
    assert code == 0 and json.loads(out) == {"live_version": "v0001", "previous_version": "v0002"}
    code, out, _ = run(capsys, "models", "--json", *target)
    versions = json.loads(out)["versions"]
    assert [v["version"] for v in versions if v["live"]] == ["v0001"]


def test_canary_and_trainer_commands_change_the_registry_state(capsys, fake):
    target = ("--target", fake.target)
    code, out, _ = run(capsys, "canary", "start", "v0002", "--share", "0.1", *target)
    assert code == 0 and out.startswith("live: v0001  trial: v0002 (canary 0.1, since ")
    code, out, _ = run(capsys, "models", *target)
    assert "trial: v0002 (canary 0.1" in out
    code, out, _ = run(capsys, "status", *target)
    assert "v0002 (canary 0.1" in out
    code, out, _ = run(capsys, "canary", "promote", "--reason", "as good", "--json", *target)
    assert code == 0
    assert json.loads(out) == {"live_version": "v0002", "trial": None, "trainer_paused": False}
    code, out, _ = run(capsys, "canary", "start", "v0001", "--share", "0.3", "--shadow", *target)
    assert code == 0 and "trial: v0001 (shadow 0.3" in out
    code, out, _ = run(capsys, "canary", "rollback", *target)
    assert (code, out.strip()) == (0, "live: v0002  trial: none")
    code, out, _ = run(capsys, "trainer", "pause", "--reason", "incident", *target)
    assert (code, out.strip()) == (0, "live: v0002  trial: none  trainer: paused")
    code, out, _ = run(capsys, "trainer", "resume", *target)
    assert (code, out.strip()) == (0, "live: v0002  trial: none")
    assert fake.script.calls[-1] == "SetTrainerPaused"


def test_online_report_prints_a_table_by_version_and_the_trial_comparison(capsys, fake):
    target = ("--target", fake.target)
    code, out, _ = run(capsys, "online-report", *target)
    assert code == 0
    lines = out.splitlines()
    assert "intervals at 95% (time-uniform)" in lines[0]
    assert lines[1] == "live: v0001  trial: none"
    assert lines[3].split() == ["version", "role", "n", "mean", "interval", "win", "rates"]
    assert lines[5].split() == [
        "v0001", "live", "40", "+0.250", "[-0.125,", "+0.625]",
        "vs", "v0002", "0.75", "[0.25,", "1.00]", "n=8",
    ]  # fmt: skip
    assert lines[6].split() == ["v0002", "0", "-", "-"]
    assert "trial" not in out.split("\n\n", 2)[-1]
    assert "recent" not in out

    code, out, _ = run(capsys, "online-report", "--half-life-s", "300", *target)
    assert code == 0 and fake.script.online_requests[-1].half_life_s == 300
    lines = out.splitlines()
    assert lines[3].split() == [
        "version", "role", "n", "mean", "interval", "recent", "(discounted)", "win", "rates",
    ]  # fmt: skip
    assert lines[5].split()[:9] == [
        "v0001", "live", "40", "+0.250", "[-0.125,", "+0.625]", "+0.500", "[-0.250,", "+1.000]",
    ]  # fmt: skip
    assert lines[6].split() == ["v0002", "0", "-", "-", "-"]

    assert run(capsys, "canary", "start", "v0002", "--share", "0.1", *target)[0] == 0
    code, out, _ = run(capsys, "online-report", "--window-s", "600", "--alpha", "0.1", *target)
    assert code == 0 and "intervals at 90%" in out
    assert out.strip().splitlines()[-1] == (
        "trial v0002 minus live v0001, ratings since the trial began 90 s ago: "
        "+0.250 [-0.500, +1.000] (n 12 and 30)"
    )
    sent = fake.script.online_requests[-1]
    assert (sent.window_s, sent.alpha) == (600, 0.1)
    assert "shadow" not in out

    assert run(capsys, "canary", "rollback", *target)[0] == 0
    assert run(capsys, "canary", "start", "v0002", "--shadow", "--share", "0.1", *target)[0] == 0
    code, out, _ = run(capsys, "online-report", *target)
    assert out.strip().splitlines()[-1] == (
        "shadow v0002, off-policy on 25 rated live generations it scored: lower bound -0.400, "
        "estimate +0.125 (live served +0.250), effective n 20, 4.0% of ratios clipped at 2"
    )


def test_online_report_json_is_machine_readable_and_bad_flags_exit_5_or_4(capsys, fake):
    target = ("--target", fake.target)
    code, out, _ = run(capsys, "online-report", "--version", "v0001", "--json", *target)
    assert code == 0
    report = json.loads(out)  # no NaN: a version without ratings has a null mean
    assert list(fake.script.online_requests[-1].versions) == ["v0001"]
    assert report["versions"][0]["rating"] == {
        "count": 40, "mean": 0.25, "low": -0.125, "high": 0.625
    }  # fmt: skip
    assert report["versions"][1]["rating"]["mean"] is None
    assert report["trial_comparison"] is None
    code, _, err = run(capsys, "online-report", "--alpha", "2", *target)
    assert code == 5
    assert_one_line_error(err, "INVALID_ARGUMENT", "alpha")
    code, _, err = run(capsys, "online-report", "--version", "v0099", *target)
    assert code == 4
    assert_one_line_error(err, "NOT_FOUND", "versions")
    assert run(capsys, "online-report", "--window-s", "soon", *target)[0] == 2


def test_canary_refusals_exit_5_and_bad_flags_exit_2(capsys, fake):
    target = ("--target", fake.target)
    code, _, err = run(capsys, "canary", "rollback", *target)
    assert code == 5
    assert_one_line_error(err, "FAILED_PRECONDITION", "no trial")
    code, _, err = run(capsys, "canary", "start", "v0002", "--share", "2", *target)
    assert code == 5
    assert_one_line_error(err, "INVALID_ARGUMENT", "share")
    code, _, err = run(capsys, "set-live", "v0002", "--expect-live", "v0002", *target)
    assert code == 5
    assert_one_line_error(err, "ABORTED", "v0002")
    assert run(capsys, "canary", "start", "v0002", *target)[0] == 2  # --share is required
    assert run(capsys, "trainer", "stop", *target)[0] == 2


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_invalid_argument_exits_5_with_the_servers_message(capsys, fake):
    code, out, err = run(capsys, "generate", "  ", "--target", fake.target)
    assert (code, out) == (5, "")
    assert_one_line_error(err, "feedloop generate: INVALID_ARGUMENT", "prompt")


def test_not_found_exits_4_and_failed_precondition_exits_5(capsys, fake):
    code, _, err = run(capsys, "set-live", "v0099", "--target", fake.target)
    assert code == 4
    assert_one_line_error(err, "NOT_FOUND", "v0099")
    code, _, err = run(capsys, "rollback", "--target", fake.target)
    assert code == 5
    assert_one_line_error(err, "FAILED_PRECONDITION", "nothing to roll back")


def test_wrong_api_key_exits_6_and_the_key_can_come_from_the_environment(capsys, fake, monkeypatch):
    fake.script.required_api_key = "k1"
    code, _, err = run(capsys, "status", "--target", fake.target, "--api-key", "nope")
    assert code == 6
    assert_one_line_error(err, "UNAUTHENTICATED")
    monkeypatch.setenv("FEEDLOOP_API_KEY", "k1")
    monkeypatch.setenv("FEEDLOOP_TARGET", fake.target)
    code, out, _ = run(capsys, "status")
    assert code == 0 and "v0001" in out


def test_unreachable_server_exits_3_after_its_retries(capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = run(
        capsys, "status", "--target", f"127.0.0.1:{port}", "--timeout", "2", "--retries", "1"
    )
    assert code == 3
    assert_one_line_error(err, "UNAVAILABLE", f"127.0.0.1:{port}")


def test_usage_errors_exit_2(capsys, fake, tmp_path):
    assert run(capsys, "generate")[0] == 2  # prompt missing
    assert run(capsys, "feedback", "rate", "g1", "high")[0] == 2  # score not a number
    assert run(capsys, "feedback", "rate", "g1", "1", "--scale", "percent")[0] == 2
    assert run(capsys, "status", "--timeout", "0")[0] == 2
    code, _, err = run(
        capsys, "status", "--target", fake.target, "--ca-cert", str(tmp_path / "missing.pem")
    )
    assert code == 2
    assert_one_line_error(err, "missing.pem")


def test_exit_code_table_covers_the_documented_codes():
    expected = {
        grpc.StatusCode.UNAVAILABLE: 3,
        grpc.StatusCode.DEADLINE_EXCEEDED: 3,
        grpc.StatusCode.NOT_FOUND: 4,
        grpc.StatusCode.INVALID_ARGUMENT: 5,
        grpc.StatusCode.ABORTED: 5,
        grpc.StatusCode.UNAUTHENTICATED: 6,
        grpc.StatusCode.PERMISSION_DENIED: 6,
        grpc.StatusCode.INTERNAL: 1,
        grpc.StatusCode.UNKNOWN: 1,
    }
    for code, exit_code in expected.items():
        assert commands.exit_code_for(code) == exit_code

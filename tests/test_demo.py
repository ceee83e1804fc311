"""`feedloop demo`: starts server and trainer, drives feedback through them, reports, and never
leaves a process behind, whether it ends on time or is stopped by a signal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feedloop.client.types import Comparison, Correction, Ranking, Rating
from feedloop.demo.population import parse_mix, to_client_event
from feedloop.demo.report import judge, plot_reward, rolling_mean
from feedloop.demo.tracker import DemoStats, Served, Swap, VersionStats


def version(name: str, rewards: list[float]) -> VersionStats:
    stats = VersionStats(name, 0.0)
    stats.add(rewards)
    return stats


ROUNDS = {"published": 2}


def test_verdict_is_improved_only_when_the_gain_beats_the_margin_and_the_noise():
    baseline = version("v0001", [0.0, 0.1] * 50)
    better = version("v0003", [0.4, 0.5] * 50)
    swaps = [Swap(10, "v0001", "v0002"), Swap(20, "v0002", "v0003")]
    verdict = judge(
        [baseline, version("v0002", [0.1]), better],
        "v0001",
        swaps,
        min_improvement=0.03,
        min_candidates=40,
        round_counts=ROUNDS,
    )
    assert verdict.improved and verdict.final is not None and verdict.final.version == "v0003"
    same = version("v0002", [0.0, 0.12] * 50)
    verdict = judge(
        [baseline, same],
        "v0001",
        swaps[:1],
        min_improvement=0.03,
        min_candidates=40,
        round_counts=ROUNDS,
    )
    assert not verdict.improved and "no clear improvement" in verdict.message


def test_verdict_explains_why_when_nothing_went_live_or_could_be_measured():
    baseline = version("v0001", [0.2] * 100)
    verdict = judge(
        [baseline],
        "v0001",
        [],
        min_improvement=0.03,
        min_candidates=40,
        round_counts={"refused": 3},
    )
    assert not verdict.improved and "none passed the gate" in verdict.message
    verdict = judge(
        [baseline, version("v0002", [1.0] * 5)],
        "v0001",
        [Swap(5, "v0001", "v0002")],
        min_improvement=0.03,
        min_candidates=40,
        round_counts=ROUNDS,
    )
    assert not verdict.improved and "too late to measure" in verdict.message
    verdict = judge([], "v0001", [], min_improvement=0.03, min_candidates=40, round_counts={})
    assert not verdict.improved and "too little traffic" in verdict.message


def test_stats_count_swaps_rounds_and_reward_per_version():
    stats = DemoStats()
    stats.observe_live("v0001")
    stats.record_request("v0001", [0.0, 1.0], feedback_events=2)
    stats.observe_live("v0002")
    stats.observe_trainer_line("feedloop train: round 3: published v0002 new_events=180 (gate ok)")
    stats.observe_trainer_line("feedloop train: metrics=127.0.0.1:1 store=x")
    assert stats.initial_version == "v0001" and [s.live for s in stats.swaps] == ["v0002"]
    assert stats.round_counts() == {"published": 1}
    assert stats.versions["v0001"].mean_reward == 0.5 and stats.feedback_events == 2


def test_stats_keep_exploration_out_of_the_versions_figures():
    stats = DemoStats()
    stats.record_request("v0001", [1.0, 1.0], 2)
    stats.record_request("v0001", [0.0, 0.5], 2, "exploration")
    assert stats.versions["v0001"].mean_reward == 1.0 and stats.versions["v0001"].requests == 1
    assert stats.exploration.requests == 1 and stats.exploration.mean_reward == 0.25
    assert stats.requests == 2 and stats.feedback_events == 4
    assert [s.served_as for s in stats.samples] == ["live"]


def test_reward_plot_is_a_png_with_every_version_and_swap(tmp_path):
    assert rolling_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    stats = DemoStats()
    stats.samples = [Served(i * 0.1, "v0001" if i < 50 else "v0002", i / 100) for i in range(100)]
    stats.swaps = [Swap(5.0, "v0001", "v0002")]
    path = plot_reward(stats, tmp_path / "plots" / "reward.png", preference="include:little")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_feedback_mix_parsing_and_simulated_feedback_conversion():
    from feedloop.demo.simusers import SimulatedFeedback

    assert parse_mix("rating=1,comparison=0.5") == {"rating": 1.0, "comparison": 0.5}
    for bad in ("rating", "likes=1", "rating=0", "rating=-1,comparison=1"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    assert to_client_event(SimulatedFeedback("rating", ["a"], score=4, scale="stars5")) == Rating(
        "a", 4.0, scale="stars5"
    )
    assert to_client_event(SimulatedFeedback("comparison", ["a", "b"])) == Comparison("a", "b")
    assert to_client_event(SimulatedFeedback("ranking", ["a", "b", "c"])) == Ranking(
        ("a", "b", "c")
    )
    assert to_client_event(SimulatedFeedback("correction", ["a"], text="x")) == Correction("a", "x")


def demo_command(tmp_path: Path, checkpoint: Path, duration_s: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "feedloop.client.cli",
        "demo",
        "--checkpoint",
        str(checkpoint),
        "--duration-s",
        str(duration_s),
        "--no-live",
        "--data-dir",
        str(tmp_path / "data"),
        "--plot",
        str(tmp_path / "reward.png"),
        "--users",
        "4",
        "--rate-rps",
        "8",
        "--min-candidates",
        "1",
        "--trainer-arg=--wake-after-feedback-events",
        "--trainer-arg=40",
        "--trainer-arg=--min-feedback-events",
        "--trainer-arg=16",
    ]


def child_pids(output: str) -> list[int]:
    match = re.search(r"\(pid (\d+)\), trainer pid (\d+)", output)
    assert match, output
    return [int(match[1]), int(match[2])]


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_short_demo_runs_the_loop_reports_and_leaves_no_process(tmp_path, tiny_checkpoint):
    result = subprocess.run(
        demo_command(tmp_path, tiny_checkpoint, 15), capture_output=True, text=True, timeout=240
    )
    output = result.stdout + result.stderr
    assert result.returncode in (0, 1), output  # 1: a tiny model in 15 s may not improve
    assert "feedloop demo: metrics at http://127.0.0.1:" in output
    summary = re.search(r"feedloop demo: (\d+) requests, (\d+) feedback events", output)
    assert summary and int(summary[1]) > 0 and int(summary[2]) > 0, output
    assert "per version" in output and "v0001" in output
    assert re.search(r"feedloop demo: (the loop improved|no )", output), output
    assert (tmp_path / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "data" / "serve.log").exists()
    assert_gone(child_pids(output))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_the_demo_and_every_process_it_started(tmp_path, tiny_checkpoint, sig):
    process = subprocess.Popen(
        demo_command(tmp_path, tiny_checkpoint, 120),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until users are running (first progress line)
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("["):
            break
    output = "".join(lines)
    pids = child_pids(output)
    process.send_signal(sig)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output + rest
    assert "interrupted; server, trainer and users stopped" in rest
    assert_gone(pids)


def test_demo_usage_errors_exit_2_before_starting_anything(capsys):
    from feedloop.demo.cli import main

    assert main(["demo", "--preference", "loud"]) == 2
    assert "unknown preference" in capsys.readouterr().err
    assert main(["demo", "--feedback-mix", "likes=1"]) == 2
    assert main(["demo", "--users", "0"]) == 2


def test_demo_that_cannot_start_says_why_in_one_line_and_keeps_its_logs(tmp_path, capsys):
    from feedloop.demo.cli import main

    code = main(
        [
            "demo",
            "--checkpoint",
            str(tmp_path / "missing"),
            "--data-dir",
            str(tmp_path / "data"),
            "--no-live",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "missing" in err and f"logs kept in {tmp_path / 'data'}" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_short_demo_runs_on_a_hugging_face_policy(tmp_path, hf_checkpoint):
    # Issue 16: the same demo (server, trainer, simulated users) on a transformers policy.
    result = subprocess.run(
        demo_command(tmp_path, hf_checkpoint, 20), capture_output=True, text=True, timeout=240
    )
    output = result.stdout + result.stderr
    assert result.returncode in (0, 1), output
    summary = re.search(r"feedloop demo: (\d+) requests, (\d+) feedback events", output)
    assert summary and int(summary[1]) > 0 and int(summary[2]) > 0, output
    assert "per version" in output and "v0001" in output
    # The trainer published at least one version of its own, as a transformers checkpoint.
    versions = tmp_path / "data" / "registry" / "versions"
    published = [json.loads((v / "manifest.json").read_text()) for v in versions.iterdir()]
    assert len(published) >= 2, output
    assert {m["architecture"] for m in published} == {"hf-causal-lm"}, published
    assert_gone(child_pids(output))

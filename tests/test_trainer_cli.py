"""`feedloop train` as a real process: start line, --once, SIGTERM, SIGKILL at any instant."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from trainer_support import FAST_FLAGS, Env, make_env, one_torch_thread, simulation

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.registry import open_registry
from feedloop.demo.simusers import Length

__all__ = ["one_torch_thread"]


@pytest.fixture
def env(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Env]:
    environment = make_env(tmp_path, tiny_checkpoint)
    simulation(environment, Length(3)).serve_events(60)
    yield environment
    environment.close()


def train_command(env: Env, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "feedloop.client.cli",
        "train",
        "--data-dir",
        str(env.root),
        "--store",
        str(env.root / "replay.sqlite3"),
        "--registry",
        str(env.root / "registry"),
        *FAST_FLAGS,
        "--poll-interval-s",
        "0.05",
        *extra,
    ]


def start(env: Env, *extra: str) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FEEDLOOP_")}
    return subprocess.Popen(
        train_command(env, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
    )


def read_until(proc: subprocess.Popen[str], needle: str, timeout_s: float = 120) -> list[str]:
    """Lines of the process's output up to the first containing needle."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never printed; output so far:\n" + "\n".join(lines))


def test_train_once_prints_its_start_line_runs_one_round_and_exits_0(env: Env) -> None:
    proc = start(env, "--once")
    try:
        lines = read_until(proc, "round 1:")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    start_line = lines[0]
    assert start_line.startswith("feedloop train: metrics=127.0.0.1:")
    assert f"store={env.root / 'replay.sqlite3'}" in start_line
    assert f"registry={env.root / 'registry'}" in start_line
    assert "published v0002" in lines[-1]
    assert open_registry(env.root / "registry").live() == "v0002"


def test_with_log_format_json_a_rounds_line_carries_its_round_version_and_outcome(
    env: Env,
) -> None:
    proc = start(env, "--once", "--log-format", "json")
    try:
        lines = read_until(proc, '"round": 1')
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert lines[0].startswith("feedloop train: metrics=")  # the human start line stays
    record = json.loads(lines[-1])
    assert record["logger"] == "feedloop.trainer" and record["message"].startswith("round 1:")
    assert (record["round"], record["version"], record["outcome"]) == (1, "v0002", "published")


@pytest.mark.slow
def test_train_nproc_2_runs_the_update_on_two_ranks_and_publishes_from_rank_0(env: Env) -> None:
    proc = start(env, "--once", "--nproc", "2", "--nice", "0")
    try:
        lines = read_until(proc, "round 1:")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert "nproc=2" in lines[0]
    assert "published v0002" in lines[-1]
    assert open_registry(env.root / "registry").live() == "v0002"


@pytest.mark.slow
def test_train_under_torchrun_runs_the_update_on_its_ranks_and_publishes_from_rank_0(
    env: Env,
) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = train_command(env, "--once", "--nice", "0")
    cli = command.index("feedloop.client.cli")
    argv = [*torchrun, "--nproc-per-node", "2", "-m", *command[cli:]]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FEEDLOOP_")}
    out = subprocess.run(argv, capture_output=True, text=True, env=environment, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("feedloop train:")]
    # one trainer (rank 0) started; the other rank only served its update
    assert [line for line in lines if line.startswith("feedloop train: metrics=")] == lines[:1]
    assert "nproc=2" in lines[0]
    assert any("round 1: published v0002" in line for line in lines), out.stdout
    assert open_registry(env.root / "registry").live() == "v0002"


def test_train_refuses_nproc_0_naming_the_field(env: Env) -> None:
    out = subprocess.run(
        train_command(env, "--once", "--nproc", "0"), capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "nproc must be > 0" in out.stderr


def test_train_serves_metrics_and_exits_0_on_sigterm(env: Env) -> None:
    proc = start(env)
    try:
        first = read_until(proc, "feedloop train: metrics=")[-1]
        address = first.split("metrics=")[1].split()[0]
        read_until(proc, "round 1:")
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        assert 'feedloop_trainer_rounds_total{outcome="published"} 1.0' in body
        # process_* of the trainer process itself (a torch process holds well over 10 MB)
        rss = next(x for x in body.splitlines() if x.startswith("process_resident_memory_bytes "))
        assert float(rss.split()[1]) > 10_000_000
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_a_bad_option_value_is_a_usage_error_naming_the_option(env: Env) -> None:
    done = subprocess.run(
        train_command(env, "--once", "--learning-rate", "fast"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "learning_rate" in done.stderr


def registry_is_valid(root: Path) -> str:
    """Every published version verifies and the live pointer names one; returns live."""
    registry = open_registry(root / "registry")
    live = registry.live()
    assert live in registry.versions()
    for version in registry.versions():
        load_checkpoint(registry.checkpoint_dir(version))
    assert not any((root / "registry" / ".staging").iterdir())
    return str(live)


@pytest.mark.parametrize("kill_after_s", [0.5, 3.0])
def test_sigkill_at_any_instant_loses_nothing_published_and_a_restart_resumes(
    env: Env, kill_after_s: float
) -> None:
    proc = start(env, "--once")
    read_until(proc, "feedloop train: metrics=")
    time.sleep(kill_after_s)  # an arbitrary instant inside the round is the point of the test
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    live_before = registry_is_valid(env.root)
    assert live_before in ("v0001", "v0002")

    again = start(env, "--once")
    try:
        lines = read_until(again, "round")
        assert again.wait(timeout=120) == 0
    finally:
        again.kill()
    live_after = registry_is_valid(env.root)
    cursor = env.store.get_cursor("trainer") or {}
    # Either the first run finished its round (and the restart finds nothing new), or the
    # restart trained on the whole window: in both cases every event is consumed exactly once.
    assert cursor.get("feedback_seq") == env.store.max_seq()[1]
    if live_before == "v0002":
        assert live_after == "v0002" and "too little data" in lines[-1]
    else:
        assert live_after == "v0002" and "published" in lines[-1]


def test_lora_over_a_live_version_that_is_no_hugging_face_model_is_refused_at_startup(
    env: Env,
) -> None:
    proc = start(env, "--once", "--lora-rank", "4")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert (
        "feedloop train: --lora-rank 4 trains adapters over a Hugging Face causal LM "
        "(hf-causal-lm); the live version v0001 is gru-seq2seq" in out
    )
    assert " round " not in out  # it never started a round

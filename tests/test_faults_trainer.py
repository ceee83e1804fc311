"""Fault matrix, trainer side: SIGKILL of `feedloop train` mid-round and mid-publish.

Promise 5: the trainer is restartable. Killing it at any instant loses no published state and
leaves the registry valid; the live version keeps serving; the restarted trainer resumes from
its own cursor (and never trains twice on a window it already published from). The instants
are hit exactly (tests/faults_trainer_run.py freezes the real CLI there), then the process is
killed with SIGKILL while a real `feedloop serve` serves from the same registry.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from faults_procs import server_process, sigkill, wait_for
from faults_store import small_disk
from trainer_support import FAST_FLAGS, make_env, simulation

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.registry import DirectoryRegistry
from feedloop.core.store import open_store
from feedloop.demo.processes import feedloop_command, start_child
from feedloop.demo.simusers import IncludeWord
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def train_flags(data_dir: Path) -> list[str]:
    """Small, fast rounds (as in tests/test_trainer_cli.py), on one torch thread."""
    return ["--data-dir", str(data_dir), *FAST_FLAGS, "--torch-threads", "1"]


def valid_registry(root: Path) -> DirectoryRegistry:
    """Open the registry as a restarted process would; assert everything in it is usable."""
    registry = DirectoryRegistry(root)  # drops staging leftovers of killed publishes
    versions = registry.versions()
    for version in versions:
        load_checkpoint(registry.checkpoint_dir(version))  # verifies checksums, shapes, finite
    assert registry.live() in versions
    assert list((root / ".staging").iterdir()) == []
    for line in (root / "history.jsonl").read_text(encoding="utf-8").splitlines():
        json.loads(line)  # no torn history line
    return registry


def served_version(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(prompt="still serving", num_candidates=2), timeout=20
        )
    assert len(reply.candidates) == 2
    return reply.model_version


def trainer_cursor(data_dir: Path) -> dict | None:
    store = open_store(str(data_dir / "replay.sqlite3"))
    try:
        return store.get_cursor("trainer")
    finally:
        store.close()


@pytest.mark.parametrize("pause_at", ["mid-update", "publish-copy", "cursor-write"])
def test_sigkill_of_the_trainer_leaves_a_valid_registry_a_serving_server_and_it_resumes(
    tmp_path: Path, tiny_checkpoint: Path, pause_at: str
) -> None:
    env = make_env(tmp_path, tiny_checkpoint)
    simulation(env, IncludeWord("little")).serve_events(40)
    last_feedback_seq = env.store.max_seq()[1]
    env.close()
    registry_root = tmp_path / "registry"

    with server_process(tmp_path) as server:
        address = server.banner["grpc"]
        assert served_version(address) == "v0001"
        marker = tmp_path / "paused"
        frozen = start_child(
            "feedloop train (frozen)",
            [
                sys.executable,
                str(HERE / "faults_trainer_run.py"),
                "--pause-at",
                pause_at,
                "--marker",
                str(marker),
                "--",
                *train_flags(tmp_path),
            ],
            log_path=tmp_path / "train-killed.log",
            banner_prefix="feedloop train: metrics=",
        )
        try:
            wait_for(marker.exists, timeout_s=180, interval_s=0.05)
            if pause_at == "publish-copy":
                assert list((registry_root / ".staging").iterdir()), "not killed mid-publish"
        finally:
            sigkill(frozen)

        registry = valid_registry(registry_root)
        published = pause_at == "cursor-write"  # the kill came after publish + make live
        assert registry.versions() == (["v0001", "v0002"] if published else ["v0001"])
        assert trainer_cursor(tmp_path) is None
        live_after_kill = registry.live()
        wait_for(lambda: served_version(address) == live_after_kill, timeout_s=30)

        restarted = subprocess.run(
            feedloop_command("train", *train_flags(tmp_path), "--once"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        rounds = [line for line in restarted.stdout.splitlines() if ": round " in line]
        assert len(rounds) == 1, restarted.stdout

        registry = valid_registry(registry_root)
        if published:
            # The manifest of v0002 says which window it consumed: no second training on it.
            assert "skipped" in rounds[0], rounds[0]
            assert registry.versions() == ["v0001", "v0002"]
        else:
            # Resumed from the cursor it had (none): the same window, trained from scratch.
            assert " published " in rounds[0] or " refused " in rounds[0], rounds[0]
            cursor = trainer_cursor(tmp_path)
            assert cursor is not None and cursor["feedback_seq"] == last_feedback_seq
        wait_for(lambda: served_version(address) == registry.live(), timeout_s=30)


# -- the registry's disk fills up during a publish ---------------------------------------------


@pytest.fixture
def full_registry_disk(tmp_path: Path, tiny_checkpoint: Path):
    """A registry with v0001 live on a small tmpfs that is then filled to the last page."""
    with small_disk(tmp_path / "disk", 8 * 1024 * 1024) as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        root = tmp_path / "disk" / "registry"
        DirectoryRegistry(root).publish(tiny_checkpoint, reason="seed", make_live=True)
        disk.fill()
        yield root, disk


def test_a_publish_that_hits_a_full_disk_fails_and_leaves_the_registry_valid(
    full_registry_disk, tiny_checkpoint: Path
) -> None:
    root, disk = full_registry_disk
    registry = DirectoryRegistry(root)
    with pytest.raises(OSError):
        registry.publish(tiny_checkpoint, reason="no room", make_live=True)
    # Read through the object already open (reopening would clean staging leftovers).
    assert registry.versions() == ["v0001"] and registry.live() == "v0001"
    load_checkpoint(registry.checkpoint_dir("v0001"))
    disk.free()
    assert registry.publish(tiny_checkpoint, reason="room again", make_live=True) == "v0002"
    assert valid_registry(root).live() == "v0002"


def test_a_failed_publish_leaves_no_partial_copy_behind(
    full_registry_disk, tiny_checkpoint: Path
) -> None:
    root, _ = full_registry_disk
    registry = DirectoryRegistry(root)
    with pytest.raises(OSError):
        registry.publish(tiny_checkpoint, reason="no room")
    assert list((root / ".staging").iterdir()) == []

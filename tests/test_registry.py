import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.errors import RegistryError, UnknownVersionError
from feedloop.core.registry import PUBLISHED, REFUSED, Decision, DirectoryRegistry, open_registry


def test_publish_lists_and_loads_versions_in_order(tiny_checkpoint, tmp_path):
    reg = DirectoryRegistry(tmp_path / "reg")
    assert reg.versions() == [] and reg.live() is None
    v1 = reg.publish(tiny_checkpoint, reason="seed")
    v2 = reg.publish(tiny_checkpoint, reason="round 1", details={"reward": 0.5})
    assert (v1, v2) == ("v0001", "v0002") and reg.versions() == [v1, v2]
    assert reg.manifest(v2).version == v2
    _, manifest = load_checkpoint(reg.checkpoint_dir(v2))
    assert manifest.version == v2
    assert reg.live() is None  # publishing alone does not make live


def test_set_live_rollback_and_history(tiny_checkpoint, tmp_path):
    reg = DirectoryRegistry(tmp_path / "reg")
    v1 = reg.publish(tiny_checkpoint, make_live=True)
    v2 = reg.publish(tiny_checkpoint)
    reg.set_live(v2, reason="gate passed")
    assert reg.pointer().live == v2 and reg.pointer().previous == (v1,)
    back = reg.rollback(reason="reward dropped")
    assert back.live == v1 and back.previous == ()
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    reg.record(Decision("candidate-7", REFUSED, "perplexity ratio 1.6 > 1.3", {"ppl_ratio": 1.6}))
    actions = [(d.version, d.action) for d in reg.history()]
    assert actions == [
        ("candidate-7", "refused"),
        (v1, "rolled_back"),
        (v2, "promoted"),
        (v2, "published"),
        (v1, "promoted"),
        (v1, "published"),
    ]
    assert reg.history(limit=1)[0].details == {"ppl_ratio": 1.6}
    # A new registry object on the same directory sees the same state.
    assert open_registry(tmp_path / "reg").pointer() == reg.pointer()


def test_unknown_versions_are_refused(tiny_checkpoint, tmp_path):
    reg = DirectoryRegistry(tmp_path / "reg")
    with pytest.raises(UnknownVersionError):
        reg.set_live("v0042")
    with pytest.raises(UnknownVersionError):
        reg.checkpoint_dir("../../etc")


def test_wait_for_change_wakes_on_a_new_live_version(tiny_checkpoint, tmp_path):
    reg = DirectoryRegistry(tmp_path / "reg", poll_interval_s=0.02)
    v1 = reg.publish(tiny_checkpoint, make_live=True)
    seen = reg.pointer()
    assert reg.wait_for_change(seen, timeout_s=0.05).live == v1
    v2 = reg.publish(tiny_checkpoint)
    threading.Timer(0.1, lambda: DirectoryRegistry(tmp_path / "reg").set_live(v2)).start()
    started = time.monotonic()
    assert reg.wait_for_change(seen, timeout_s=5).live == v2
    assert time.monotonic() - started < 2


def test_a_torn_history_line_is_skipped(tiny_checkpoint, tmp_path):
    reg = DirectoryRegistry(tmp_path / "reg")
    reg.publish(tiny_checkpoint)
    with open(tmp_path / "reg" / "history.jsonl", "a") as f:
        f.write('{"version": "v0002", "act')
    assert [d.action for d in reg.history()] == [PUBLISHED]


PUBLISH_FOREVER = """
import sys
from pathlib import Path
from feedloop.core.registry import DirectoryRegistry
reg = DirectoryRegistry(Path(sys.argv[1]))
print("ready", flush=True)
while True:
    reg.publish(Path(sys.argv[2]), make_live=False)
"""


@pytest.mark.parametrize("delay_s", [0.05, 0.13, 0.31])
def test_a_publish_killed_at_any_instant_leaves_the_registry_valid(
    tiny_checkpoint, tmp_path, delay_s
):
    root = tmp_path / "reg"
    reg = DirectoryRegistry(root)
    live = reg.publish(tiny_checkpoint, make_live=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_FOREVER, str(root), str(tiny_checkpoint)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(delay_s)  # let it get mid-way through some publish, then kill it without warning
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = DirectoryRegistry(root)  # reopening cleans the staging area
    assert after.live() == live
    assert not any((root / ".staging").iterdir())
    for version in after.versions():
        load_checkpoint(after.checkpoint_dir(version))  # every listed version is whole
    assert after.publish(tiny_checkpoint) == f"v{len(after.versions()):04d}"

"""Registry retention keeps what serving and training need, deletes the rest's weights on both
backends, survives a crash midway, and refuses to serve, try or pin what it pruned."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pg_support import fresh_schema, schema_url

from feedloop.core.checkpoint import load_checkpoint, read_manifest, write_manifest
from feedloop.core.errors import PrunedVersionError, UnknownVersionError
from feedloop.core.registry import CANARY, LivePointer, ModelRegistry, Trial
from feedloop.core.registry.directory import DirectoryRegistry
from feedloop.core.registry.pointer import PINNED, PRUNED, UNPINNED
from feedloop.core.registry.retention import (
    RegistrySnapshot,
    RetentionPolicy,
    VersionFacts,
    plan_prune,
)


def ope(value: float) -> dict[str, Any]:
    """A training summary with the gate's recorded off-policy value."""
    return {"ope_estimator": "dr", "ope_candidate": {"dr": {"value": value}}}


def test_plan_keeps_every_protected_version_and_prunes_the_rest() -> None:
    names = [f"v{n:04d}" for n in range(1, 21)]
    summaries: dict[str, dict[str, Any]] = {
        "v0004": ope(0.9),
        "v0006": ope(0.8),
        "v0007": ope(0.1),
        "v0012": {"reference_version": "v0003", **ope(0.2)},
    }
    facts = {
        v: VersionFacts(
            None if v == "v0001" else names[i - 1], summaries.get(v, {}), pruned=v == "v0002"
        )
        for i, v in enumerate(names)
    }
    pointer = LivePointer(
        "v0012",
        previous=("v0005", "v0008", "v0011", "v0012", "v0010", "v0009"),
        trial=Trial("v0013", CANARY, 0.1, "2026-01-01T00:00:00+00:00", "v0012"),
    )
    snapshot = RegistrySnapshot(facts, pointer, frozenset({"v0014"}))
    policy = RetentionPolicy(keep_last=3, keep_best=2, keep_rollback=3)

    plan = plan_prune(snapshot, policy, reference="v0015")

    assert plan.keep == {
        "v0001": ("reference",),  # the root of live's and the trial's lineage
        "v0003": ("reference",),  # the reference live's round recorded
        "v0004": ("best",),
        "v0006": ("best",),
        "v0009": ("rollback",),
        "v0010": ("rollback",),
        "v0011": ("rollback",),  # v0012 on the stack is live itself, not a rollback target
        "v0012": ("live",),
        "v0013": ("trial",),
        "v0014": ("pinned",),
        "v0015": ("reference",),  # the one the caller (the trainer's config) names
        "v0018": ("last",),
        "v0019": ("last",),
        "v0020": ("last",),
    }
    # v0002 was pruned before: neither kept nor pruned again.
    assert plan.prune == ("v0005", "v0007", "v0008", "v0016", "v0017")


@pytest.mark.parametrize(
    "knobs",
    [{"keep_last": 0}, {"keep_best": -1}, {"keep_rollback": 1.5}],
)
def test_a_policy_that_could_prune_the_newest_or_makes_no_sense_is_refused(
    knobs: dict[str, Any],
) -> None:
    (name,) = knobs
    with pytest.raises(ValueError, match=name):
        RetentionPolicy(**knobs)


# -- both backends --------------------------------------------------------------------------


@pytest.fixture(params=["directory", pytest.param("postgres", marks=pytest.mark.postgres)])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], ModelRegistry]]:
    """Opens the same registry again on each call (a new process would), closed after."""
    opened: list[ModelRegistry] = []
    with fresh_schema("retention") if request.param == "postgres" else _no_schema() as schema:

        def open_one() -> ModelRegistry:
            if schema is None:
                registry: ModelRegistry = DirectoryRegistry(tmp_path / "registry")
            else:
                from feedloop.core.registry.postgres import PostgresRegistry

                registry = PostgresRegistry(
                    schema_url(schema), cache_dir=tmp_path / f"cache{len(opened)}"
                )
            opened.append(registry)
            return registry

        yield open_one
        for registry in opened:
            registry.close()


class _no_schema:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def checkpoint(source: Path, folder: Path, parent: str | None, **summary: Any) -> Path:
    """A copy of a real checkpoint whose manifest names a parent and carries a summary."""
    shutil.copytree(source, folder)
    manifest = read_manifest(folder)
    write_manifest(
        folder, dataclasses.replace(manifest, parent_version=parent, training_summary=summary)
    )
    return folder


def lineage(registry: ModelRegistry, source: Path, tmp_path: Path, count: int) -> list[str]:
    """count versions, each trained from the one before and made live in turn."""
    published: list[str] = []
    for i in range(count):
        parent = published[-1] if published else None
        folder = checkpoint(source, tmp_path / f"ckpt{i}", parent, round=i)
        published.append(registry.publish(folder, make_live=True))
    return published


def test_prune_deletes_weights_keeps_manifests_and_decisions(
    opener: Callable[[], ModelRegistry], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    registry = opener()
    v = lineage(registry, tiny_checkpoint, tmp_path, 8)
    before = registry.size_bytes()
    policy = RetentionPolicy(keep_last=2, keep_best=0, keep_rollback=1)

    assert registry.prune(policy, dry_run=True).prune == tuple(v[1:6])
    assert registry.versions() == v and registry.size_bytes() == before  # a dry run deletes nothing

    plan = registry.prune(policy, reason="test")
    assert plan.prune == tuple(v[1:6])
    # Kept: the root (the KL leash's reference), the rollback target v7, live v8 (also last).
    assert registry.versions() == [v[0], v[6], v[7]]
    assert registry.pruned_versions() == v[1:6]
    assert registry.size_bytes() < before * 4 / 8
    assert registry.manifest(v[2]).training_summary == {"round": 2}  # manifests stay
    with pytest.raises(PrunedVersionError, match=v[2]):
        registry.checkpoint_dir(v[2])
    pruned = [d for d in registry.history() if d.action == PRUNED]
    assert sorted(d.version for d in pruned) == v[1:6] and pruned[0].reason == "test"
    assert all(d.details["freed_bytes"] > 0 for d in pruned)
    assert len(registry.history()) == 8 * 2 + 5  # every published and promoted decision stays
    assert registry.lineage_root(v[7]) == v[0]  # walks through pruned versions
    # Nothing more to prune; a new version publishes past the pruned numbers.
    assert registry.prune(policy).prune == ()
    assert registry.publish(checkpoint(tiny_checkpoint, tmp_path / "next", v[7])) == "v0009"


def test_a_pruned_version_cannot_be_made_live_rolled_back_to_tried_or_pinned(
    opener: Callable[[], ModelRegistry], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    registry = opener()
    v = lineage(registry, tiny_checkpoint, tmp_path, 5)
    registry.prune(RetentionPolicy(keep_last=1, keep_best=0, keep_rollback=0))
    assert registry.versions() == [v[0], v[4]]
    pointer = registry.pointer()
    assert pointer.previous[-1] == v[3]  # the rollback stack still names pruned versions

    for attempt in (
        lambda: registry.set_live(v[2]),
        lambda: registry.rollback(reason="to a pruned one"),
        lambda: registry.start_trial(v[1], share=0.1),
        lambda: registry.pin(v[3]),
    ):
        with pytest.raises(PrunedVersionError, match=r"v000[2-4] was pruned"):
            attempt()
    assert registry.pointer() == pointer and registry.pins() == []  # nothing changed
    with pytest.raises(UnknownVersionError):
        registry.pin("v0042")
    registry.set_live(v[0], reason="a kept version still works")
    assert registry.live() == v[0]


def test_pinned_versions_survive_retention_until_unpinned(
    opener: Callable[[], ModelRegistry], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    registry = opener()
    v = lineage(registry, tiny_checkpoint, tmp_path, 4)
    assert registry.pin(v[1], reason="the launch version") is True
    assert registry.pin(v[1]) is False  # already pinned: nothing recorded
    policy = RetentionPolicy(keep_last=1, keep_best=0, keep_rollback=0)

    assert registry.prune(policy).prune == (v[2],)
    assert opener().pins() == [v[1]]  # another process sees the pin
    assert registry.unpin(v[1]) is True and registry.unpin(v[1]) is False
    assert registry.prune(policy).prune == (v[1],)
    actions = [(d.version, d.action) for d in registry.history(limit=4)]
    assert actions == [(v[1], PRUNED), (v[1], UNPINNED), (v[2], PRUNED), (v[1], PINNED)]


def test_best_versions_by_recorded_evaluation_are_kept(
    opener: Callable[[], ModelRegistry], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    registry = opener()
    values = [0.3, 0.9, None, 0.5, 0.1, 0.2]
    v: list[str] = []
    for i, value in enumerate(values):
        summary = ope(value) if value is not None else {}
        folder = checkpoint(tiny_checkpoint, tmp_path / f"b{i}", v[-1] if v else None, **summary)
        v.append(registry.publish(folder, make_live=True))
    plan = registry.prune(RetentionPolicy(keep_last=1, keep_best=2, keep_rollback=0))
    assert plan.keep == {
        v[0]: ("reference",),
        v[1]: ("best",),
        v[3]: ("best",),
        v[5]: ("live", "last"),
    }


# Prunes in a process of its own that stops between two steps of the prune and says so: after
# the directory backend has marked the first version pruned and deleted one of its files; after
# the PostgreSQL backend has marked the versions and deleted their files, before it records the
# decisions and commits. The test then kills it with SIGKILL: no handler, no `finally`, runs.
PRUNE_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from feedloop.core.registry import open_registry
from feedloop.core.registry.retention import RetentionPolicy

def stop_here():
    print("mid-prune", flush=True)
    time.sleep(120)

location = sys.argv[1]
if location.startswith("postgresql://"):
    from feedloop.core.registry import postgres
    insert = postgres._insert_decision
    def stalled_insert(conn, decision):
        if decision.action == "pruned":
            stop_here()
        insert(conn, decision)
    postgres._insert_decision = stalled_insert
else:
    from feedloop.core.registry import directory
    def stalled_delete(path):
        next(iter(directory._weight_files(path))).unlink()
        stop_here()
    directory._delete_weights = stalled_delete
registry = open_registry(location, data_dir=Path(sys.argv[2]))
registry.prune(RetentionPolicy(keep_last=1, keep_best=0, keep_rollback=0))
"""


def location_of(registry: ModelRegistry) -> str:
    if isinstance(registry, DirectoryRegistry):
        return str(registry.root)
    return str(registry.url)  # type: ignore[attr-defined]


def test_a_prune_killed_midway_leaves_a_registry_that_opens_lists_and_serves(
    opener: Callable[[], ModelRegistry], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    registry = opener()
    v = lineage(registry, tiny_checkpoint, tmp_path, 5)
    pruner = subprocess.Popen(
        [sys.executable, "-c", PRUNE_UNTIL_KILLED, location_of(registry), str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert pruner.stdout is not None and pruner.stdout.readline().strip() == "mid-prune"
    finally:
        os.kill(pruner.pid, signal.SIGKILL)
        pruner.wait()

    reopened = opener()  # a fresh process would open it so
    listed, pruned = reopened.versions(), reopened.pruned_versions()
    assert sorted(listed + pruned) == v and v[0] in listed and v[4] in listed
    if isinstance(reopened, DirectoryRegistry):
        assert pruned == [v[1]]  # marked before the kill: pruned, its leftovers deleted on open
        assert sorted(p.name for p in (reopened.root / "versions" / v[1]).iterdir()) == [
            "PRUNED",
            "manifest.json",
        ]
    else:
        assert pruned == []  # the transaction rolled back whole
    for version in listed:  # every listed version is whole: it verifies and loads
        load_checkpoint(reopened.checkpoint_dir(version))
    assert reopened.live() == v[4]
    assert [d.version for d in reopened.history() if d.action == "published"] == v[::-1]

    reopened.prune(RetentionPolicy(keep_last=1, keep_best=0, keep_rollback=0))  # finishes the job
    assert reopened.versions() == [v[0], v[4]]
    assert reopened.pruned_versions() == v[1:4]


def test_registry_prune_command_shows_a_dry_run_then_prunes(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from feedloop.client.cli import main

    registry = DirectoryRegistry(tmp_path / "registry")
    v = lineage(registry, tiny_checkpoint, tmp_path, 4)
    flags = ["--data-dir", str(tmp_path), "--registry-keep-last", "1", "--registry-keep-rollback"]
    assert main(["registry", "prune", *flags, "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would prune  {v[1]}" in out and "would prune 2 versions, kept 2" in out
    assert registry.versions() == v  # the dry run changed nothing

    assert main(["registry", "prune", *flags, "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["prune"] == v[1:3] and doc["keep"] == {v[0]: ["reference"], v[3]: ["live", "last"]}
    assert registry.versions() == [v[0], v[3]]

    assert main(["registry", "prune", *flags, "-1"]) == 2
    assert "keep_rollback must be an integer >= 0" in capsys.readouterr().err
    assert main(["registry", "prune", "--registry", str(tmp_path / "nowhere")]) == 1
    assert "no registry at" in capsys.readouterr().err

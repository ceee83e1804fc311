"""The PostgreSQL model registry keeps the directory registry's promises, shared over a database."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from pg_support import ADMIN_URL, fresh_schema, schema_url

from feedloop.core.checkpoint import TOKENIZER, WEIGHTS, Manifest, read_manifest, write_manifest
from feedloop.core.errors import CheckpointError, RegistryError, UnknownVersionError
from feedloop.core.migrations import migrate
from feedloop.core.registry import (
    PROMOTED,
    PUBLISHED,
    REFUSED,
    ROLLED_BACK,
    Decision,
    LivePointer,
    open_registry,
)
from feedloop.core.registry.postgres import _MIGRATIONS, PostgresRegistry

pytestmark = pytest.mark.postgres


def make_checkpoint(folder: Path, seed: int, size_bytes: int = 4096) -> Path:
    """A checkpoint folder the registry accepts: files plus a manifest with their sha256.

    The registry moves bytes and checks checksums; it never parses weights, so any bytes do.
    """
    folder.mkdir(parents=True)
    contents = {
        WEIGHTS: hashlib.sha256(str(seed).encode()).digest() * (size_bytes // 32),
        TOKENIZER: f'{{"seed": {seed}}}'.encode(),
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    write_manifest(
        folder,
        Manifest(
            version="unpublished",
            parent_version=None,
            architecture="gru",
            hyperparameters={"hidden_size": 8},
            files={name: hashlib.sha256(data).hexdigest() for name, data in contents.items()},
            created_at=datetime.now(UTC).isoformat(),
            parameter_count=size_bytes // 4,
            training_summary={"seed": seed},
        ),
    )
    return folder


@pytest.fixture
def url() -> Iterator[str]:
    with fresh_schema("registry") as schema:
        yield schema_url(schema)


@pytest.fixture
def opener(url: str, tmp_path: Path) -> Iterator[Callable[..., PostgresRegistry]]:
    opened: list[PostgresRegistry] = []

    def open_one(**kwargs: object) -> PostgresRegistry:
        kwargs.setdefault("cache_dir", tmp_path / f"cache{len(opened)}")
        registry = PostgresRegistry(url, **kwargs)  # type: ignore[arg-type]
        opened.append(registry)
        return registry

    yield open_one
    for registry in opened:
        registry.close()


@pytest.fixture
def registry(opener: Callable[..., PostgresRegistry]) -> PostgresRegistry:
    return opener()


def test_publish_numbers_versions_in_order_and_keeps_manifests(
    registry: PostgresRegistry, tmp_path: Path
) -> None:
    assert registry.versions() == [] and registry.live() is None
    first = registry.publish(make_checkpoint(tmp_path / "a", 1), reason="pretrained")
    second = registry.publish(make_checkpoint(tmp_path / "b", 2), details={"kl": 0.01})
    assert (first, second) == ("v0001", "v0002")
    assert registry.versions() == ["v0001", "v0002"]
    assert registry.manifest("v0002").version == "v0002"
    assert registry.manifest("v0002").training_summary == {"seed": 2}
    assert registry.live() is None  # publishing alone changes nothing that serves


def test_publish_make_live_promotes_in_the_same_step(
    registry: PostgresRegistry, tmp_path: Path
) -> None:
    version = registry.publish(make_checkpoint(tmp_path / "a", 1), make_live=True, reason="seed")
    assert registry.pointer().live == version
    actions = [(d.version, d.action) for d in registry.history()]
    assert actions == [(version, PROMOTED), (version, PUBLISHED)]


def test_set_live_stacks_previous_versions_and_rollback_unwinds_them(
    registry: PostgresRegistry, tmp_path: Path
) -> None:
    for seed in range(3):
        registry.publish(make_checkpoint(tmp_path / f"c{seed}", seed))
    registry.set_live("v0001")
    registry.set_live("v0002")
    pointer = registry.set_live("v0003", reason="gate passed")
    assert (pointer.live, pointer.previous) == ("v0003", ("v0001", "v0002"))
    assert registry.set_live("v0003") == pointer  # already live: nothing changes
    assert registry.rollback(reason="bad ratings").live == "v0002"
    assert registry.rollback().live == "v0001"
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()
    newest = registry.history(limit=2)
    assert [(d.version, d.action) for d in newest] == [
        ("v0001", ROLLED_BACK),
        ("v0002", ROLLED_BACK),
    ]
    assert newest[1].reason == "bad ratings" and newest[1].details == {"from": "v0003"}


def test_unknown_versions_are_named_errors(registry: PostgresRegistry) -> None:
    for call in (registry.set_live, registry.manifest, registry.checkpoint_dir):
        with pytest.raises(UnknownVersionError, match="v0042"):
            call("v0042")
    assert registry.history() == []  # a refused set_live recorded nothing


def test_record_keeps_refusals_and_rejects_unknown_actions(registry: PostgresRegistry) -> None:
    registry.record(Decision("candidate-7", REFUSED, "kl too high", {"kl": 0.9}))
    (decision,) = registry.history()
    assert (decision.action, decision.reason, decision.details) == (
        REFUSED,
        "kl too high",
        {"kl": 0.9},
    )
    with pytest.raises(ValueError, match="unknown action"):
        registry.record(Decision("v0001", "deleted"))


def test_checkpoint_dir_materialises_verified_files_and_repairs_its_cache(
    registry: PostgresRegistry, tmp_path: Path
) -> None:
    source = make_checkpoint(tmp_path / "src", 5, size_bytes=1 << 16)
    version = registry.publish(source)
    local = registry.checkpoint_dir(version)
    assert local.parent == registry.cache_dir
    for name in (WEIGHTS, TOKENIZER):
        assert (local / name).read_bytes() == (source / name).read_bytes()
    assert read_manifest(local).version == version
    assert registry.checkpoint_dir(version) == local  # cached
    (local / WEIGHTS).write_bytes(b"damaged")
    repaired = registry.checkpoint_dir(version)
    assert (repaired / WEIGHTS).read_bytes() == (source / WEIGHTS).read_bytes()


def test_checkpoint_dir_refuses_bytes_that_do_not_match_the_manifest(
    registry: PostgresRegistry, url: str, tmp_path: Path
) -> None:
    version = registry.publish(make_checkpoint(tmp_path / "src", 6))
    schema = url.split("schema=")[1]
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            f'UPDATE "{schema}".registry_files SET data = %s WHERE name = %s',
            (b"tampered", WEIGHTS),
        )
    with pytest.raises(CheckpointError, match=r"fail verification.*does not match"):
        registry.checkpoint_dir(version)
    assert not (registry.cache_dir / version).exists()


def test_publish_of_a_checkpoint_with_a_bad_checksum_writes_nothing(
    registry: PostgresRegistry, tmp_path: Path
) -> None:
    source = make_checkpoint(tmp_path / "src", 7)
    (source / WEIGHTS).write_bytes(b"not what the manifest says")
    with pytest.raises(CheckpointError):
        registry.publish(source)
    assert registry.versions() == [] and registry.history() == []


def test_a_publish_killed_midway_leaves_only_whole_versions(
    url: str, opener: Callable[..., PostgresRegistry], tmp_path: Path
) -> None:
    publisher = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from test_registry_pg import make_checkpoint
        from feedloop.core.registry.postgres import PostgresRegistry
        registry = PostgresRegistry(sys.argv[1], cache_dir=Path(sys.argv[2]) / "cache")
        for i in range(1000):
            source = make_checkpoint(Path(sys.argv[2]) / f"ck{i}", i, size_bytes=1 << 20)
            print(registry.publish(source, make_live=True), flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", publisher, url, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent,
    )
    acked: list[str] = []
    try:
        assert proc.stdout is not None
        while len(acked) < 3:
            line = proc.stdout.readline()
            assert line, "the publisher died before publishing three versions"
            acked.append(line.strip())
        proc.kill()  # most likely inside the next publish's transaction
    finally:
        proc.kill()
        proc.wait()
    registry = opener()
    versions = registry.versions()
    assert versions[: len(acked)] == acked
    assert registry.live() == versions[-1]
    for version in versions:  # every visible version is whole and verifies
        assert read_manifest(registry.checkpoint_dir(version)).version == version


def test_wait_for_change_is_woken_by_notify_from_another_connection(
    opener: Callable[..., PostgresRegistry], tmp_path: Path
) -> None:
    # A fallback poll far longer than the wait we accept: only NOTIFY can wake it in time.
    watcher = opener(poll_interval_s=30.0)
    publisher = opener()
    publisher.publish(make_checkpoint(tmp_path / "a", 1), make_live=True)
    publisher.publish(make_checkpoint(tmp_path / "b", 2))
    first = watcher.wait_for_change(None, timeout_s=5.0)  # differs already: at once
    assert first.live == "v0001"
    woken: dict[str, object] = {}
    started = threading.Event()

    def wait() -> None:
        started.set()
        woken["live"] = watcher.wait_for_change(first, timeout_s=20.0).live
        woken["at"] = time.monotonic()

    thread = threading.Thread(target=wait)
    thread.start()
    started.wait()
    time.sleep(0.3)  # let the watcher block in its LISTEN wait before the change
    changed_at = time.monotonic()
    publisher.set_live("v0002")
    thread.join(timeout=15)
    assert woken["live"] == "v0002"
    latency_s = float(woken["at"]) - changed_at  # type: ignore[arg-type]
    assert latency_s < 5.0, f"woken after {latency_s:.3f} s: by the poll, not by NOTIFY"


def test_wait_for_change_returns_the_unchanged_version_after_its_timeout(
    registry: PostgresRegistry, tmp_path: Path
) -> None:
    registry.publish(make_checkpoint(tmp_path / "a", 1), make_live=True)
    seen = registry.pointer()
    assert registry.wait_for_change(seen, timeout_s=0.2) == seen


def test_two_registries_on_one_schema_see_one_truth(
    opener: Callable[..., PostgresRegistry], tmp_path: Path
) -> None:
    trainer, server = opener(), opener()
    trainer.publish(make_checkpoint(tmp_path / "a", 1), make_live=True)
    assert server.live() == "v0001"
    assert (server.checkpoint_dir("v0001") / WEIGHTS).is_file()


def test_open_registry_dispatches_postgres_urls(url: str, tmp_path: Path) -> None:
    registry = open_registry(url)
    try:
        assert isinstance(registry, PostgresRegistry)
        assert registry.versions() == []
    finally:
        registry.close()


def test_unreachable_database_is_a_registry_error() -> None:
    with pytest.raises(RegistryError, match="connecting"):
        PostgresRegistry("postgresql://postgres@127.0.0.1:1/test?schema=x&connect_timeout=2")


def test_a_registry_from_before_trials_keeps_its_live_pointer_after_the_migration(
    url: str, tmp_path: Path
) -> None:
    with psycopg.connect(url.split("?")[0], autocommit=False) as conn:
        schema = url.split("schema=")[1]
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        migrate(
            conn,
            _MIGRATIONS[:1],
            placeholder="%s",
            store_name="old registry",
            version_table="registry_schema_version",
            error=RegistryError,
        )
        conn.execute(
            "INSERT INTO registry_versions (number, version, manifest) VALUES (1, 'v0001', '{}')"
        )
        conn.execute("INSERT INTO registry_live (id, live, previous) VALUES (1, 'v0001', '{}')")
    registry = PostgresRegistry(url, cache_dir=tmp_path / "cache")
    try:
        assert registry.pointer() == LivePointer("v0001")
        assert registry.set_paused(True).paused is True
    finally:
        registry.close()

"""SQLite replay store specifics: WAL settings, quota and disk full, locks, migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from store_support import generation, rating

from feedloop.core.errors import StoreFullError, StoreUnavailableError
from feedloop.core.store import FeedbackRecord, open_store
from feedloop.core.store.schema import LATEST_VERSION, SQLITE_MIGRATIONS
from feedloop.core.store.sqlite import SQLiteStore


def test_sqlite_full_database_raises_store_full_and_recovers(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "replay.db")
    store.append_generations([generation("g")])
    store.insert_feedback([rating("before", "g")])
    size_bytes = (tmp_path / "replay.db").stat().st_size
    store.set_max_size_bytes(size_bytes)  # no room to grow
    big_batch = [
        FeedbackRecord(f"big{i}", "correction", ["g"], "app", 1.0, text="x" * 2000)
        for i in range(200)
    ]
    with pytest.raises(StoreFullError):
        store.insert_feedback(big_batch)
    assert [e.event_id for e in store.feedback_after(0, 1000)] == ["before"]
    store.set_max_size_bytes(None)
    assert store.insert_feedback(big_batch) == [True] * 200
    store.close()


def test_sqlite_write_lock_held_elsewhere_is_unavailable_then_recovers(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "replay.db", busy_timeout_ms=50)
    store.append_generations([generation("g")])
    other = sqlite3.connect(tmp_path / "replay.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    with pytest.raises(StoreUnavailableError, match="locked"):
        store.insert_feedback([rating("e1", "g")])
    other.execute("ROLLBACK")
    other.close()
    assert store.insert_feedback([rating("e1", "g")]) == [True]
    store.close()


def test_sqlite_uses_wal_with_full_sync(tmp_path: Path) -> None:
    SQLiteStore(tmp_path / "replay.db").close()
    conn = sqlite3.connect(tmp_path / "replay.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_sqlite_old_schema_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in SQLITE_MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.close()
    store = SQLiteStore(path)
    assert store.schema_version() == LATEST_VERSION
    store.close()
    conn = sqlite3.connect(path)
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(generations)")}
    conn.close()
    assert "generations_model_version" in indexes


def test_sqlite_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE schema_version SET version = 999")
    conn.close()
    with pytest.raises(StoreUnavailableError, match="newer"):
        SQLiteStore(path)


def test_sqlite_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreUnavailableError):
        SQLiteStore(blocker / "replay.db")


def test_sqlite_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "replay.db")
    store.close()
    with pytest.raises(StoreUnavailableError):
        store.counts()


def test_open_store_picks_backend_by_location(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "x.db"))
    assert isinstance(store, SQLiteStore)
    store.close()
    assert (tmp_path / "x.db").is_file()

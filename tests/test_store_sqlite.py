"""SQLite replay store specifics: WAL settings, quota and disk full, locks, migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from store_support import comparison, generation, rating

from feedloop.core.errors import StoreFullError, StoreUnavailableError
from feedloop.core.store import FeedbackRecord, open_store
from feedloop.core.store import sqlite as sqlite_store
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


def test_rows_from_before_served_as_read_back_with_it_unrecorded(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    old = SQLITE_MIGRATIONS[:3]
    conn = sqlite3.connect(path, isolation_level=None)
    for statements in old:
        for statement in statements:
            conn.execute(statement)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (3)")
    conn.execute(
        "INSERT INTO generations (generation_id, request_id, prompt, prompt_ids, output_ids, "
        "behaviour_logprobs, policy_logprobs, finished, text, sampling, model_version, "
        "client_id, created_at, candidate_index, num_candidates) "
        "VALUES ('old', 'r', 'p', '[1]', '[2]', '[-0.5]', '[-0.5]', 1, 't', '{}', 'v0001', "
        "'c', 1.0, 0, 1)"
    )
    conn.close()
    store = SQLiteStore(path)
    try:
        assert store.get_generations(["old"])["old"].served_as == ""
        store.append_generations([generation("new")])
        assert store.get_generations(["new"])["new"].served_as == "live"
    finally:
        store.close()


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


def test_feedback_for_finds_events_before_and_after_an_index_catch_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # feedback_generations is caught up every _INDEX_CATCH_UP_ROWS events; in between, events
    # are found by scanning the tail. With a catch-up every 3 events, some answers come from
    # the index, some from the tail, and some events sit on the boundary.
    monkeypatch.setattr(sqlite_store, "_INDEX_CATCH_UP_ROWS", 3)
    store = SQLiteStore(tmp_path / "replay.db")
    store.append_generations([generation(g) for g in ("a", "b", "c")])
    expected: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    tails = []
    for batch in range(5):  # two events a batch: caught up after batches 2 and 4, not 5
        records = [rating(f"e{batch}", "abc"[batch % 3]), comparison(f"c{batch}", "c", "b")]
        assert store.insert_feedback(records) == [True, True]
        for record in records:
            for gid in record.generation_ids:
                expected[gid].append(record.event_id)
        upto = store._read("test", "SELECT indexed_upto FROM feedback_index")[0][0]
        tails.append(store.max_seq()[1] - upto)
        for gid, events in expected.items():
            assert [e.event_id for e in store.feedback_for([gid])] == events
    assert tails == [2, 0, 2, 0, 2]
    assert [e.event_id for e in store.feedback_for(["b", "zzz"])] == expected["b"]
    both = ["e0", "c0", "c1", "e2", "c2", "e3", "c3", "c4"]  # e1 and e4 rate b
    assert [e.event_id for e in store.feedback_for(["a", "c"])] == both
    store.close()


def test_duplicates_in_a_batch_and_across_batches_are_not_indexed_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_INDEX_CATCH_UP_ROWS", 1)
    store = SQLiteStore(tmp_path / "replay.db")
    store.append_generations([generation("a"), generation("b")])
    assert store.insert_feedback([rating("e1", "a"), rating("e1", "b"), rating("e2", "b")]) == [
        True,
        False,
        True,
    ]
    assert store.insert_feedback([rating("e2", "a"), rating("e3", "a")]) == [False, True]
    assert [e.event_id for e in store.feedback_for(["a"])] == ["e1", "e3"]
    assert [e.event_id for e in store.feedback_for(["b"])] == ["e2"]
    store.close()


def test_version_2_store_keeps_its_indexed_feedback_after_migration(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statements in SQLITE_MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (2)")
    conn.execute(
        "INSERT INTO feedback (event_id, kind, generation_ids, client_id, received_at) "
        "VALUES ('old', 'rating', '[\"a\"]', 'app', 1.0)"
    )
    conn.execute("INSERT INTO feedback_generations VALUES ('a', 1)")
    conn.close()
    store = SQLiteStore(path)
    assert store.schema_version() == LATEST_VERSION
    assert store._read("test", "SELECT indexed_upto FROM feedback_index")[0][0] == 1
    store.insert_feedback([rating("new", "a")])
    assert [e.event_id for e in store.feedback_for(["a"])] == ["old", "new"]
    store.close()

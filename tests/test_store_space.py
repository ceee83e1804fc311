"""SQLite gives a prune's space back: new files are auto_vacuum=INCREMENTAL, older ones are
converted (at open when small, by `feedloop store vacuum` when not), size-based retention brings
the live data under its limit, and a schema-7 store with data migrates to the end-user column."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest
from store_support import generation, rating

from feedloop.core.migrations import migrate
from feedloop.core.store.cli import main
from feedloop.core.store.retention import DAY_S, StorePruner, StoreRetentionPolicy
from feedloop.core.store.schema import SQLITE_MIGRATIONS
from feedloop.core.store.sqlite import SQLiteStore


def filled(path: Path, count: int = 3000) -> SQLiteStore:
    store = SQLiteStore(path)
    big = "x" * 2000  # about 2 KB a generation: a few MB in all
    for start in range(0, count, 500):
        store.append_generations(
            [
                dataclasses.replace(generation(f"g{i}", t=float(i)), text=big)
                for i in range(start, start + 500)
            ]
        )
    store.insert_feedback([rating(f"e{i}", f"g{i}") for i in range(0, count, 3)])
    store.set_cursor("trainer", {"generation_seq": count, "feedback_seq": count})
    return store


def test_new_stores_are_incremental_and_size_retention_gives_the_space_back(
    tmp_path: Path,
) -> None:
    store = filled(tmp_path / "replay.sqlite3")
    assert store.vacuum_mode() == "incremental"
    store.reclaim_space()  # the WAL checkpointed: the file holds everything
    full = store.size_bytes()
    limit = full // 3
    policy = StoreRetentionPolicy(retain_max_bytes=limit, min_age_s=0, batch_generations=200)
    pruner = StorePruner(store, policy, clock=lambda: 10 * DAY_S, sleep=lambda _: None)

    report = pruner.run_once()

    assert store.used_bytes() <= limit
    assert report.bytes_after <= limit * 1.2 < full  # the file itself shrank, not only its use
    assert report.reclaimed_bytes > 0
    left = store.generations_after(0, 10_000)
    assert left and left[-1].generation_id == "g2999"  # the newest stay, the oldest went
    assert len(left) < 1500


def test_an_older_file_is_converted_at_open_when_small_and_by_the_command_when_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "replay.sqlite3"
    filled(path, 1000).close()
    with sqlite3.connect(path) as conn:  # as a store made before retention existed
        conn.execute("PRAGMA auto_vacuum=NONE")
        conn.execute("VACUUM")
    monkeypatch.setattr("feedloop.core.store.sqlite._CONVERT_AT_OPEN_BYTES", 0)
    store = SQLiteStore(path)
    assert store.vacuum_mode() == "none"  # too large to convert while opening
    assert store.reclaim_space() == 0  # and nothing to give back without it
    store.close()

    assert main(["store", "vacuum", "--store", str(path)]) == 0
    assert SQLiteStore(path).vacuum_mode() == "incremental"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA auto_vacuum=NONE")
        conn.execute("VACUUM")
    monkeypatch.undo()
    assert SQLiteStore(path).vacuum_mode() == "incremental"  # small: converted as it opened


def test_a_schema_7_store_with_data_gains_end_users_and_archives(tmp_path: Path) -> None:
    path = tmp_path / "replay.sqlite3"
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("BEGIN")
        migrate(conn, SQLITE_MIGRATIONS[:7], placeholder="?", store_name="t", error=RuntimeError)
        conn.execute(
            "INSERT INTO generations (generation_id, request_id, prompt, prompt_ids, output_ids,"
            " behaviour_logprobs, policy_logprobs, finished, text, sampling, model_version,"
            " client_id, created_at, candidate_index, num_candidates, served_as) VALUES "
            "('old', 'r', 'p', '[1]', '[2]', '[-0.5]', '[-0.5]', 1, 't', '{}', 'v0001', 'c', 1.0,"
            " 0, 1, 'live')"
        )
        conn.execute("COMMIT")
    store = SQLiteStore(path)
    assert store.schema_version() == len(SQLITE_MIGRATIONS)  # every later migration too
    assert store.get_generations(["old"])["old"].end_user == ""
    assert store.archives() == [] and store.erasures() == []


def test_backup_command_refuses_a_destination_that_is_not_empty(tmp_path: Path) -> None:
    filled(tmp_path / "replay.sqlite3", 10).close()
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "something").write_text("x")
    args = ["store", "backup", str(tmp_path / "dest"), "--data-dir", str(tmp_path)]
    assert main(args) == 2

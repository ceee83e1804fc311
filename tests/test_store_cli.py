"""`feedloop store export`: JSON Lines of generations joined with feedback, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pg_support import fresh_schema, schema_url
from store_support import comparison, generation, rating

from feedloop.core.store import open_store
from feedloop.core.store.cli import main


def filled_store(location: str) -> None:
    store = open_store(location)
    try:
        store.append_generations([generation("a"), generation("b")])
        store.insert_feedback([rating("e1", "a"), comparison("e2", "b", "a")])
    finally:
        store.close()


def check_rows(lines: list[str]) -> None:
    rows = [json.loads(line) for line in lines]
    assert [r["generation_id"] for r in rows] == ["a", "b"]
    assert [e["event_id"] for e in rows[0]["feedback"]] == ["e1", "e2"]
    assert [e["event_id"] for e in rows[1]["feedback"]] == ["e2"]
    assert rows[0]["behaviour_logprobs"] == [-0.25, -1.125, -0.1]


def test_export_writes_json_lines_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    location = str(tmp_path / "replay.sqlite3")
    filled_store(location)
    assert main(["store", "export", "--store", location]) == 0
    out, err = capsys.readouterr()
    check_rows(out.splitlines())
    assert "2 generations, 3 feedback events -> stdout" in err


def test_export_to_a_file_replaces_it_whole(tmp_path: Path) -> None:
    location = str(tmp_path / "replay.sqlite3")
    filled_store(location)
    output = tmp_path / "out.jsonl"
    output.write_text("stale\n")
    assert main(["store", "export", "--store", location, "--output", str(output)]) == 0
    check_rows(output.read_text().splitlines())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_finds_the_store_through_data_dir_env(tmp_path: Path, monkeypatch) -> None:
    filled_store(str(tmp_path / "replay.sqlite3"))
    monkeypatch.setenv("FEEDLOOP_DATA_DIR", str(tmp_path))
    output = tmp_path / "out.jsonl"
    assert main(["store", "export", "-o", str(output)]) == 0
    check_rows(output.read_text().splitlines())


@pytest.mark.postgres
def test_export_reads_a_postgres_store(tmp_path: Path) -> None:
    with fresh_schema("export") as schema:
        filled_store(schema_url(schema))
        output = tmp_path / "out.jsonl"
        assert main(["store", "export", "--store", schema_url(schema), "-o", str(output)]) == 0
        check_rows(output.read_text().splitlines())


def test_a_missing_store_is_a_one_line_failure(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nothing.sqlite3"
    assert main(["store", "export", "--store", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"feedloop store export: no replay store at {missing}"
    assert not missing.exists()  # export never creates a store


def test_an_unreachable_database_is_a_one_line_failure(capsys) -> None:
    url = "postgresql://postgres@127.0.0.1:1/test?schema=x&connect_timeout=2"
    assert main(["store", "export", "--store", url]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("feedloop store export: PostgreSQL at") and "\n" not in err


@pytest.mark.parametrize("argv", [["store"], ["store", "compact"], ["store", "export", "--bogus"]])
def test_usage_errors_exit_2(argv: list[str], capsys) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("feedloop store")


def test_help_shows_examples_and_exits_0(capsys) -> None:
    assert main(["store", "export", "--help"]) == 0
    assert "examples:" in capsys.readouterr().out


def test_the_feedloop_command_routes_store_export(tmp_path: Path) -> None:
    location = str(tmp_path / "replay.sqlite3")
    filled_store(location)
    done = subprocess.run(
        [sys.executable, "-m", "feedloop.client.cli", "store", "export", "--store", location],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    check_rows(done.stdout.splitlines())

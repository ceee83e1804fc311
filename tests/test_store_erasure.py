"""Erasing a client's data from the replay store, on every backend: what goes, what stays, what
is recorded, and that nothing else moves."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from store_support import comparison, generation, rating
from test_store import location, opener, store

from feedloop.core.store import ReplayStore
from feedloop.core.store.base import ErasureRecord, ShadowScore

__all__ = ["location", "opener", "store"]


def of(record, client: str):  # type: ignore[no-untyped-def]
    return dataclasses.replace(record, client_id=client)


def fill(store: ReplayStore) -> None:
    """alice was served a1 and a2, bob b1; events by both, some naming the other's generation."""
    store.append_generations(
        [of(generation("a1"), "alice"), of(generation("b1"), "bob"), of(generation("a2"), "alice")]
    )
    store.insert_feedback([of(rating("alice-rates-a1", "a1"), "alice")])
    store.insert_feedback([of(comparison("bob-compares", "b1", "a2"), "bob")])
    store.insert_feedback([of(rating("bob-rates-b1", "b1"), "bob")])
    store.insert_feedback([of(rating("bob-rates-a1", "a1"), "bob")])
    store.insert_feedback([of(rating("alice-rates-b1", "b1"), "alice")])
    store.append_shadow_scores(
        [ShadowScore(gid, "v0002", [-0.5, -0.25, -0.1], 1500.0) for gid in ("a1", "b1")]
    )


def test_erasing_a_client_deletes_its_rows_and_records_only_the_counts(
    store: ReplayStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite indexes the first three events (bob's comparison naming a2 among them) and leaves
    # the last two in the unindexed tail (bob's rating of a1 among them): both paths are used.
    monkeypatch.setattr("feedloop.core.store.sqlite._INDEX_CATCH_UP_ROWS", 3)
    fill(store)

    record = store.erase_client("alice", requested_by="dpo@example.com", now=3000.0)

    # alice's generations, her events, bob's events naming her a1 or a2; her shadow score.
    assert record == ErasureRecord("alice", "dpo@example.com", 3000.0, 2, 4, 1)
    assert store.erasures() == [record]
    assert set(store.get_generations(["a1", "a2", "b1"])) == {"b1"}
    assert [e.event_id for e in store.feedback_for(["a1", "a2", "b1"])] == ["bob-rates-b1"]
    assert [e.event_id for e in store.feedback_after(0, 100)] == ["bob-rates-b1"]
    assert [g.generation_id for g in store.generations_after(0, 100)] == ["b1"]
    assert store.shadow_scores("v0002", ["a1", "b1"]).keys() == {"b1"}
    counts = store.counts()
    assert (counts.generations, counts.feedback) == (1, 1)
    exported = json.dumps(list(store.iter_export()))
    assert "alice" not in exported and "a1" not in exported


def test_erasing_an_unknown_client_finds_nothing_and_changes_nothing(store: ReplayStore) -> None:
    fill(store)
    before = (store.counts(), store.max_seq(), list(store.iter_export()))

    record = store.erase_client("nobody", requested_by="ops", now=3000.0)

    assert not record.found and (record.generations, record.feedback) == (0, 0)
    assert store.erasures() == []  # nothing found: nothing recorded either
    assert (store.counts(), store.max_seq(), list(store.iter_export())) == before


def test_seqs_of_erased_rows_are_never_reused(store: ReplayStore) -> None:
    fill(store)
    generation_seq, feedback_seq = store.max_seq()
    store.erase_client("alice", requested_by="ops", now=3000.0)  # a2 and the newest event
    store.append_generations([generation("c1")])
    store.insert_feedback([rating("c1-rated", "c1")])
    # A cursor past the erased rows still sees every new row, and no old one again.
    assert [g.generation_id for g in store.generations_after(generation_seq, 10)] == ["c1"]
    assert [e.event_id for e in store.feedback_after(feedback_seq, 10)] == ["c1-rated"]


def test_store_erase_command_erases_says_what_and_finds_nothing_twice(
    location: str, opener: Callable[[], ReplayStore], capsys: pytest.CaptureFixture[str]
) -> None:
    from feedloop.core.store.cli import main

    fill(opener())
    args = ["--store", location, "--client", "alice", "--requested-by", "ticket 7"]
    assert main(["store", "erase", *args]) == 0
    out = capsys.readouterr().out
    assert (
        "client 'alice': 2 generations, 4 feedback events, 1 shadow scores, 0 archive rows, "
        "0 human-evaluation verdicts erased"
    ) in out
    assert "requested by ticket 7" in out

    assert main(["store", "erase", *args, "--json"]) == 0  # again: nothing left to find
    again = json.loads(capsys.readouterr().out)
    assert again["found"] is False and again["generations"] == again["feedback"] == 0
    assert main(["store", "erase", "--store", location, "--client", "nobody"]) == 0
    assert "found nothing for client 'nobody'; nothing changed" in capsys.readouterr().out
    assert main(["store", "erase", "--store", location, "--end-user", "nobody"]) == 0
    assert "found nothing for end user 'nobody'; nothing changed" in capsys.readouterr().out
    both = ["--client", "alice", "--end-user", "u"]
    assert main(["store", "erase", "--store", location, *both]) == 2

    assert main(["store", "erasures", "--store", location, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["client_id"], r["requested_by"], r["feedback"]) for r in records] == [
        ("alice", "ticket 7", 4)
    ]
    assert opener().counts().generations == 1
    assert main(["store", "erase", "--store", location, "--client", " "]) == 2
    assert main(["store", "erase", "--store", location]) == 2  # --client is required
    capsys.readouterr()
    if not location.startswith("postgresql"):
        missing = str(Path(location).with_name("missing.sqlite3"))
        assert main(["store", "erase", "--store", missing, "--client", "alice"]) == 1
        assert "no replay store at" in capsys.readouterr().err
        assert not Path(missing).exists()

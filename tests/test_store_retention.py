"""Store retention on every backend: what goes (old, consumed rows), what always stays (the
trainer's current window, young rows, generations a kept event names), archives written before
the delete and erased from afterwards, and policies that would cut into the window refused."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from store_support import comparison, generation, rating
from test_store import location, opener, store

from feedloop.core.store import ReplayStore
from feedloop.core.store.archive import read_archive
from feedloop.core.store.retention import (
    DAY_S,
    StorePruner,
    StoreRetentionPolicy,
    trainer_horizon,
)
from feedloop.core.store.schema import export_row

__all__ = ["location", "opener", "store"]
NOW = 100 * DAY_S
HOUR = 3600.0


def at(record, t: float, **changes):  # type: ignore[no-untyped-def]
    field = "created_at" if hasattr(record, "created_at") else "received_at"
    return dataclasses.replace(record, **{field: t}, **changes)


def fill(store: ReplayStore) -> None:
    """Generations g1..g6 served 30, 20, 10 days, 2 hours and 1 minute ago, each rated then.

    g2 also has a comparison (with g5) received 1 hour ago: young, so it keeps g2. The trainer's
    cursor has consumed g1..g4 and the first four ratings; g5, g6 and the rest are its window.
    """
    ages = {"g1": 30 * DAY_S, "g2": 20 * DAY_S, "g3": 10 * DAY_S, "g4": 2 * HOUR}
    ages |= {"g5": 0.5 * HOUR, "g6": 60.0}
    for gid, age in ages.items():
        store.append_generations([at(generation(gid), NOW - age)])
    for gid, age in ages.items():
        store.insert_feedback([at(rating(f"rates-{gid}", gid), NOW - age + 5)])
    store.insert_feedback([at(comparison("late-comparison", "g2", "g5"), NOW - HOUR)])
    store.set_cursor("trainer", {"generation_seq": 4, "feedback_seq": 4, "rounds": 3})


def prune(store: ReplayStore, tmp_path: Path | None = None, **policy: float) -> StorePruner:
    pruner = StorePruner(
        store,
        StoreRetentionPolicy(**policy),  # type: ignore[arg-type]
        archive_dir=tmp_path,
        clock=lambda: NOW,
        sleep=lambda _: None,
    )
    return pruner


def ids(store: ReplayStore) -> list[str]:
    return [g.generation_id for g in store.generations_after(0, 100)]


def test_age_retention_deletes_old_consumed_rows_and_keeps_what_the_trainer_needs(
    store: ReplayStore,
) -> None:
    fill(store)
    report = prune(store, retain_s=7 * DAY_S, min_age_s=HOUR, batch_generations=1).run_once()

    # g1 and g3 (older than 7 days, consumed, no kept event names them) go with their ratings;
    # g2 stays because a young comparison names it; g4..g6 are young or in the window.
    assert ids(store) == ["g2", "g4", "g5", "g6"]
    events = [e.event_id for e in store.feedback_after(0, 100)]
    assert events == ["rates-g2", "rates-g4", "rates-g5", "rates-g6", "late-comparison"]
    assert (report.rows.generations, report.rows.feedback) == (2, 2)
    assert report.batches == 3  # one generation a batch: g1, g2 (kept), g3
    assert store.feedback_for(["g1", "g3"]) == []


def test_rows_past_the_trainer_cursor_stay_however_old(store: ReplayStore) -> None:
    fill(store)
    store.set_cursor("trainer", {"generation_seq": 1, "feedback_seq": 0, "rounds": 1})
    store.set_cursor("second-trainer", {"generation_seq": 3, "feedback_seq": 3})
    assert trainer_horizon(store) is not None
    prune(store, retain_s=DAY_S, min_age_s=0).run_once()
    # Only g1 was consumed by the slowest trainer, but its rating was not: it names g1.
    assert ids(store) == ["g1", "g2", "g3", "g4", "g5", "g6"]
    store.set_cursor("trainer", {"generation_seq": 1, "feedback_seq": 3})
    prune(store, retain_s=DAY_S, min_age_s=0).run_once()
    # g1 and its rating now consumed by both: gone; g3 (seq 3) is still the slower one's window.
    assert ids(store) == ["g2", "g3", "g4", "g5", "g6"]


def test_a_store_no_trainer_has_read_keeps_everything(store: ReplayStore) -> None:
    fill(store)
    store.set_cursor("trainer", {"note": "not a trainer cursor"})
    report = prune(store, retain_s=DAY_S, min_age_s=0).run_once()
    assert "no trainer cursor" in report.stopped
    assert len(ids(store)) == 6


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"retain_s": HOUR, "min_age_s": DAY_S}, "would delete data younger than the protected"),
        ({}, "set retain_days or retain_max_gb"),
        ({"retain_s": 0.0}, "retain_days must be > 0"),
        ({"retain_max_bytes": 0}, "retain_max_gb must be > 0"),
        ({"retain_s": DAY_S, "min_age_s": -1.0}, "retain_min_age_h must be >= 0"),
    ],
)
def test_a_policy_that_cuts_into_the_protected_window_is_refused(
    policy: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        StoreRetentionPolicy(**policy)  # type: ignore[arg-type]


def test_pruned_rows_are_archived_losslessly_then_erasure_rewrites_the_archive(
    store: ReplayStore, tmp_path: Path
) -> None:
    store.append_generations([at(generation("bob-old"), NOW - 40 * DAY_S, client_id="bob")])
    fill(store)
    store.set_cursor("trainer", {"generation_seq": 5, "feedback_seq": 4})
    before = {g: store.get_generations([g])[g] for g in ("g1", "g3", "bob-old")}
    expected = [export_row(before["g1"], store.feedback_for(["g1"]))]

    report = prune(store, tmp_path, retain_s=7 * DAY_S, min_age_s=HOUR).run_once()

    assert report.archive is not None and store.archives() == [report.archive]
    rows = read_archive(Path(report.archive))
    assert [r["generation_id"] for r in rows] == ["bob-old", "g1", "g3"]
    assert rows[1] == json.loads(json.dumps(expected[0]))  # every field, as the export writes it
    assert report.archived == 3 and "bob-old" not in ids(store)

    record = store.erase_client("bob", requested_by="dpo", now=NOW)
    assert record.found and record.archive_rows == 1 and record.generations == 0
    assert store.erasures() == [record]
    assert [r["generation_id"] for r in read_archive(Path(report.archive))] == ["g1", "g3"]
    # The app-1 client's rows are in store and archive alike: both go, every count recorded.
    everyone = store.erase_client("app-1", requested_by="dpo", now=NOW)
    assert everyone.archive_rows == 4  # g1, g3 and their ratings
    assert read_archive(Path(report.archive)) == []


def test_erasure_by_end_user_deletes_their_generations_and_the_events_naming_them(
    store: ReplayStore,
) -> None:
    store.append_generations(
        [
            dataclasses.replace(generation("u1"), end_user="user-7"),
            dataclasses.replace(generation("u2"), end_user="user-8"),
        ]
    )
    store.insert_feedback([rating("on-u1", "u1"), rating("on-u2", "u2")])
    assert store.get_generations(["u1"])["u1"].end_user == "user-7"

    nothing = store.erase_end_user("nobody", requested_by="dpo", now=5.0)
    assert not nothing.found and store.erasures() == [] and len(ids(store)) == 2

    record = store.erase_end_user("user-7", requested_by="dpo", now=5.0)
    assert (record.end_user, record.client_id, record.generations, record.feedback) == (
        "user-7",
        "",
        1,
        1,
    )
    assert store.erasures() == [record]
    assert ids(store) == ["u2"]
    assert [e.event_id for e in store.feedback_after(0, 10)] == ["on-u2"]


def test_prune_command_refuses_a_window_cutting_policy_and_prunes_a_good_one(
    location: str, opener: Callable[[], ReplayStore], capsys: pytest.CaptureFixture[str]
) -> None:
    from feedloop.core.store.cli import main

    fill(opener())
    base = ["store", "prune", "--store", location]
    assert main([*base, "--retain-days", "0.01"]) == 2
    assert "would delete data younger than the protected 24 h" in capsys.readouterr().err
    assert main(base) == 2
    assert "set retain_days or retain_max_gb" in capsys.readouterr().err
    if location.startswith("postgresql"):  # its size never comes down: refused there
        assert main([*base, "--retain-max-gb", "1"]) == 2
        assert "on PostgreSQL use retain_days" in capsys.readouterr().err
        assert main(["store", "backup", "/nonexistent-dest", "--store", location]) == 2
        assert "back it up with pg_dump" in capsys.readouterr().err
    assert len(ids(opener())) == 6  # refused: nothing changed

    # The rows are dated 100 days after the epoch: all older than a day by the real clock, so
    # only the trainer's cursor and the young comparison's generations stop the prune.
    assert main([*base, "--retain-days", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"]["generations"] == 3  # g1, g3, g4; g2 is named by a kept event
    assert ids(opener()) == ["g2", "g5", "g6"]


def test_an_end_user_erasure_rewrites_the_archives_too(store: ReplayStore, tmp_path: Path) -> None:
    old = NOW - 40 * DAY_S
    store.append_generations(
        [
            at(generation("theirs"), old, end_user="user-3"),
            at(generation("others"), old, end_user="user-4"),
        ]
    )
    store.insert_feedback([at(rating("on-theirs", "theirs"), old + 5)])
    store.set_cursor("trainer", {"generation_seq": 2, "feedback_seq": 1})
    report = prune(store, tmp_path, retain_s=7 * DAY_S, min_age_s=HOUR).run_once()
    assert report.archive is not None and ids(store) == []

    record = store.erase_end_user("user-3", requested_by="dpo", now=NOW)

    assert (record.generations, record.archive_rows) == (0, 2)  # the row and its rating
    assert [r["generation_id"] for r in read_archive(Path(report.archive))] == ["others"]

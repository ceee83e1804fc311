"""The replay store's promises, run against every backend (SQLite file, PostgreSQL schema).

Backend-specific behaviour lives in test_store_sqlite.py and test_store_pg.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pg_support import fresh_schema, schema_url
from store_support import comparison, generation, rating

from feedloop.core.discount import Discount
from feedloop.core.feedback_kinds import FeedbackKind
from feedloop.core.store import (
    FeedbackRecord,
    GenerationRecord,
    ReplayStore,
    ShadowScore,
    VersionOutcomes,
    open_store,
)
from feedloop.core.store.base import SERVED_EXPLORATION
from feedloop.core.store.outcomes import ShadowEvidence, tally_outcomes
from feedloop.core.store.schema import LATEST_VERSION

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "replay.db")
    else:
        with fresh_schema("store") as schema:
            yield schema_url(schema)


@pytest.fixture
def opener(location: str) -> Iterator[Callable[[], ReplayStore]]:
    opened: list[ReplayStore] = []

    def open_one() -> ReplayStore:
        store = open_store(location)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(opener: Callable[[], ReplayStore]) -> ReplayStore:
    return opener()


def test_acked_feedback_survives_sigkill(location: str, opener: Callable[[], ReplayStore]) -> None:
    writer = textwrap.dedent(
        """
        import sys
        from feedloop.core.store import open_store, FeedbackRecord, GenerationRecord
        store = open_store(sys.argv[1])
        store.append_generations([GenerationRecord("g", "r", "p", [1], [2], [-0.5], [-0.5],
            True, "t", {}, "v0001", "c", 1.0)])
        batch = 0
        while True:
            events = [FeedbackRecord(f"e{batch}-{i}", "rating", ["g"], "c", 2.0, score=1.0,
                scale="unit") for i in range(10)]
            store.insert_feedback(events)
            print(" ".join(e.event_id for e in events), flush=True)
            batch += 1
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", writer, location], stdout=subprocess.PIPE, text=True
    )
    acked: list[str] = []
    try:
        assert proc.stdout is not None
        while len(acked) < 200:
            line = proc.stdout.readline()
            assert line, "the writer died before acknowledging 200 events"
            acked += line.split()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    stored = {event.event_id for event in opener().feedback_after(0, 1_000_000)}
    assert set(acked) <= stored


def test_repeated_event_id_is_reported_duplicate_and_stored_once(store: ReplayStore) -> None:
    store.append_generations([generation("g1")])
    assert store.insert_feedback([rating("e1", "g1"), rating("e2", "g1")]) == [True, True]
    assert store.insert_feedback([rating("e1", "g1", score=0.1)]) == [False]
    assert store.insert_feedback([rating("e3", "g1"), rating("e3", "g1")]) == [True, False]
    events = store.feedback_after(0, 100)
    assert [e.event_id for e in events] == ["e1", "e2", "e3"]
    assert events[0].score == 0.75  # the first write wins; the duplicate changed nothing
    assert store.counts().feedback == 3


def test_repeated_generation_id_is_ignored(store: ReplayStore) -> None:
    store.append_generations([generation("g1"), generation("g2")])
    store.append_generations([generation("g2", version="v0009"), generation("g3")])
    stored = store.generations_after(0, 100)
    assert [g.generation_id for g in stored] == ["g1", "g2", "g3"]
    assert stored[1].model_version == "v0001"


def test_records_round_trip_every_field(store: ReplayStore) -> None:
    original = generation("g1")
    store.append_generations([original])
    event = FeedbackRecord(
        event_id="c1",
        kind="correction",
        generation_ids=["g1"],
        client_id="app-3",
        received_at=2002.25,
        text="what it should have said",
        given_at=None,
    )
    store.insert_feedback([event])
    got = store.get_generations(["g1", "missing"])
    assert list(got) == ["g1"]
    assert got["g1"] == GenerationRecord(**{**original.__dict__, "seq": got["g1"].seq})
    assert got["g1"].seq > 0
    (stored_event,) = store.feedback_for(["g1"])
    assert stored_event == dataclasses.replace(event, seq=stored_event.seq)


def test_why_each_generation_was_served_is_stored(store: ReplayStore) -> None:
    reasons = {"g1": "live", "g2": "canary", "g3": "pinned"}
    store.append_generations(
        [dataclasses.replace(generation(gid), served_as=why) for gid, why in reasons.items()]
    )
    stored = store.get_generations(list(reasons))
    assert {gid: record.served_as for gid, record in stored.items()} == reasons


def test_shadow_scores_round_trip_by_version_and_generation(store: ReplayStore) -> None:
    store.append_generations([generation("g1"), generation("g2")])
    scores = [
        ShadowScore("g1", "v0002", [-0.1, -2.5, -1e-300], 100.5),
        ShadowScore("g2", "v0002", [-0.25, float("-inf")], 101.0),  # a token it filters out
        ShadowScore("g1", "v0003", [-3.0], 102.0),
    ]
    store.append_shadow_scores(scores)
    store.append_shadow_scores([ShadowScore("g1", "v0002", [0.0], 103.0)])  # a repeat: ignored
    assert store.shadow_scores("v0002", ["g1", "g2", "g-unknown"]) == {
        "g1": scores[0],
        "g2": scores[1],
    }
    assert store.shadow_scores("v0003", ["g1", "g2"]) == {"g1": scores[2]}
    assert store.shadow_scores("v0004", ["g1"]) == {}
    assert store.shadow_scores("v0002", []) == {}
    assert scores[0].logprob == -0.1 + -2.5 + -1e-300


def test_awkward_ids_text_and_floats_round_trip_exactly(store: ReplayStore) -> None:
    # Characters that array literals, JSON or SQL treat specially, and floats whose last digit
    # a lossy encoding would change.
    ids = ['q"uote', "back\\slash", "{brace,comma}", "NULL", " spaced ", "ünï 🙂", "'apos"]
    store.append_generations([generation(gid) for gid in ids])
    events = [
        FeedbackRecord(
            event_id='ev "1" \\ {x}',
            kind="ranking",
            generation_ids=ids,
            client_id="app 'ü'",
            received_at=1732499999.1234567,
            given_at=0.1 + 0.2,
        ),
        FeedbackRecord(
            event_id="ev-2",
            kind="correction",
            generation_ids=[ids[0]],
            client_id="app-1",
            received_at=2.5e-300,
            text='line one\nline "two" \\ {three} 🙂',
        ),
        FeedbackRecord(
            event_id="ev-3",
            kind="rating",
            generation_ids=[ids[5]],
            client_id="app-1",
            received_at=1e300,
            score=1 / 3,
            scale="unit",
        ),
    ]
    assert store.insert_feedback(events) == [True, True, True]
    stored = store.feedback_after(0, 10)
    assert [dataclasses.replace(e, seq=0) for e in stored] == events
    assert [e.event_id for e in store.feedback_for([ids[3]])] == ['ev "1" \\ {x}']


def test_seq_is_strictly_increasing_across_batches(store: ReplayStore) -> None:
    for batch in range(4):
        store.append_generations([generation(f"g{batch}-{i}") for i in range(5)])
        store.insert_feedback([rating(f"e{batch}-{i}", f"g{batch}-{i}") for i in range(5)])
    gen_seqs = [g.seq for g in store.generations_after(0, 100)]
    fb_seqs = [e.seq for e in store.feedback_after(0, 100)]
    assert len(gen_seqs) == len(fb_seqs) == 20
    assert all(a < b for a, b in itertools.pairwise(gen_seqs))
    assert all(a < b for a, b in itertools.pairwise(fb_seqs))
    assert store.max_seq() == (gen_seqs[-1], fb_seqs[-1])


def test_empty_store_reports_zero_everywhere(store: ReplayStore) -> None:
    assert store.max_seq() == (0, 0)
    assert store.counts().generations == 0 and store.counts().feedback == 0
    assert store.generations_after(0, 10) == []
    assert store.sample_generations(10, 5, seed=1) == []
    assert store.feedback_for(["nothing"]) == []
    assert store.get_cursor("trainer") is None
    assert list(store.iter_export()) == []
    assert store.append_generations([]) is None
    assert store.insert_feedback([]) == []


def test_cursors_persist_across_reopen(opener: Callable[[], ReplayStore]) -> None:
    first = opener()
    first.set_cursor("trainer", {"generation_seq": 12, "feedback_seq": 4})
    first.set_cursor("trainer", {"generation_seq": 40, "feedback_seq": 9, "note": "é"})
    first.set_cursor("other", {"x": [1, 2]})
    first.close()
    second = opener()
    assert second.get_cursor("trainer") == {"generation_seq": 40, "feedback_seq": 9, "note": "é"}
    assert second.get_cursor("other") == {"x": [1, 2]}


def test_generations_after_pages_oldest_first(store: ReplayStore) -> None:
    store.append_generations([generation(f"g{i:02d}") for i in range(25)])
    seen: list[str] = []
    last = 0
    while page := store.generations_after(last, 10):
        assert len(page) <= 10
        seen += [g.generation_id for g in page]
        last = page[-1].seq
    assert seen == [f"g{i:02d}" for i in range(25)]


def test_sample_generations_is_seeded_bounded_and_spread(store: ReplayStore) -> None:
    store.append_generations([generation(f"g{i:03d}") for i in range(100)])
    seqs = [g.seq for g in store.generations_after(0, 1000)]
    bound = seqs[59]
    first = store.sample_generations(bound, 20, seed=3)
    again = store.sample_generations(bound, 20, seed=3)
    other = store.sample_generations(bound, 20, seed=4)
    assert [g.generation_id for g in first] == [g.generation_id for g in again]
    assert [g.generation_id for g in first] != [g.generation_id for g in other]
    assert len(first) == 20 and len({g.generation_id for g in first}) == 20
    assert all(g.seq <= bound for g in first)
    assert len(store.sample_generations(bound, 500, seed=3)) == 60  # capped by what exists
    # Uniform: over many seeds every one of the 60 eligible rows gets drawn.
    drawn = {g.seq for seed in range(30) for g in store.sample_generations(bound, 10, seed)}
    assert drawn == set(seqs[:60])


def test_feedback_after_and_feedback_for_find_every_event(store: ReplayStore) -> None:
    store.append_generations([generation(g) for g in ("a", "b", "c", "d")])
    ranking = FeedbackRecord(
        event_id="r1",
        kind="ranking",
        generation_ids=["c", "a", "b"],
        client_id="app-1",
        received_at=2003.0,
    )
    store.insert_feedback([rating("e1", "a"), comparison("e2", "b", "a")])
    store.insert_feedback([ranking, rating("e3", "d")])
    assert [e.event_id for e in store.feedback_for(["a"])] == ["e1", "e2", "r1"]
    assert [e.event_id for e in store.feedback_for(["d", "c"])] == ["r1", "e3"]
    assert store.feedback_for(["zzz"]) == []
    everything = store.feedback_after(0, 100)
    assert [e.event_id for e in everything] == ["e1", "e2", "r1", "e3"]
    assert [e.event_id for e in store.feedback_after(everything[1].seq, 1)] == ["r1"]
    assert store.counts().feedback_by_kind == {"rating": 2, "comparison": 1, "ranking": 1}


def test_export_joins_each_generation_with_its_feedback(store: ReplayStore) -> None:
    store.append_generations([generation("a"), generation("b"), generation("c")])
    store.insert_feedback([rating("e1", "a"), comparison("e2", "b", "a")])
    rows = list(store.iter_export())
    assert [r["generation_id"] for r in rows] == ["a", "b", "c"]
    assert [e["event_id"] for e in rows[0]["feedback"]] == ["e1", "e2"]
    assert [e["event_id"] for e in rows[1]["feedback"]] == ["e2"]
    assert rows[2]["feedback"] == []
    assert rows[0]["behaviour_logprobs"] == [-0.25, -1.125, -0.1]
    assert json.loads(json.dumps(rows)) == rows  # JSON-ready as it is


def test_schema_is_current_and_reopening_migrates_nothing(
    opener: Callable[[], ReplayStore],
) -> None:
    first = opener()
    assert first.schema_version() == LATEST_VERSION
    first.append_generations([generation("g1")])
    first.close()
    for _ in range(2):
        again = opener()
        assert again.schema_version() == LATEST_VERSION
        assert [g.generation_id for g in again.generations_after(0, 10)] == ["g1"]
        again.close()


def test_a_failing_batch_leaves_nothing_behind(store: ReplayStore) -> None:
    store.append_generations([generation("g0")])
    broken = GenerationRecord(**{**generation("g2").__dict__, "sampling": {"bad": object()}})
    with pytest.raises(TypeError):
        store.append_generations([generation("g1"), broken])
    assert [g.generation_id for g in store.generations_after(0, 10)] == ["g0"]
    store.append_generations([generation("g1")])  # and the store keeps working
    assert store.counts().generations == 2


def test_writes_from_threads_and_reads_beside_them(store: ReplayStore) -> None:
    store.append_generations([generation("g")])
    errors: list[BaseException] = []

    def write(prefix: str) -> None:
        try:
            for i in range(20):
                store.insert_feedback([rating(f"{prefix}{i}", "g")])
                store.feedback_for(["g"])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in "xyz"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.counts().feedback == 60


def test_a_cursor_reader_never_skips_rows_committed_by_concurrent_writers(
    opener: Callable[[], ReplayStore],
) -> None:
    writers = [opener() for _ in range(3)]  # separate connections, as separate replicas
    reader = opener()
    writers[0].append_generations([generation("g")])
    done = threading.Event()
    seen: list[str] = []

    def write(index: int) -> None:
        for batch in range(30):
            writers[index].insert_feedback([rating(f"w{index}-{batch}-{i}", "g") for i in range(5)])

    def read() -> None:
        cursor = 0
        while True:
            finished = done.is_set()  # read once more after the writers stop
            for event in reader.feedback_after(cursor, 1000):
                seen.append(event.event_id)
                cursor = event.seq
            if finished:
                return

    reading = threading.Thread(target=read)
    reading.start()
    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reading.join()
    assert len(seen) == len(set(seen)) == 3 * 30 * 5


def judged(
    event_id: str, kind: FeedbackKind, ids: list[str], at: float, **fields: Any
) -> FeedbackRecord:
    return FeedbackRecord(event_id, kind, ids, "app-1", at, **fields)


def test_online_outcomes_average_ratings_per_generation_by_version_within_the_range(
    store: ReplayStore,
) -> None:
    store.append_generations(
        [
            generation("a1", version="v1"),
            generation("a2", version="v1"),
            generation("b1", version="v2"),
        ]
    )
    store.insert_feedback(
        [
            judged("early", "rating", ["a1"], 99.0, score=0.0, scale="unit"),
            judged("e1", "rating", ["a1"], 100.0, score=1.0, scale="unit"),  # +1
            judged("e2", "rating", ["a1"], 101.0, score=0.5, scale="unit"),  # 0: a1's mean 0.5
            judged("e3", "rating", ["a2"], 102.0, score=1.0, scale="stars5"),  # -1
            judged("e4", "rating", ["b1"], 103.0, score=1.0, scale="thumbs"),  # +1
            judged("fix", "correction", ["b1"], 150.0, text="a better phrase"),
            judged("late", "rating", ["b1"], 200.0, score=0.0, scale="unit"),
        ]
    )
    outcomes = store.online_outcomes(100.0, 200.0)
    assert set(outcomes) == {"v1", "v2"}
    v1, v2 = outcomes["v1"], outcomes["v2"]
    assert (v1.ratings, v1.rating_sum, v1.rating_sum_sq) == (2, -0.5, 1.25)
    assert (v2.ratings, v2.rating_sum, v2.rating_sum_sq) == (1, 1.0, 1.0)
    assert v1.wins == v1.losses == v2.wins == v2.losses == {}
    assert store.online_outcomes(100.0)["v2"].rating_sum == 0.0  # no end: "late" counts, -1


def test_online_outcomes_count_pairs_won_and_lost_between_versions(store: ReplayStore) -> None:
    store.append_generations(
        [
            generation("a1", version="v1"),
            generation("a2", version="v1"),
            generation("b1", version="v2"),
            generation("c1", version="v3"),
        ]
    )
    store.insert_feedback(
        [
            judged("cmp", "comparison", ["a1", "b1"], 10.0),  # v1 beats v2
            judged("same", "comparison", ["a1", "a2"], 11.0),  # within v1: says nothing
            judged("rank", "ranking", ["b1", "c1", "a1"], 12.0),  # v2 > v3 > v1, v2 > v1
        ]
    )
    outcomes = store.online_outcomes(0.0)
    assert outcomes["v1"].wins == {"v2": 1}
    assert outcomes["v1"].losses == {"v2": 1, "v3": 1}
    assert outcomes["v2"].wins == {"v1": 1, "v3": 1}
    assert outcomes["v2"].losses == {"v1": 1}
    assert outcomes["v3"].wins == {"v1": 1} and outcomes["v3"].losses == {"v2": 1}
    assert all(o.ratings == 0 for o in outcomes.values())


def test_online_outcomes_report_exactly_the_versions_asked_for(store: ReplayStore) -> None:
    store.append_generations([generation("a1", version="v1"), generation("b1", version="v2")])
    store.insert_feedback([judged("e1", "rating", ["a1"], 5.0, score=1.0, scale="unit")])
    outcomes = store.online_outcomes(0.0, versions=["v1", "v9"])
    assert set(outcomes) == {"v1", "v9"}
    assert outcomes["v1"].ratings == 1
    assert outcomes["v9"] == VersionOutcomes("v9")


def test_shadow_evidence_pairs_live_ratings_with_the_shadow_versions_scores(
    store: ReplayStore,
) -> None:
    # behaviour log-prob of every test generation: -0.25 - 1.125 - 0.1 = -1.475
    store.append_generations(
        [
            generation("a1", version="v1"),
            generation("a2", version="v1"),  # rated, not scored by the shadow
            generation("a3", version="v1"),  # scored, rated before the range
            generation("b1", version="v2"),  # scored but served by another version
        ]
    )
    store.append_shadow_scores(
        [
            ShadowScore("a1", "v9", [-0.5, -0.5], 1.0),
            ShadowScore("a3", "v9", [-1.0], 1.0),
            ShadowScore("b1", "v9", [-1.0], 1.0),
            ShadowScore("a1", "v8", [-9.0], 1.0),  # another shadow version
        ]
    )
    store.insert_feedback(
        [
            judged("old", "rating", ["a3"], 50.0, score=1.0, scale="unit"),
            judged("r1", "rating", ["a1"], 100.0, score=1.0, scale="unit"),  # +1
            judged("r2", "rating", ["a1"], 101.0, score=0.0, scale="unit"),  # -1: mean 0
            judged("r3", "rating", ["a2"], 102.0, score=1.0, scale="unit"),
            judged("r4", "rating", ["b1"], 103.0, score=1.0, scale="unit"),
            judged("cmp", "comparison", ["a1", "a2"], 104.0),  # not a rating
        ]
    )
    evidence = store.shadow_evidence("v9", "v1", store.judged_generations(100.0))
    assert evidence == [ShadowEvidence("a1", 0.0, pytest.approx(-1.475), -1.0)]
    assert store.shadow_evidence("v9", "v1", store.judged_generations(0.0))[1].generation_id == "a3"
    assert (
        store.shadow_evidence("v9", "v1", store.judged_generations(100.0, 100.5))[0].rating == 1.0
    )
    assert store.shadow_evidence("v7", "v1", store.judged_generations(0.0)) == []


def test_size_bytes_is_what_the_store_takes_on_disk_and_grows_with_it(store: ReplayStore) -> None:
    empty = store.size_bytes()
    assert empty > 0  # the schema's tables and indexes
    store.append_generations([generation(f"g{i}") for i in range(2000)])
    assert store.size_bytes() > empty + 2000 * 100  # each row well over 100 bytes


def test_online_outcomes_leave_out_generations_served_for_exploration(store: ReplayStore) -> None:
    # A version's online figures are its own policy's: a canary is never explored, so counting
    # live's exploration traffic would tilt every trial towards the canary.
    store.append_generations(
        [
            generation("own", version="v1"),
            dataclasses.replace(generation("explored", version="v1"), served_as=SERVED_EXPLORATION),
            generation("rival", version="v2"),
        ]
    )
    store.insert_feedback(
        [
            judged("e1", "rating", ["own"], 100.0, score=1.0, scale="unit"),
            judged("e2", "rating", ["explored"], 101.0, score=0.0, scale="unit"),
            judged("e3", "comparison", ["rival", "explored"], 102.0),
        ]
    )
    outcomes = store.online_outcomes(0.0)
    assert (outcomes["v1"].ratings, outcomes["v1"].rating_sum) == (1, 1.0)
    assert outcomes["v1"].losses == {} and outcomes.get("v2", None) is None


def test_judged_rows_carry_receipt_time_and_served_as_for_discounted_explored_tallies(
    store: ReplayStore,
) -> None:
    # An older version's exploration traffic is its own policy's: counted when named explored,
    # each rating discounted by its receipt time (half-life 100 s, look at 300: weights 0.25, 1).
    store.append_generations(
        [
            generation("live-own", version="v2"),
            dataclasses.replace(generation("old", version="v1"), served_as=SERVED_EXPLORATION),
            dataclasses.replace(generation("old2", version="v1"), served_as=SERVED_EXPLORATION),
        ]
    )
    store.insert_feedback(
        [
            judged("e1", "rating", ["live-own"], 300.0, score=0.0, scale="unit"),
            judged("e2", "rating", ["old"], 100.0, score=1.0, scale="unit"),
            judged("e3", "rating", ["old2"], 300.0, score=1.0, scale="unit"),
        ]
    )
    rows = store.judged_generations(0.0)
    assert [(r.generation_id, r.received_at, r.served_as) for r in rows] == [
        ("live-own", 300.0, "live"),
        ("old", 100.0, SERVED_EXPLORATION),
        ("old2", 300.0, SERVED_EXPLORATION),
    ]
    discount = Discount(100.0, 300.0, 0.0)
    outcomes = tally_outcomes(rows, ["v1", "v2"], discount=discount, explored=["v1"])
    assert (outcomes["v1"].ratings, outcomes["v1"].rating_weight) == (2, 1.25)
    assert outcomes["v1"].weighted_rating_sum == 1.25 and outcomes["v2"].mean == -1.0
    assert store.online_outcomes(0.0, versions=["v1"])["v1"].ratings == 0  # not explored there
    both = store.online_outcomes(0.0, versions=["v1"], discount=discount, explored=["v1"])
    assert both["v1"] == outcomes["v1"]

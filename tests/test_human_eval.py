"""Human evaluation's arithmetic (feedloop.core.human_eval) against hand-computed values, and its
stored verdicts on every replay-store backend."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_support import fresh_schema, schema_url

from feedloop.core.human_eval import (
    A_BETTER,
    B_BETTER,
    BOTH_BAD,
    TIE,
    Tally,
    VerdictRecord,
    tally_verdicts,
    wilson_interval,
)
from feedloop.core.store import ReplayStore, open_store

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def verdict(
    vid: str,
    choice: str,
    *,
    rater: str = "ann",
    a: str = "v0002",
    b: str = "v0001",
    session: str = "s1",
    a_left: bool = True,
) -> VerdictRecord:
    return VerdictRecord(
        verdict_id=vid,
        session_id=session,
        rater=rater,
        version_a=a,
        generation_id_a=f"{vid}-a",
        version_b=b,
        generation_id_b=f"{vid}-b",
        choice=choice,
        a_shown_left=a_left,
        prompt="ocean sunrise",
        received_at=1000.0,
        given_at=None,
    )


def test_wilson_interval_matches_hand_computed_values():
    # 8 of 10 at 95%: z = 1.959964; centre (0.8 + z²/20) / (1 + z²/10) = 0.99207 / 1.38415
    # = 0.716730; half-width z / 1.38415 * sqrt(0.016 + z²/400) = 1.41600 * 0.16011 = 0.226711.
    low, high = wilson_interval(8, 10, 0.05)
    assert low == pytest.approx(0.490162, abs=1e-5)
    assert high == pytest.approx(0.943318, abs=1e-5)
    # 0 of 5 at 95%: the lower end is 0 exactly, the upper z²/(n + z²) = 3.8415 / 8.8415.
    low, high = wilson_interval(0, 5, 0.05)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(3.841459 / 8.841459, abs=1e-6)
    # No verdicts: the whole range.
    assert wilson_interval(0, 0, 0.05) == (0.0, 1.0)


def test_ties_and_both_bad_count_half_a_win_each():
    tally = Tally("")
    for choice in (A_BETTER, A_BETTER, B_BETTER, TIE, BOTH_BAD):
        tally = tally.add(choice, a_shown_left=True)
    assert (tally.a_wins, tally.b_wins, tally.ties, tally.both_bad) == (2, 1, 1, 1)
    assert tally.verdicts == 5
    assert tally.a_win_rate == pytest.approx((2 + 0.5 * 2) / 5)
    assert tally.interval(0.05) == pytest.approx(wilson_interval(3.0, 5, 0.05))
    assert math.isnan(Tally("").a_win_rate)


def test_tally_mirrors_verdicts_given_with_the_versions_swapped_and_splits_by_rater():
    records = [
        verdict("1", A_BETTER),
        verdict("2", A_BETTER, rater="bob"),
        # given with v0001 as A: B better means v0002 better, shown on the right
        verdict("3", B_BETTER, a="v0001", b="v0002", rater="bob", session="s2"),
        verdict("4", TIE, a="v0001", b="v0002", rater="bob", session="s2", a_left=False),
        verdict("5", A_BETTER, a="v0003", b="v0001"),  # another pair: ignored
    ]
    evaluation = tally_verdicts(records, "v0002", "v0001")
    overall = evaluation.overall
    assert (overall.a_wins, overall.b_wins, overall.ties, overall.verdicts) == (3, 0, 1, 4)
    # v0002 was on the left in 1 and 2 (as A, left), 4 (as B, right of A=v0001: so left).
    assert overall.a_shown_left == 3
    assert [t.rater for t in evaluation.raters] == ["ann", "bob"]
    assert evaluation.raters[1].a_wins == 2 and evaluation.raters[1].ties == 1
    assert evaluation.sessions == 2
    reverse = tally_verdicts(records, "v0001", "v0002").overall
    assert (reverse.a_wins, reverse.b_wins, reverse.ties) == (0, 3, 1)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReplayStore]:
    if request.param == "sqlite":
        opened = open_store(str(tmp_path / "replay.db"))
        yield opened
        opened.close()
    else:
        with fresh_schema("verdicts") as schema:
            opened = open_store(schema_url(schema))
            yield opened
            opened.close()


def test_verdicts_are_stored_once_and_read_by_pair_in_either_order(store: ReplayStore):
    first = dataclasses.replace(verdict("1", TIE), given_at=999.5)
    assert store.insert_verdict(first) is True
    assert store.insert_verdict(dataclasses.replace(first, choice=A_BETTER)) is False
    assert store.insert_verdict(verdict("2", BOTH_BAD, a="v0001", b="v0002", a_left=False))
    assert store.insert_verdict(verdict("3", A_BETTER, a="v0003", b="v0001"))
    found = store.verdicts_between("v0001", "v0002")
    assert [v.verdict_id for v in found] == ["1", "2"]
    assert found[0] == first  # every field round-trips, the repeat changed nothing
    assert found[1].a_shown_left is False
    assert store.verdicts_between("v0002", "v0001") == found
    assert store.verdicts_between("v0002", "v0003") == []


def test_erasing_a_client_deletes_its_verdicts_and_those_naming_its_generations(store):
    from store_support import generation

    store.append_generations([generation("g-carol", version="v0002")])
    store.append_generations([generation("g-other", version="v0001")])
    store.insert_verdict(verdict("by-carol", TIE, rater="carol"))
    naming = dataclasses.replace(verdict("names-carol", A_BETTER), generation_id_a="g-carol")
    store.insert_verdict(naming)
    store.insert_verdict(verdict("kept", B_BETTER, rater="dan"))
    record = store.erase_client("app-1", requested_by="dpo", now=3000.0)  # g-carol's client
    assert (record.generations, record.verdicts) == (2, 1)
    assert [v.verdict_id for v in store.verdicts_between("v0001", "v0002")] == [
        "by-carol",
        "kept",
    ]
    rater = store.erase_client("carol", requested_by="dpo", now=3001.0)
    assert (rater.generations, rater.feedback, rater.verdicts, rater.found) == (0, 0, 1, True)
    assert [v.verdict_id for v in store.verdicts_between("v0001", "v0002")] == ["kept"]
    assert [e.verdicts for e in store.erasures()] == [1, 1]

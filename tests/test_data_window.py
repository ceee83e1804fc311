"""The training window read through the cursor: what a round consumes, and what waits."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from feedloop.core.store import open_store
from feedloop.core.store.base import FeedbackRecord, GenerationRecord, ReplayStore
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.data import Cursor, Window, read_window, version_number

NOW = 1_000_000.0
JOIN_WINDOW_S = 60.0


def generation(gid: str, created_at: float, version: str = "v0001") -> GenerationRecord:
    return GenerationRecord(
        generation_id=gid,
        request_id=f"r-{gid}",
        prompt="sun",
        prompt_ids=[5],
        output_ids=[6, 2],
        behaviour_logprobs=[-1.0, -0.5],
        policy_logprobs=[-1.0, -0.5],
        finished=True,
        text="warm sun",
        sampling={"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_tokens": 16, "seed": 1},
        model_version=version,
        client_id="app",
        created_at=created_at,
    )


def rating(event_id: str, gid: str, received_at: float) -> FeedbackRecord:
    return FeedbackRecord(event_id, "rating", [gid], "app", received_at, score=1.0, scale="unit")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReplayStore]:
    store = open_store(str(tmp_path / "replay.sqlite3"))
    yield store
    store.close()


def config(tmp_path: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = dict(
        data_dir=tmp_path, join_window_s=JOIN_WINDOW_S, replay_sample_size=0
    )
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_a_young_generation_holds_back_every_generation_stored_after_it(
    store: ReplayStore, tmp_path: Path
) -> None:
    # Stored in this order; the second is still inside its join window, the third (created
    # earlier, stored later, as a slow request's commit is) is not: it waits all the same, or
    # the cursor would pass the second and never come back for it.
    store.append_generations(
        [generation("old", NOW - 600), generation("young", NOW - 10), generation("late", NOW - 300)]
    )
    first = read_window(store, Cursor(), config(tmp_path), now=NOW, live_version="v0001", seed=0)
    assert sorted(first.generations) == ["old"]
    assert first.new_generations == 1
    assert first.next_generation_seq == store.get_generations(["old"])["old"].seq

    cursor = Cursor(generation_seq=first.next_generation_seq)
    later = NOW + JOIN_WINDOW_S
    second = read_window(store, cursor, config(tmp_path), now=later, live_version="v0001", seed=0)
    assert sorted(second.generations) == ["late", "young"]
    assert second.next_generation_seq == store.max_seq()[0]


def test_a_generation_exactly_as_old_as_the_join_window_is_settled(
    store: ReplayStore, tmp_path: Path
) -> None:
    store.append_generations([generation("edge", NOW - JOIN_WINDOW_S)])
    window = read_window(store, Cursor(), config(tmp_path), now=NOW, live_version=None, seed=0)
    assert list(window.generations) == ["edge"]


def test_new_feedback_brings_in_its_generation_however_young_and_moves_the_feedback_cursor(
    store: ReplayStore, tmp_path: Path
) -> None:
    store.append_generations([generation("rated", NOW - 1)])
    store.insert_feedback([rating("e1", "rated", NOW - 30), rating("e2", "rated", NOW - 5)])
    window = read_window(store, Cursor(), config(tmp_path), now=NOW, live_version=None, seed=0)
    assert list(window.generations) == ["rated"]
    assert [e.event_id for e in window.events] == ["e1", "e2"]
    assert window.new_events == 2
    assert window.next_feedback_seq == store.max_seq()[1]
    assert window.next_generation_seq == 0  # the generation itself has not settled
    assert window.newest_event_age_s == pytest.approx(5.0)
    assert window.oldest_event_age_s == pytest.approx(30.0)


def test_data_past_the_version_lag_or_the_age_bound_is_dropped_and_counted(
    store: ReplayStore, tmp_path: Path
) -> None:
    store.append_generations(
        [
            generation("stale", NOW - 600, version="v0001"),  # 3 versions behind v0004
            generation("lagging", NOW - 600, version="v0002"),  # 2 behind: at the bound, kept
            generation("ancient", NOW - 7200, version="v0004"),  # older than max_data_age_s
            generation("aged", NOW - 3600, version="v0004"),  # exactly that old: kept
            generation("fresh", NOW - 600, version="v0004"),
        ]
    )
    bounds = config(tmp_path, max_version_lag=2, max_data_age_s=3600.0)
    window = read_window(store, Cursor(), bounds, now=NOW, live_version="v0004", seed=0)
    assert sorted(window.generations) == ["aged", "fresh", "lagging"]
    assert window.dropped_stale == 2
    assert window.notes == ["dropped 2 generations older than the staleness bounds"]


def test_feedback_lag_is_measured_to_the_fraction_of_a_second(
    store: ReplayStore, tmp_path: Path
) -> None:
    store.append_generations([generation("rated", NOW - 1)])
    store.insert_feedback([rating("e1", "rated", NOW - 0.25)])
    window = read_window(store, Cursor(), config(tmp_path), now=NOW, live_version=None, seed=0)
    assert window.newest_event_age_s == window.oldest_event_age_s == pytest.approx(0.25)


def settle(store: ReplayStore, tmp_path: Path, gids: list[str]) -> Cursor:
    """Store settled generations and read them in one round: the cursor after it."""
    store.append_generations([generation(g, NOW - 600) for g in gids])
    first = read_window(store, Cursor(), config(tmp_path), now=NOW, live_version=None, seed=0)
    assert sorted(first.generations) == sorted(gids)
    return Cursor(first.next_generation_seq, first.next_feedback_seq)


def test_a_later_round_replays_a_sample_of_the_generations_before_its_cursor(
    store: ReplayStore, tmp_path: Path
) -> None:
    cursor = settle(store, tmp_path, ["old1", "old2"])
    store.append_generations([generation("new", NOW - 600)])
    replaying = config(tmp_path, replay_sample_size=2)
    window = read_window(store, cursor, replaying, now=NOW, live_version=None, seed=0)
    assert sorted(window.generations) == ["new", "old1", "old2"]
    assert (window.new_generations, window.replayed) == (1, 2)


def test_a_sample_of_one_replays_the_one_generation_before_the_first_cursor_step(
    store: ReplayStore, tmp_path: Path
) -> None:
    cursor = settle(store, tmp_path, ["old"])
    assert cursor.generation_seq == 1
    replaying = config(tmp_path, replay_sample_size=1)
    window = read_window(store, cursor, replaying, now=NOW, live_version=None, seed=0)
    assert (sorted(window.generations), window.replayed) == (["old"], 1)


def test_a_replayed_generation_already_in_the_window_is_not_counted_again(
    store: ReplayStore, tmp_path: Path
) -> None:
    cursor = settle(store, tmp_path, ["old"])
    store.insert_feedback([rating("e1", "old", NOW)])  # brings it in as new feedback
    replaying = config(tmp_path, replay_sample_size=1)
    window = read_window(store, cursor, replaying, now=NOW, live_version=None, seed=0)
    assert (sorted(window.generations), window.replayed) == (["old"], 0)


def test_a_cursor_reads_back_what_it_wrote_and_defaults_what_is_missing() -> None:
    cursor = Cursor(generation_seq=7, feedback_seq=9, kl_coef=0.05, rounds=3)
    assert cursor.to_dict() == {
        "generation_seq": 7,
        "feedback_seq": 9,
        "kl_coef": 0.05,
        "rounds": 3,
    }
    assert Cursor.from_dict(cursor.to_dict()) == cursor
    assert Cursor.from_dict(None) == Cursor.from_dict({}) == Cursor(0, 0, None, 0)
    assert Cursor.from_dict({"kl_coef": 0.1}) == Cursor(0, 0, 0.1, 0)
    assert Cursor.from_dict({"generation_seq": "5", "feedback_seq": 6.0, "rounds": 2}) == Cursor(
        5, 6, None, 2
    )
    assert isinstance(Cursor.from_dict({"generation_seq": "5"}).generation_seq, int)


def test_version_numbers_are_read_from_the_registry_names() -> None:
    assert version_number("v0012") == 12
    assert version_number("candidate-v3") == 3
    assert version_number("v12x") is None
    assert version_number(None) is None
    assert version_number("") is None


def test_a_windows_figures_name_each_count_and_lag() -> None:
    window = Window(
        generations={"g1": generation("g1", NOW), "g2": generation("g2", NOW)},
        events=[rating("e1", "g1", NOW)],
        new_events=3,
        new_generations=4,
        replayed=5,
        dropped_stale=6,
        next_generation_seq=7,
        next_feedback_seq=8,
        newest_event_age_s=1.5,
        oldest_event_age_s=2.5,
    )
    assert window.figures() == {
        "window_generations": 2,
        "window_events": 1,
        "new_events": 3,
        "new_generations": 4,
        "replayed_generations": 5,
        "dropped_stale": 6,
        "dropped_unusable": 0,
        "generation_seq_after": 7,
        "feedback_seq_after": 8,
        "newest_event_age_s": 1.5,
        "oldest_event_age_s": 2.5,
    }
    lagless = Window({}, [], 0, 0, 0, 0, 0, 0)
    assert math.isnan(lagless.newest_event_age_s) and math.isnan(lagless.oldest_event_age_s)
    assert lagless.notes == []

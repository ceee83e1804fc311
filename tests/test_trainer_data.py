"""The training window (trainer.data.read_window) on hand-built records: each event counts once."""

from __future__ import annotations

from pathlib import Path

from store_support import generation, rating

from feedloop.core.store import open_store
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.data import Cursor, read_window

SERVED_AT = 1000.0
RATED_AT = 2000.0  # store_support.rating's received_at


def test_a_generation_rated_inside_the_join_window_is_not_trained_on_again_once_settled(
    tmp_path: Path,
) -> None:
    store = open_store(str(tmp_path / "replay.sqlite3"))
    store.append_generations([generation(g, t=SERVED_AT) for g in ("rated", "unrated")])
    store.insert_feedback([rating("e1", "rated")])
    config = TrainConfig(data_dir=tmp_path, join_window_s=30.0, replay_sample_size=0)

    # Round 1, inside the window: the rating is consumed with its generation; the unrated one waits.
    first = read_window(store, Cursor(), config, now=SERVED_AT + 10, live_version="v0001", seed=0)
    assert set(first.generations) == {"rated"}
    assert [e.event_id for e in first.events] == ["e1"]
    assert first.next_generation_seq == 0

    # Round 2, after the window: only the unrated generation is new; the rated one and its event
    # were consumed in round 1.
    cursor = Cursor(first.next_generation_seq, first.next_feedback_seq)
    second = read_window(store, cursor, config, now=RATED_AT + 60, live_version="v0001", seed=0)
    assert set(second.generations) == {"unrated"}
    assert second.events == []
    assert second.new_generations == 1
    assert second.next_generation_seq == store.max_seq()[0]
    store.close()


def test_a_generation_rated_after_it_settled_comes_back_with_its_new_feedback(
    tmp_path: Path,
) -> None:
    store = open_store(str(tmp_path / "replay.sqlite3"))
    store.append_generations([generation("late", t=SERVED_AT)])
    config = TrainConfig(data_dir=tmp_path, join_window_s=30.0, replay_sample_size=0)
    first = read_window(store, Cursor(), config, now=SERVED_AT + 60, live_version="v0001", seed=0)
    assert set(first.generations) == {"late"} and first.events == []

    store.insert_feedback([rating("e1", "late")])
    cursor = Cursor(first.next_generation_seq, first.next_feedback_seq)
    second = read_window(store, cursor, config, now=RATED_AT + 60, live_version="v0001", seed=0)
    assert set(second.generations) == {"late"}
    assert [e.event_id for e in second.events] == ["e1"]
    store.close()

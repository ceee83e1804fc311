"""trainer.data on hand-built records: the window counts each event once, and the round's
tensors (build_experience) carry exactly the usable generations and corrections."""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from store_support import generation, rating

from feedloop.core.store import open_store
from feedloop.core.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.data import (
    Cursor,
    build_experience,
    encode_correction,
    learnable,
    read_window,
)
from feedloop.trainer.rewards import CorrectionTarget

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


TOKENIZER = Tokenizer.build(["warm sun"])  # after the 5 special tokens: sun 5, warm 6
SUN, WARM = 5, 6


def test_a_correction_is_encoded_with_eos_only_when_every_word_is_known() -> None:
    assert encode_correction(TOKENIZER, "warm sun") == [WARM, SUN, EOS_ID]
    assert encode_correction(TOKENIZER, "warm cold") is None
    assert encode_correction(TOKENIZER, "") is None


def test_the_experience_holds_the_usable_generations_and_known_corrections_as_float32() -> None:
    g = generation("g")
    long = dataclasses.replace(g, output_ids=[SUN, WARM], behaviour_logprobs=[-1.0, -0.5])
    short = dataclasses.replace(g, output_ids=[WARM], behaviour_logprobs=[-0.25])
    no_output = dataclasses.replace(g, output_ids=[], behaviour_logprobs=[])
    # Whole numbers (a TOML default reward of 0, a weight of 2) still give float tensors.
    examples = [(long, 1, 1), (no_output, 1.0, 1.0), (short, -1, 2), (long, 1.0, 0.0)]
    corrections = [
        CorrectionTarget("warm", "warm sun", 1),
        CorrectionTarget("sun", "cold sun", 0.5),  # "cold" is not in the vocabulary
        CorrectionTarget("", "sun", 2),  # no prompt word: one <unk>
    ]
    experience, skipped = build_experience(TOKENIZER, examples, corrections)
    assert experience is not None and skipped == 1
    assert experience.batch.prompt_ids.tolist() == [g.prompt_ids, g.prompt_ids]
    assert experience.batch.output_ids.tolist() == [[SUN, WARM], [WARM, PAD_ID]]
    assert experience.behaviour_logprobs.tolist() == [[-1.0, -0.5], [-0.25, 0.0]]
    assert experience.rewards.tolist() == [1.0, -1.0]
    assert experience.weights.tolist() == [1.0, 2.0]
    assert experience.corrections is not None and experience.correction_weights is not None
    assert experience.corrections.prompt_ids.tolist() == [[WARM], [UNK_ID]]
    assert experience.corrections.output_ids.tolist() == [
        [WARM, SUN, EOS_ID],
        [SUN, EOS_ID, PAD_ID],
    ]
    assert experience.correction_weights.tolist() == [1.0, 2.0]
    for t in (
        experience.behaviour_logprobs,
        experience.rewards,
        experience.weights,
        experience.correction_weights,
    ):
        assert t.dtype == torch.float32


def test_corrections_alone_train_beside_one_placeholder_sequence_of_weight_zero() -> None:
    experience, skipped = build_experience(TOKENIZER, [], [CorrectionTarget("sun", "warm", 1.0)])
    assert experience is not None and skipped == 0
    assert experience.batch.prompt_ids.tolist() == [[UNK_ID]]
    assert experience.batch.output_ids.tolist() == [[EOS_ID]]
    assert experience.behaviour_logprobs.tolist() == [[0.0]]
    assert experience.rewards.tolist() == [0.0] and experience.weights.tolist() == [0.0]
    assert experience.corrections is not None


def test_generations_alone_make_an_experience_without_corrections() -> None:
    experience, skipped = build_experience(TOKENIZER, [(generation("g"), 0.5, 1.0)], [])
    assert experience is not None and skipped == 0
    assert experience.size == 1
    assert experience.corrections is None and experience.correction_weights is None


def test_nothing_usable_makes_no_experience_and_counts_the_skipped_corrections() -> None:
    unusable = [(dataclasses.replace(generation("g"), output_ids=[]), 1.0, 1.0)]
    corrections = [CorrectionTarget("sun", "cold", 1.0), CorrectionTarget("sun", "", 1.0)]
    assert build_experience(TOKENIZER, unusable, corrections) == (None, 2)


@pytest.mark.parametrize(
    "change",
    [
        {"behaviour_logprobs": [-0.5, math.nan]},
        {"behaviour_logprobs": [math.inf]},
        {"policy_logprobs": [-math.inf, -0.5]},
        {"sampling": {"temperature": 1e-38}},
        {"sampling": {"top_p": 0.0}},
        {"sampling": {"not_a_parameter": 1}},
    ],
)
def test_a_generation_with_non_finite_logprobs_or_invalid_sampling_is_not_learnable(
    change: dict[str, object],
) -> None:
    assert learnable(generation("g"))
    assert not learnable(dataclasses.replace(generation("g"), **change))  # type: ignore[arg-type]


def test_the_window_skips_unusable_rows_and_reports_them(tmp_path: Path) -> None:
    path = tmp_path / "replay.db"
    store = open_store(str(path))
    store.append_generations([generation("good"), generation("other"), generation("third")])
    store.insert_feedback([rating("e1", "good"), rating("e2", "other"), rating("e3", "third")])
    store.close()
    with sqlite3.connect(path) as conn:  # what an older server let through
        conn.execute(
            "UPDATE generations SET behaviour_logprobs = '[NaN]' WHERE generation_id = 'other'"
        )
    store = open_store(str(path))
    config = TrainConfig(join_window_s=0.0, max_data_age_s=1e12, replay_sample_size=0)
    window = read_window(store, Cursor(), config, now=time.time(), live_version="v0001", seed=1)
    store.close()
    assert set(window.generations) == {"good", "third"}
    assert window.dropped_unusable == 1 and window.figures()["dropped_unusable"] == 1
    assert [e.event_id for e in window.events] == ["e1", "e3"]
    assert (
        window.notes[-1].startswith("skipped 1 unusable generations")
        and "other" in window.notes[-1]
    )
    clean = read_window(
        open_store(str(tmp_path / "clean.db")),
        Cursor(),
        config,
        now=time.time(),
        live_version=None,
        seed=1,
    )
    assert clean.dropped_unusable == 0 and not clean.notes

"""Simulated users: preferences as true rewards, edits towards them, noisy feedback."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from feedloop.demo.simusers import (
    AvoidWord,
    Candidate,
    ContainsKeyword,
    IncludeWord,
    Length,
    SimulatedUser,
    content_length,
    parse_preference,
    to_scale,
)

RNG = random.Random(0)


def test_include_word_rewards_phrases_with_the_word_and_corrects_by_inserting_it() -> None:
    pref = IncludeWord("little")
    assert pref.reward("a little reminder") == 1.0
    assert pref.reward("a big reminder") == 0.0
    corrected = pref.correct("a big reminder!", "", RNG)
    assert corrected is not None and pref.reward(corrected) == 1.0
    assert corrected.endswith("!")  # inserted before the closing punctuation
    assert pref.correct("a little reminder", "", RNG) is None


def test_avoid_word_rewards_its_absence_and_corrects_by_deleting_it() -> None:
    pref = AvoidWord("the")
    assert pref.reward("the sunny village") == 0.0
    assert pref.reward("a sunny village") == 1.0
    assert pref.correct("the sunny village", "", RNG) == "sunny village"
    assert pref.correct("the", "", RNG) is None  # nothing left to keep


def test_length_rewards_phrases_near_the_target_and_shortens_long_ones() -> None:
    pref = Length(target_words=3, width_words=6.0)
    assert pref.reward("one two three") == 1.0
    assert pref.reward("one two three four five six") == pytest.approx(0.5)
    assert pref.reward("a b c d e f g h i j") == 0.0
    corrected = pref.correct("the sunny village of bold posters", "posters", RNG)
    assert corrected is not None and content_length(corrected) == 3 and "posters" in corrected
    assert pref.correct("one two", "", RNG) is None


def test_contains_keyword_rewards_the_share_of_prompt_keywords_present() -> None:
    pref = ContainsKeyword()
    assert pref.reward("the sunny village", "sunny village") == 1.0
    assert pref.reward("the sunny town", "sunny village") == 0.5
    corrected = pref.correct("the town", "sunny village", RNG)
    assert corrected is not None and pref.reward(corrected, "sunny village") == 1.0


def test_preferences_parse_from_their_names() -> None:
    assert parse_preference("include:Cozy") == IncludeWord("cozy")
    assert parse_preference("avoid:the") == AvoidWord("the")
    assert parse_preference("length:4") == Length(4)
    assert parse_preference("keyword") == ContainsKeyword()
    with pytest.raises(ValueError, match="unknown preference"):
        parse_preference("taste:sweet")


def test_rating_scales_map_a_unit_score() -> None:
    assert to_scale(0.7, "unit") == 0.7
    assert to_scale(0.7, "thumbs") == 1.0 and to_scale(0.2, "thumbs") == 0.0
    assert to_scale(0.0, "stars5") == 1.0 and to_scale(1.0, "stars5") == 5.0


CANDIDATES = [
    Candidate("g1", "a little lamp"),
    Candidate("g2", "a big lamp"),
    Candidate("g3", "the lamp"),
]


def test_a_noiseless_user_compares_and_ranks_by_true_reward() -> None:
    user = SimulatedUser(IncludeWord("little"), mix={"ranking": 1.0}, noise_sd=0.0)
    (ranking,) = user.respond("lamp", CANDIDATES)
    assert ranking.kind == "ranking" and ranking.generation_ids[0] == "g1"
    user = SimulatedUser(IncludeWord("little"), mix={"comparison": 1.0}, noise_sd=0.0, seed=3)
    for _ in range(10):
        (comparison,) = user.respond("lamp", CANDIDATES[:2])
        assert comparison.generation_ids == ["g1", "g2"]


def test_ratings_carry_noise_on_the_chosen_scale() -> None:
    user = SimulatedUser(IncludeWord("little"), mix={"rating": 1.0}, noise_sd=0.3, scale="stars5")
    scores = [e.score for _ in range(50) for e in user.respond("lamp", CANDIDATES[:1])]
    assert set(scores) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(set(scores)) > 1  # noisy
    assert sum(scores) / len(scores) > 3.5  # the true reward (1.0) shows through


def test_corrections_edit_the_worst_candidate() -> None:
    user = SimulatedUser(IncludeWord("little"), mix={"correction": 1.0})
    (correction,) = user.respond("lamp", CANDIDATES[:2])
    assert correction.kind == "correction" and correction.generation_ids == ["g2"]
    assert correction.text is not None and "little" in correction.text


def test_users_fall_back_to_rating_when_their_kind_cannot_apply() -> None:
    comparer = SimulatedUser(IncludeWord("little"), mix={"comparison": 1.0})
    assert [e.kind for e in comparer.respond("lamp", CANDIDATES[:1])] == ["rating"]
    corrector = SimulatedUser(IncludeWord("little"), mix={"correction": 1.0})
    assert {e.kind for e in corrector.respond("lamp", CANDIDATES[:1])} == {"rating"}


def test_the_mix_decides_how_often_each_kind_is_given() -> None:
    user = SimulatedUser(AvoidWord("lamp"), seed=1, mix={"rating": 0.5, "comparison": 0.5})
    kinds = Counter(user.respond("lamp", CANDIDATES)[0].kind for _ in range(400))
    assert set(kinds) == {"rating", "comparison"}
    assert 150 < kinds["comparison"] < 250


def test_a_bad_mix_or_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="mix"):
        SimulatedUser(IncludeWord("x"), mix={"shouting": 1.0})
    with pytest.raises(ValueError, match="scale"):
        SimulatedUser(IncludeWord("x"), scale="percent")


def test_simulated_users_import_without_torch() -> None:
    code = "import sys, feedloop.demo.simusers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

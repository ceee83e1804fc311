"""Issue 21's taste: the last word's first letter, and the letter sets that make taste pairs
(demo/simusers.py's LastWordInitial, demo/tastes.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from feedloop.demo.cli import plan_drift
from feedloop.demo.options import build_parser
from feedloop.demo.simusers import Candidate, LastWordInitial, SimulatedUser, parse_preference
from feedloop.demo.tastes import (
    initial_shares,
    last_word_initial,
    pick_letter_sets,
    policy_initial_shares,
    set_share,
    taste_names,
    taste_sets,
)


def test_a_phrase_is_liked_when_its_last_word_starts_with_one_of_the_letters() -> None:
    taste = parse_preference("initial:BCD")
    assert taste == LastWordInitial("bcd") and taste.name == "initial:bcd"
    assert taste.reward("a good day") == 1.0  # "day"
    assert taste.reward("a good day !") == 1.0  # punctuation is not a word
    assert taste.reward("Call me, Bob.") == 1.0
    assert taste.reward("day after day, again") == 0.0  # "again"
    assert taste.reward("!") == 0.0 and taste.reward("") == 0.0
    assert taste.correct("a good night", "", random.Random(0)) is None


def test_bad_letter_sets_are_refused() -> None:
    for bad in ("initial:", "initial:b1", "initial:bb"):
        with pytest.raises(ValueError):
            parse_preference(bad)


def test_a_user_with_this_taste_rates_instead_of_correcting() -> None:
    user = SimulatedUser(LastWordInitial("d"), mix={"correction": 1.0}, seed=1)
    [feedback] = user.respond("day", [Candidate("g1", "a day")])
    assert feedback.kind == "rating" and feedback.score is not None and feedback.score > 0.5


def test_letter_shares_count_every_phrase_and_only_letters() -> None:
    shares = initial_shares(["a day", "the dog", "a night", "42", "!"])
    assert shares == {"d": 0.4, "n": 0.2}
    assert last_word_initial("it is 42") is None
    with pytest.raises(ValueError):
        initial_shares([])


SHARES = {"a": 0.10, "b": 0.20, "c": 0.05, "d": 0.15, "e": 0.30, "f": 0.12}


def test_letter_sets_are_built_greedily_towards_the_target_share() -> None:
    """Order a..f, target 0.25 (worked by hand):
    set 1: a (0.10, |0.10-0.25| < 0.25), b (0.30, 0.05 < 0.15); c..f move it away: "ab";
    set 2: c (0.05), d (0.20, 0.05 < 0.20); e (0.50) and f (0.32, 0.07 > 0.05) do not: "cd";
    set 3: e (0.30); f (0.42) does not: "e"; set 4: "f"; a fifth set stays empty."""
    assert pick_letter_sets(SHARES, 3, 0.25, "abcdef") == ["ab", "cd", "e"]
    assert pick_letter_sets(SHARES, 4, 0.25, "abcdef")[3] == "f"
    with pytest.raises(ValueError, match="set 5 stays empty"):
        pick_letter_sets(SHARES, 5, 0.25, "abcdef")
    assert set_share(SHARES, "ab") == pytest.approx(0.30)


def test_taste_sets_are_disjoint_and_the_same_for_the_same_seed() -> None:
    first = taste_sets(SHARES, 2, seed=1)
    assert first == taste_sets(SHARES, 2, seed=1)
    assert not set(first[0]) & set(first[1])
    assert {tuple(taste_sets(SHARES, 2, seed=s)) for s in range(6)} != {tuple(first)}
    assert taste_names(["ab", "cd"]) == ["initial:ab", "initial:cd"]


def test_the_policys_own_phrases_give_letter_shares_reproducibly(tiny_checkpoint: Path) -> None:
    prompts = ["good morning", "day", "night"]
    shares = policy_initial_shares(tiny_checkpoint, prompts, samples_per_prompt=4, seed=5)
    assert shares == policy_initial_shares(tiny_checkpoint, prompts, samples_per_prompt=4, seed=5)
    assert 0 < sum(shares.values()) <= 1.0


def test_the_demos_drift_mode_plans_tastes_and_changes_from_the_seed(
    tiny_checkpoint: Path,
) -> None:
    args = build_parser().parse_args(["--drift", "twice", "--duration-s", "300", "--seed", "2"])
    plan_drift(args, tiny_checkpoint)
    first = args.preference
    assert first.startswith("initial:")
    second, third = (c.partition("@")[0] for c in args.taste_change)
    assert [c.partition("@")[2] for c in args.taste_change] == ["100", "200"]
    letters = [set(t.removeprefix("initial:")) for t in (first, second, third)]
    assert not (letters[0] & letters[1] or letters[1] & letters[2] or letters[0] & letters[2])
    gradual = build_parser().parse_args(["--drift", "gradual", "--drift-at-s", "60", "--seed", "2"])
    plan_drift(gradual, tiny_checkpoint)
    assert gradual.preference == first and gradual.taste_change == [f"{second}@60-120"]

"""Feedback to learning signals: rating scales, aggregation, client caps, pairs, corrections."""

from __future__ import annotations

import pytest

from feedloop.core.feedback_kinds import normalise_rating
from feedloop.core.store.base import FeedbackRecord, GenerationRecord
from feedloop.trainer.rewards import (
    RATING_PAIR_MIN_GAP,
    RatedGeneration,
    aggregate,
    client_weights,
    correction_targets,
    feedback_kinds,
    preference_pairs,
    rated_generations,
)


def generation(gid: str, text: str, request: str = "r1") -> GenerationRecord:
    return GenerationRecord(
        generation_id=gid,
        request_id=request,
        prompt="sunny",
        prompt_ids=[5],
        output_ids=[6, 2],
        behaviour_logprobs=[-1.0, -0.5],
        policy_logprobs=[-1.0, -0.5],
        finished=True,
        text=text,
        sampling={},
        model_version="v0001",
        client_id="app",
        created_at=0.0,
    )


def event(
    eid: str, kind: str, ids: list[str], client: str = "u1", at: float = 0.0, **kw: object
) -> FeedbackRecord:
    return FeedbackRecord(
        event_id=eid,
        kind=kind,
        generation_ids=ids,
        client_id=client,  # type: ignore[arg-type]
        received_at=at,
        **kw,
    )  # type: ignore[arg-type]


def by_event_id(weights: dict[tuple[str, str], float]) -> dict[str, float]:
    """Weights by event id alone, for tests whose event ids are all distinct."""
    return {event_id: w for (_, event_id), w in weights.items()}


def test_two_clients_events_of_the_same_id_keep_their_own_weights() -> None:
    """Event ids are unique per client (tenant) only: one client's flood must not lend its
    cut weight to another client's event that happens to share an id."""
    events = [event(f"e{i}", "rating", ["g"], client="flood") for i in range(8)]
    events += [event("e0", "rating", ["g"], client="quiet")]
    weights = client_weights(events, 0.5)
    assert len(weights) == 9
    assert weights["quiet", "e0"] == 1.0
    assert weights["flood", "e0"] == pytest.approx(1 / 8)


@pytest.mark.parametrize(
    ("score", "scale", "expected"),
    [
        (0.0, "unit", -1.0),
        (1.0, "unit", 1.0),
        (0.75, "unit", 0.5),
        (0.5, None, 0.0),
        (0.0, "thumbs", -1.0),
        (1.0, "thumbs", 1.0),
        (1.0, "stars5", -1.0),
        (3.0, "stars5", 0.0),
        (4.0, "stars5", 0.5),
        (5.0, "stars5", 1.0),
        (9.0, "stars5", 1.0),
        (-3.0, "unit", -1.0),
    ],
)
def test_ratings_are_normalised_from_their_scale_to_minus_one_one(
    score: float, scale: str | None, expected: float
) -> None:
    assert normalise_rating(score, scale) == pytest.approx(expected)


def test_an_unknown_rating_scale_is_an_error() -> None:
    with pytest.raises(ValueError, match="scale"):
        normalise_rating(1.0, "percent")


def test_aggregation_rules_combine_several_ratings_as_declared() -> None:
    values = [(2.0, 0.5, 1.0), (1.0, -1.0, 1.0), (3.0, 1.0, 2.0)]  # (time, value, weight)
    assert aggregate(values, "mean") == pytest.approx((0.5 - 1.0 + 2.0) / 4)
    assert aggregate(values, "earliest") == -1.0
    assert aggregate(values, "latest") == 1.0
    assert aggregate(values, "sum") == pytest.approx(0.5 - 1.0 + 2.0)
    with pytest.raises(ValueError, match="rule"):
        aggregate(values, "median")


def test_aggregating_nothing_is_an_error_that_says_so() -> None:
    with pytest.raises(ValueError, match=r"^nothing to aggregate$"):
        aggregate([], "mean")


def test_a_mean_of_ratings_that_all_weigh_zero_is_zero() -> None:
    assert aggregate([(1.0, 1.0, 0.0), (2.0, 0.5, 0.0)], "mean") == 0.0


def test_earliest_and_latest_go_by_time_not_by_value() -> None:
    values = [(1.0, 1.0, 1.0), (3.0, -0.5, 1.0), (2.0, 0.0, 1.0)]  # (time, value, weight)
    assert aggregate(values, "earliest") == 1.0
    assert aggregate(values, "latest") == -0.5


def test_ratings_given_at_the_same_instant_go_to_the_first_in_order_not_the_larger_value() -> None:
    assert aggregate([(1.0, 0.5, 1.0), (1.0, -0.5, 1.0)], "earliest") == 0.5
    assert aggregate([(1.0, -0.5, 1.0), (1.0, 0.5, 1.0)], "latest") == -0.5


def test_a_rated_generation_weighs_the_mean_of_its_ratings_weights_one_when_uncapped() -> None:
    events = [
        event("a", "rating", ["g1"], score=5.0, scale="stars5"),
        event("b", "rating", ["g1"], score=4.0, scale="stars5"),
        event("c", "rating", ["g2"], score=1.0, scale="thumbs"),
    ]
    rated = rated_generations(events, {("u1", "a"): 1.0, ("u1", "b"): 0.5}, "mean")
    assert rated["g1"].reward == pytest.approx((1.0 * 1.0 + 0.5 * 0.5) / 1.5)  # on its scale
    assert rated["g1"].weight == pytest.approx(0.75)
    assert rated["g1"].events == 2
    assert rated["g2"] == RatedGeneration(1.0, 1.0, 1)  # no weight given: 1


def test_rated_generations_use_the_users_time_when_given() -> None:
    events = [
        event("a", "rating", ["g1"], at=10.0, score=1.0, scale="unit", given_at=1.0),
        event("b", "rating", ["g1"], at=5.0, score=0.0, scale="unit"),
    ]
    rated = rated_generations(events, {}, "earliest")
    assert rated["g1"].reward == 1.0  # given at 1.0, before the other's 5.0
    assert rated["g1"].events == 2


def test_no_client_carries_more_than_its_share_of_the_weight() -> None:
    events = [event(f"a{i}", "rating", ["g"], client="flood") for i in range(8)]
    events += [event("b", "rating", ["g"], client="b"), event("c", "rating", ["g"], client="c")]
    weights = by_event_id(client_weights(events, 0.5))
    flood = sum(w for eid, w in weights.items() if eid.startswith("a"))
    assert flood / sum(weights.values()) == pytest.approx(0.5)
    assert weights["b"] == weights["c"] == 1.0


def test_client_cap_leaves_a_balanced_batch_alone() -> None:
    events = [event(f"e{i}", "rating", ["g"], client=f"u{i % 4}") for i in range(8)]
    assert set(client_weights(events, 0.3).values()) == {1.0}


def test_with_too_few_clients_for_the_cap_every_client_weighs_the_same() -> None:
    events = [event(f"a{i}", "rating", ["g"], client="a") for i in range(9)]
    events.append(event("b", "rating", ["g"], client="b"))
    weights = by_event_id(client_weights(events, 0.3))  # two clients cannot each stay under 30%
    a_total = sum(w for eid, w in weights.items() if eid.startswith("a"))
    assert a_total == pytest.approx(weights["b"])
    assert all(w > 0 for w in weights.values())


def test_no_events_get_no_weights() -> None:
    assert client_weights([], 0.5) == {}


def test_with_no_cap_every_event_weighs_one() -> None:
    events = [event(f"a{i}", "rating", ["g"], client="flood") for i in range(9)]
    events.append(event("b", "rating", ["g"], client="b"))
    assert set(client_weights(events, 1.0).values()) == {1.0}


def test_clients_exactly_at_the_cap_keep_weight_one() -> None:
    # cap 1/4: the flood is cut to 1 in 4 of the total; b, c and d sit exactly at the cap.
    events = [event(f"a{i}", "rating", ["g"], client="flood") for i in range(3)]
    events += [event(c, "rating", ["g"], client=c) for c in ("b", "c", "d")]
    weights = by_event_id(client_weights(events, 0.25))
    assert weights["b"] == weights["c"] == weights["d"] == 1.0
    assert weights["a0"] == pytest.approx(1 / 3)


def test_with_too_few_clients_for_the_cap_the_total_weight_is_the_number_of_events() -> None:
    events = [event(f"a{i}", "rating", ["g"], client="a") for i in range(9)]
    events.append(event("b", "rating", ["g"], client="b"))
    weights = by_event_id(client_weights(events, 0.3))
    assert weights["b"] == pytest.approx(5.0)  # each client weighs the mean count, 10 / 2
    assert sum(weights.values()) == pytest.approx(10.0)


def test_a_single_client_keeps_full_weight() -> None:
    events = [event(f"a{i}", "rating", ["g"]) for i in range(5)]
    assert set(client_weights(events, 0.5).values()) == {1.0}


def test_capped_weights_flow_into_the_mean_rating() -> None:
    events = [
        event(f"a{i}", "rating", ["g"], client="flood", score=0.0, scale="unit") for i in range(8)
    ]
    events += [
        event("b", "rating", ["g"], client="b", score=1.0, scale="unit"),
        event("c", "rating", ["g"], client="c", score=1.0, scale="unit"),
    ]
    rated = rated_generations(events, client_weights(events, 0.5), "mean")
    assert rated["g"].reward == pytest.approx(0.0)  # half -1 (capped flood), half +1


def test_rankings_expand_to_every_implied_pair_weighing_like_n_minus_one_comparisons() -> None:
    gens = {g: generation(g, f"text {g}") for g in ("g1", "g2", "g3")}
    pairs = preference_pairs([event("r", "ranking", ["g2", "g1", "g3"])], gens, {}, {})
    assert {(p.preferred_text, p.rejected_text) for p in pairs} == {
        ("text g2", "text g1"),
        ("text g2", "text g3"),
        ("text g1", "text g3"),
    }
    assert sum(p.weight for p in pairs) == pytest.approx(2.0)  # 3 pairs of weight 2/3


def test_a_capped_ranking_spreads_its_capped_weight_over_its_pairs() -> None:
    gens = {g: generation(g, f"text {g}") for g in ("g1", "g2", "g3")}
    pairs = preference_pairs(
        [event("r", "ranking", ["g2", "g1", "g3"])], gens, {("u1", "r"): 0.5}, {}
    )
    assert [p.weight for p in pairs] == pytest.approx([1 / 3] * 3)  # 2 * 0.5 / 3 each


def test_a_comparison_naming_other_than_two_generations_is_ignored() -> None:
    gens = {g: generation(g, f"text {g}") for g in ("g1", "g2", "g3")}
    assert preference_pairs([event("c", "comparison", ["g1", "g2", "g3"])], gens, {}, {}) == []


def test_a_correction_that_only_changes_case_or_spaces_is_no_preference() -> None:
    gens = {"g1": generation("g1", "warm sun")}
    for text in ("Warm Sun", "  WARM SUN "):
        assert preference_pairs([event("x", "correction", ["g1"], text=text)], gens, {}, {}) == []


def test_comparisons_and_corrections_become_preferences() -> None:
    gens = {g: generation(g, f"text {g}") for g in ("g1", "g2")}
    events = [
        event("c", "comparison", ["g2", "g1"]),
        event("x", "correction", ["g1"], text="a better text"),
    ]
    pairs = preference_pairs(events, gens, {}, {})
    assert [(p.source, p.preferred_text, p.rejected_text) for p in pairs] == [
        ("comparison", "text g2", "text g1"),
        ("correction", "a better text", "text g1"),
    ]
    assert correction_targets(events, gens, {("u1", "x"): 0.5})[0].weight == 0.5
    assert correction_targets(events, gens, {})[0].weight == 1.0  # uncapped


def test_ratings_of_one_request_give_pairs_only_past_the_noise_gap() -> None:
    gens = {
        "g1": generation("g1", "a"),
        "g2": generation("g2", "b"),
        "g3": generation("g3", "c"),
        "g4": generation("g4", "d", request="other"),
    }
    events = [
        event("1", "rating", ["g1"], score=1.0, scale="unit"),
        event("2", "rating", ["g2"], score=0.95, scale="unit"),
        event("3", "rating", ["g3"], score=0.0, scale="unit"),
        event("4", "rating", ["g4"], score=0.5, scale="unit"),
    ]
    rated = rated_generations(events, {}, "mean")
    pairs = preference_pairs(events, gens, {}, rated)
    assert sorted((p.preferred_text, p.rejected_text) for p in pairs) == [("a", "c"), ("b", "c")]


def test_events_naming_unknown_generations_are_ignored() -> None:
    gens = {"g1": generation("g1", "a")}
    events = [
        event("c", "comparison", ["g1", "gone"]),
        event("x", "correction", ["gone"], text="t"),
    ]
    assert preference_pairs(events, gens, {}, {}) == []
    assert correction_targets(events, gens, {}) == []


GENERATIONS = {"g1": generation("g1", "warm sun"), "g2": generation("g2", "cold rain")}


def test_a_rating_pair_weighs_as_its_lighter_rating() -> None:
    # A capped client's rating (weight 0.5) cannot lend a pair the full weight of the other's.
    rated = {"g1": RatedGeneration(1.0, 0.5, 1), "g2": RatedGeneration(-1.0, 1.0, 1)}
    [pair] = preference_pairs([], GENERATIONS, {}, rated)
    assert (pair.preferred_text, pair.rejected_text) == ("warm sun", "cold rain")
    assert pair.weight == 0.5
    assert (pair.source, pair.key, pair.prompt) == ("rating", "g1>g2", "sunny")


def test_the_better_rated_candidate_is_preferred_whichever_comes_first() -> None:
    rated = {"g1": RatedGeneration(-0.5, 1.0, 1), "g2": RatedGeneration(0.5, 0.25, 2)}
    [pair] = preference_pairs([], GENERATIONS, {}, rated)
    assert (pair.preferred_text, pair.rejected_text) == ("cold rain", "warm sun")
    assert (pair.weight, pair.key) == (0.25, "g2>g1")


def test_the_better_rated_candidate_is_preferred_at_any_gap_past_the_noise_bound() -> None:
    rated = {"g1": RatedGeneration(0.5, 1.0, 1), "g2": RatedGeneration(0.0, 1.0, 1)}
    [pair] = preference_pairs([], GENERATIONS, {}, rated)
    assert (pair.preferred_text, pair.rejected_text) == ("warm sun", "cold rain")


def test_a_gap_of_exactly_the_noise_bound_makes_a_pair_and_a_smaller_one_does_not() -> None:
    assert RATING_PAIR_MIN_GAP == 0.25
    at_bound = {"g1": RatedGeneration(0.5, 1.0, 1), "g2": RatedGeneration(0.25, 1.0, 1)}
    assert len(preference_pairs([], GENERATIONS, {}, at_bound)) == 1
    below = {"g1": RatedGeneration(0.5, 1.0, 1), "g2": RatedGeneration(0.3, 1.0, 1)}
    assert preference_pairs([], GENERATIONS, {}, below) == []


def test_ratings_of_different_requests_or_of_absent_generations_make_no_pair() -> None:
    generations = {"g1": generation("g1", "warm sun"), "g3": generation("g3", "hot", request="r2")}
    rated = {
        "g1": RatedGeneration(1.0, 1.0, 1),
        "g3": RatedGeneration(-1.0, 1.0, 1),
        "gone": RatedGeneration(-1.0, 1.0, 1),
    }
    assert preference_pairs([], generations, {}, rated) == []


def test_feedback_kinds_count_the_events_of_each_kind() -> None:
    events = [
        event("a", "rating", ["g1"], score=1.0),
        event("b", "rating", ["g2"], score=0.0),
        event("c", "comparison", ["g1", "g2"]),
    ]
    assert feedback_kinds(events) == {"rating": 2, "comparison": 1}

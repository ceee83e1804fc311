"""Declared learning knobs: rebalancing of rating classes and feedback kinds, reward shaping,
exploration's cost by arm, and diversity figures; each checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from feedloop.core.diversity import RecentDiversity, diversity
from feedloop.core.store.base import SERVED_EXPLORATION, FeedbackRecord, GenerationRecord
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.gate import diversity_refusal
from feedloop.trainer.metrics import TrainerMetrics
from feedloop.trainer.rewards import (
    RatedGeneration,
    age_weights,
    balance_weights,
    rating_class,
    rebalanced_weights,
    reward_by_arm,
)
from feedloop.trainer.shaping import (
    ShapingTerm,
    finished_term,
    keyword_term,
    length_term,
    parse_shaping,
    shaped_rewards,
)


def gen(gid: str, text: str = "a sunny day", **kw: object) -> GenerationRecord:
    values: dict[str, object] = dict(
        generation_id=gid,
        request_id="r1",
        prompt="sunny day",
        prompt_ids=[5, 6],
        output_ids=[6, 7, 8, 2],
        behaviour_logprobs=[-1.0] * 4,
        policy_logprobs=[-1.0] * 4,
        finished=True,
        text=text,
        sampling={},
        model_version="v0001",
        client_id="app",
        created_at=0.0,
    )
    values.update(kw)
    return GenerationRecord(**values)  # type: ignore[arg-type]


def rating(eid: str, score: float, scale: str = "unit", gid: str = "g") -> FeedbackRecord:
    return FeedbackRecord(eid, "rating", [gid], "u1", 0.0, score=score, scale=scale)  # type: ignore[arg-type]


def comparison(eid: str) -> FeedbackRecord:
    return FeedbackRecord(eid, "comparison", ["a", "b"], "u1", 0.0)


# -- rebalancing ---------------------------------------------------------------------------------


def test_rating_classes_follow_the_sign_of_the_normalised_rating() -> None:
    assert rating_class(rating("e", 1.0, "thumbs")) == "liked"
    assert rating_class(rating("e", 0.0, "thumbs")) == "disliked"
    assert rating_class(rating("e", 0.5)) == "neutral"
    assert rating_class(rating("e", 0.51)) == "liked"
    assert rating_class(rating("e", 0.49)) == "disliked"
    assert rating_class(rating("e", 3, "stars5")) == "neutral"
    assert rating_class(comparison("c")) is None
    assert rating_class(FeedbackRecord("e", "rating", ["g"], "u1", 0.0)) is None  # no score


def test_balance_weights_give_each_label_the_same_total_at_power_one() -> None:
    labels = {"a": "liked", "b": "liked", "c": "liked", "d": "disliked"}
    items, per_label = balance_weights(labels, 1.0)
    # N = 4, K = 2: liked 4 / (2 * 3), disliked 4 / (2 * 1).
    assert per_label == pytest.approx({"liked": 2 / 3, "disliked": 2.0})
    assert items == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 2 / 3, "d": 2.0})
    _, half = balance_weights(labels, 0.5)
    assert half == pytest.approx({"liked": math.sqrt(2 / 3), "disliked": math.sqrt(2.0)})
    _, off = balance_weights(labels, 0.0)
    assert off == {"liked": 1.0, "disliked": 1.0}
    assert balance_weights({}, 1.0) == ({}, {})


def test_rebalanced_weights_multiply_client_class_and_kind_weights_and_report_them() -> None:
    events = [
        rating("l1", 1.0),
        rating("l2", 1.0),
        rating("l3", 0.9),
        rating("d1", 0.0),
        comparison("c1"),
        comparison("c2"),
    ]
    client = {("u1", "l1"): 0.5, ("u1", "c1"): 2.0}  # keyed by (client_id, event_id)
    weights, report = rebalanced_weights(events, client, rating_class_power=1.0, kind_power=1.0)
    # Classes among the 4 ratings: liked 4/(2*3) = 2/3, disliked 2. Kinds among the 6 events:
    # rating 6/(2*4) = 3/4, comparison 6/(2*2) = 3/2.
    assert {event_id: w for (_, event_id), w in weights.items()} == pytest.approx(
        {
            "l1": 0.5 * (2 / 3) * 0.75,
            "l2": (2 / 3) * 0.75,
            "l3": (2 / 3) * 0.75,
            "d1": 2.0 * 0.75,
            "c1": 2.0 * 1.5,
            "c2": 1.5,
        }
    )
    assert {client for client, _ in weights} == {"u1"}
    assert report["rating_classes"] == {"liked": 3, "disliked": 1}
    assert report["rating_class_weights"] == pytest.approx({"liked": 2 / 3, "disliked": 2.0})
    assert report["feedback_kind_weights"] == pytest.approx({"rating": 0.75, "comparison": 1.5})
    unchanged, _ = rebalanced_weights(events, client, rating_class_power=0.0, kind_power=0.0)
    assert {event_id: w for (_, event_id), w in unchanged.items()} == {
        "l1": 0.5,
        "l2": 1.0,
        "l3": 1.0,
        "d1": 1.0,
        "c1": 2.0,
        "c2": 1.0,
    }


def test_reward_by_arm_splits_rated_generations_by_exploration() -> None:
    generations = {
        "p1": gen("p1"),
        "p2": gen("p2"),
        "x1": gen("x1", served_as=SERVED_EXPLORATION),
    }
    rated = {
        "p1": RatedGeneration(1.0, 1.0, 1),
        "p2": RatedGeneration(0.5, 1.0, 1),
        "x1": RatedGeneration(-1.0, 1.0, 1),
        "gone": RatedGeneration(1.0, 1.0, 1),  # not in the window's generations
    }
    arms = reward_by_arm(rated, generations)
    assert arms["policy"] == {"rated": 2, "mean_rating": 0.75}
    assert arms["exploration"] == {"rated": 1, "mean_rating": -1.0}
    empty = reward_by_arm({"p1": rated["p1"]}, generations)["exploration"]
    assert empty["rated"] == 0 and math.isnan(empty["mean_rating"])


# -- shaping -------------------------------------------------------------------------------------


def test_shaping_terms_measure_length_keywords_and_finishing() -> None:
    assert length_term(gen("g", output_ids=[6, 7, 8, 2], finished=True)) == 3.0
    assert length_term(gen("g", output_ids=[6, 7, 8], finished=False)) == 3.0
    assert keyword_term(gen("g", text="a Sunny day at sea")) == 1.0
    assert keyword_term(gen("g", text="a sunny night")) == 0.0  # every keyword, not one
    assert keyword_term(gen("g", text="sunny day", prompt="")) == 0.0
    assert finished_term(gen("g", finished=True)) == 1.0
    assert finished_term(gen("g", finished=False)) == 0.0


def test_parse_shaping_reads_name_weight_pairs_and_refuses_bad_ones() -> None:
    assert parse_shaping(["length:-0.05", " keyword:0.3"]) == (
        ShapingTerm("length", -0.05),
        ShapingTerm("keyword", 0.3),
    )
    assert parse_shaping([]) == ()
    for bad, says in (
        (
            ["brevity:1"],
            r"unknown term 'brevity' in 'brevity:1' \(one of length, keyword, finished\)",
        ),
        (["length"], "needs a finite weight"),
        (["length:x"], "needs a finite weight"),
        (["length:nan"], "needs a finite weight"),
        (["length:inf"], "needs a finite weight"),
        (["length:1", "length:2"], "declared twice"),
    ):
        with pytest.raises(ValueError, match=says):
            parse_shaping(bad)


def test_shaped_rewards_add_each_weighted_term_and_report_it() -> None:
    a = gen("a", text="sunny day here", output_ids=[1, 2, 3, 2], finished=True)  # 3 words, kw
    b = gen("b", text="rain", output_ids=[1, 1, 1, 1, 1], finished=False)  # 5 words, no kw
    terms = (ShapingTerm("length", -0.1), ShapingTerm("keyword", 0.5))
    shaped, report = shaped_rewards([(a, 1.0, 2.0), (b, 0.0, 1.0)], terms)
    assert [(g.generation_id, r, w) for g, r, w in shaped] == [
        ("a", pytest.approx(1.0 - 0.3 + 0.5), 2.0),
        ("b", pytest.approx(0.0 - 0.5), 1.0),
    ]
    assert report["length"] == pytest.approx(
        {"weight": -0.1, "mean_term": 4.0, "mean_contribution": -0.4}
    )
    assert report["keyword"] == pytest.approx(
        {"weight": 0.5, "mean_term": 0.5, "mean_contribution": 0.25}
    )
    assert shaped_rewards([(a, 1.0, 2.0)], ()) == ([(a, 1.0, 2.0)], {})
    assert shaped_rewards([], terms) == ([], {})


def test_trainer_config_refuses_bad_balance_and_shaping_naming_the_knob() -> None:
    for name in ("rating_class_balance", "feedback_kind_balance"):
        for value in (-0.1, 1.1):
            with pytest.raises(ValueError, match=name):
                TrainConfig(**{name: value})  # type: ignore[arg-type]
        TrainConfig(**{name: 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shaping"):
        TrainConfig(shaping=("length:oops",))
    with pytest.raises(ValueError, match="gate_diversity_prompts"):
        TrainConfig(gate_diversity_prompts=0)
    assert TrainConfig(shaping=("finished:0.2",)).shaping_terms == (ShapingTerm("finished", 0.2),)


# -- diversity -----------------------------------------------------------------------------------


def test_diversity_is_mean_negative_logprob_and_distinct_share() -> None:
    d = diversity(["a b", "a b", "c", "d"], [-1.0, -2.0, -3.0, -6.0])
    assert (d.sampled_entropy_nats, d.distinct_phrase_share, d.samples) == (3.0, 0.75, 4)
    empty = diversity([], [])
    assert empty.samples == 0 and math.isnan(empty.sampled_entropy_nats)
    with pytest.raises(ValueError):
        diversity(["a"], [])


def test_recent_diversity_forgets_the_oldest_phrases() -> None:
    recent = RecentDiversity(3)
    assert recent.figures().samples == 0
    for text, logprob in (("a", -1.0), ("a", -2.0), ("b", -3.0)):
        recent.add(text, logprob)
    assert recent.figures() == diversity(["a", "a", "b"], [-1.0, -2.0, -3.0])
    recent.add("c", -7.0)  # the first "a" leaves
    assert recent.figures() == diversity(["a", "b", "c"], [-2.0, -3.0, -7.0])
    recent.add("c", -1.0)
    recent.add("c", -1.0)  # only c left
    assert recent.figures() == diversity(["c", "c", "c"], [-7.0, -1.0, -1.0])
    with pytest.raises(ValueError):
        RecentDiversity(0)


def test_the_gate_refuses_a_candidate_below_either_diversity_floor() -> None:
    c = TrainConfig(gate_min_sampled_entropy_nats=2.0, gate_min_distinct_share=0.5)
    assert diversity_refusal(diversity(["a", "b"], [-2.0, -2.0]), c) is None  # at the floors
    assert diversity_refusal(diversity(["a", "b"], [-1.0, -2.0]), c) == (
        "collapsing: sampled entropy 1.500 nats per phrase (floor 2.0) on its own samples"
    )
    assert diversity_refusal(diversity(["a", "a", "a"], [-9.0] * 3), c) == (
        "collapsing: distinct-phrase share 0.333 (floor 0.5) on its own samples"
    )
    assert diversity_refusal(diversity(["a", "a", "a"], [-1.0] * 3), c) == (
        "collapsing: sampled entropy 1.000 nats per phrase (floor 2.0) and distinct-phrase "
        "share 0.333 (floor 0.5) on its own samples"
    )
    nan = diversity_refusal(diversity([], []), c)
    assert nan is not None  # nothing sampled cannot pass a floor


def test_trainer_metrics_export_the_knobs_figures() -> None:
    metrics = TrainerMetrics()
    figures = {
        "candidate_sampled_entropy_nats": 7.5,
        "candidate_distinct_phrase_share": 0.875,
        "reward_by_arm": {
            "policy": {"rated": 3, "mean_rating": 0.25},
            "exploration": {"rated": 0, "mean_rating": math.nan},
        },
        "rating_class_weights": {"liked": 0.5},
        "feedback_kind_weights": {"rating": 2.0},
        "shaping": {"length": {"weight": -0.1, "mean_term": 3.0, "mean_contribution": -0.3}},
    }
    metrics.observe_round("published", figures, 1.0)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("feedloop_trainer_candidate_sampled_entropy_nats") == 7.5
    assert value("feedloop_trainer_candidate_distinct_phrase_share") == 0.875
    assert value("feedloop_trainer_window_mean_rating_by_arm", arm="policy") == 0.25
    assert value("feedloop_trainer_window_mean_rating_by_arm", arm="exploration") is None
    assert value("feedloop_trainer_balance_weight", group="rating_class", label="liked") == 0.5
    assert value("feedloop_trainer_balance_weight", group="feedback_kind", label="rating") == 2.0
    assert value("feedloop_trainer_shaping_mean_contribution", term="length") == -0.3


def test_age_weights_halve_every_half_life_back_from_the_newest_generation() -> None:
    gens = [
        gen("new", created_at=1000.0),
        gen("old", created_at=900.0),
        gen("older", created_at=700.0),
    ]
    weights, report = age_weights(gens, 100.0)
    assert weights == pytest.approx({"new": 1.0, "old": 0.5, "older": 0.125})
    assert report == pytest.approx(
        {"half_life_s": 100.0, "mean_weight": 1.625 / 3, "min_weight": 0.125}
    )
    short, _ = age_weights([gen("a", created_at=10.0), gen("b", created_at=9.5)], 0.5)
    assert short == {"a": 1.0, "b": 0.5}  # a half-life under a second still discounts
    flat, flat_report = age_weights(gens, 0.0)
    assert flat == {"new": 1.0, "old": 1.0, "older": 1.0} and flat_report["min_weight"] == 1.0
    assert age_weights([], 100.0) == ({}, {})
    with pytest.raises(ValueError, match="data_half_life_s"):
        TrainConfig(data_half_life_s=-1.0)

"""What a run served, judged per taste (demo/phases.py), and the demo's drift of taste."""

from __future__ import annotations

import math

import pytest

from feedloop.demo.phases import (
    Below,
    Bucket,
    Phase,
    Reached,
    first_reaching,
    live_at,
    live_reward_timeline,
    phases_of,
    regression,
    served_buckets,
    served_mean,
    time_below,
    versions_in,
)
from feedloop.demo.population import (
    Population,
    PopulationConfig,
    TasteChange,
    parse_taste_change,
    parse_taste_changes,
)
from feedloop.demo.simusers import AvoidWord, IncludeWord
from feedloop.demo.tracker import Answered, DemoStats, Served, Swap


def test_a_taste_change_splits_the_run_into_phases():
    assert phases_of("include:little", [(30.0, "keyword")], 100.0) == [
        Phase(0.0, 30.0, "include:little"),
        Phase(30.0, 100.0, "keyword"),
    ]
    assert phases_of("keyword", [], 50.0) == [Phase(0.0, 50.0, "keyword")]


def test_a_version_is_judged_on_the_requests_it_served_within_the_phase():
    samples = [
        Served(1.0, "v1", 0.2),
        Served(2.0, "v1", 0.4),
        Served(3.0, "v2", 1.0, "canary"),  # canary requests count for their version
        Served(11.0, "v1", 0.9),  # the next phase: another taste
    ]
    first = versions_in(Phase(0.0, 10.0, "a"), samples)
    assert first["v1"].requests == 2 and first["v1"].mean_reward == pytest.approx(0.3)
    assert first["v2"].mean_reward == 1.0 and first["v2"].first_served_s == 3.0
    second = versions_in(Phase(10.0, 20.0, "b"), samples)
    assert list(second) == ["v1"] and second["v1"].mean_reward == pytest.approx(0.9)


def test_the_live_version_follows_the_swaps_in_time_order():
    swaps = [Swap(20.0, "v2", "v3"), Swap(10.0, "v1", "v2")]
    assert [live_at("v1", swaps, t) for t in (0.0, 9.9, 10.0, 15.0, 25.0)] == [
        "v1",
        "v1",
        "v2",
        "v2",
        "v3",
    ]


def test_the_live_timeline_leaves_canary_requests_out():
    samples = [Served(1.0, "v1", 0.5), Served(2.0, "v2", 0.0, "canary"), Served(12.0, "v1", 1.0)]
    timeline = live_reward_timeline(samples, 10.0, 20.0)
    assert timeline[0] == (0.0, 0.5, 1) and timeline[1] == (10.0, 1.0, 1)
    assert math.isnan(live_reward_timeline([], 10.0, 10.0)[0][1])


def test_regression_is_the_longest_stretch_live_stays_below_the_best_seen_version():
    # v1 (0.5) is live until 10 s, then v2 (0.3, 0.2 below v1) until 25 s, then v3 (0.48).
    samples = [Served(float(t), "v1", 0.5) for t in range(0, 10)]
    samples += [Served(float(t), "v2", 0.3) for t in range(10, 25)]
    samples += [Served(float(t), "v3", 0.48) for t in range(25, 40)]
    swaps = [Swap(10.0, "v1", "v2"), Swap(25.0, "v2", "v3")]
    phases = [Phase(0.0, 40.0, "a")]
    found = regression(phases, samples, "v1", swaps, threshold=0.05, min_requests=5)
    assert found.longest_s == pytest.approx(15.0) and found.at_s == 10.0
    assert found.worst_gap == pytest.approx(0.2)
    # v3 is within the threshold of v1: no stretch after 25 s; with a tighter one there is.
    tight = regression(phases, samples, "v1", swaps, threshold=0.01, min_requests=5)
    assert tight.longest_s == pytest.approx(30.0)


def test_a_taste_change_resets_what_counts_as_the_best_version():
    # Phase 1 (taste a): v1 0.9. Phase 2 (taste b): v1 serves 0.1 and is the only version.
    samples = [Served(float(t), "v1", 0.9) for t in range(0, 10)]
    samples += [Served(float(t), "v1", 0.1) for t in range(10, 20)]
    phases = phases_of("a", [(10.0, "b")], 20.0)
    found = regression(phases, samples, "v1", [], min_requests=5)
    assert found.longest_s == 0.0 and math.isnan(found.at_s) and found.worst_gap == 0.0


def test_too_few_requests_do_not_make_a_version_the_best():
    samples = [Served(0.0, "v2", 1.0, "canary")] + [Served(float(t), "v1", 0.2) for t in range(10)]
    found = regression([Phase(0.0, 10.0, "a")], samples, "v1", [], min_requests=5)
    assert found.longest_s == 0.0


def test_taste_change_specs_are_parsed_or_refused_with_the_expected_form():
    assert parse_taste_change("keyword@120") == TasteChange("keyword", 120.0, 0.0)
    assert parse_taste_change("include:little@0.5") == TasteChange("include:little", 0.5)
    assert parse_taste_change("initial:bcd@120-240") == TasteChange("initial:bcd", 120.0, 120.0)
    for bad in ("keyword", "keyword@-1", "keyword@soon", "likes:x@10", "keyword@20-10"):
        with pytest.raises(ValueError):
            parse_taste_change(bad)
    with pytest.raises(ValueError, match="overlap"):
        parse_taste_changes(["keyword@10-30", "avoid:a@20"])
    assert len(parse_taste_changes(["keyword@10-30", "avoid:a@30"])) == 2


def test_a_gradual_change_reaches_the_users_evenly_over_its_span():
    change = TasteChange("keyword", 100.0, 40.0)
    assert [change.share_at(t) for t in (99.0, 100.0, 110.0, 130.0, 140.0, 500.0)] == [
        0.0,
        0.0,
        0.25,
        0.75,
        1.0,
        1.0,
    ]
    assert TasteChange("keyword", 100.0).share_at(100.0) == 1.0


def test_a_share_of_the_users_changes_taste_in_a_seeded_order():
    config = PopulationConfig("include:a", 8, 1.0, 2, {"rating": 1.0}, 0.1, "unit", seed=3)
    population = Population(None, config, DemoStats())  # type: ignore[arg-type]
    population.change_preference("avoid:a", 0.25)
    changed = [i for i, u in enumerate(population.users) if u.preference == AvoidWord("a")]
    assert len(changed) == 2 and population.preference == IncludeWord("a")
    again = Population(None, config, DemoStats())  # type: ignore[arg-type]
    again.change_preference("avoid:a", 0.25)
    assert [i for i, u in enumerate(again.users) if u.preference == AvoidWord("a")] == changed
    population.change_preference("avoid:a", 1.0)
    assert all(u.preference == AvoidWord("a") for u in population.users)
    assert population.preference == AvoidWord("a")


def test_the_stats_record_taste_changes_and_why_each_request_was_served():
    stats = DemoStats()
    stats.record_request("v2", [1.0, 0.0], 1, "canary")
    stats.observe_taste_change("keyword")
    assert stats.samples[0].served_as == "canary" and stats.samples[0].reward == 0.5
    assert [p for _, p in stats.taste_changes] == ["keyword"]


def test_a_stretch_below_the_best_does_not_carry_over_a_taste_change():
    # Both phases: live v1 at 0.2 while canary v2 served 0.9 from the start of the phase.
    samples = []
    for start in (0, 10):
        samples += [Served(float(t), "v1", 0.2) for t in range(start, start + 10)]
        samples += [Served(float(t), "v2", 0.9, "canary") for t in range(start, start + 10)]
    found = regression(phases_of("a", [(10.0, "b")], 20.0), samples, "v1", [], min_requests=5)
    assert found.longest_s == pytest.approx(10.0)


def test_a_swap_is_dated_by_the_new_versions_live_replies_not_its_canary_or_earlier_stints():
    stats = DemoStats()
    now = [0.0]
    stats.elapsed_s = lambda: now[0]  # type: ignore[method-assign]

    def at(t: float) -> DemoStats:
        now[0] = t
        return stats

    at(0).observe_live("v1")
    at(1).record_request("v1", [0.5], 0)
    at(2).record_request("v2", [0.5], 0, "canary")  # served, but not live
    at(3).record_request("v2", [0.5], 0)  # live now; the poll notices at 4
    at(4).observe_live("v2")
    assert stats.swaps[-1] == Swap(3.0, "v1", "v2")
    at(5).observe_live("v1")  # rolled back; no live reply of v1 since: dated by the poll
    assert stats.swaps[-1] == Swap(5.0, "v2", "v1")
    at(6).record_request("v1", [0.5], 0)
    at(7).record_request("v2", [0.5], 0)  # a late reply of v2, then v2 is live again
    at(8).observe_live("v2")
    assert stats.swaps[-1] == Swap(7.0, "v1", "v2")


def answered(*points: tuple[float, float, int]) -> list[Answered]:
    return [Answered(t, r, e, "live") for t, r, e in points]


def test_what_users_were_served_is_bucketed_from_a_moment_on():
    served = answered((9.0, 1.0, 5), (10.0, 0.2, 1), (14.0, 0.4, 2), (21.0, 0.9, 3), (35.0, 1, 1))
    buckets = served_buckets(served, 10.0, 30.0, 10.0)
    assert [(b.start_s, b.end_s, b.requests, b.feedback_events) for b in buckets] == [
        (10.0, 20.0, 2, 3),
        (20.0, 30.0, 1, 3),
    ]
    assert buckets[0].mean_reward == pytest.approx(0.3) and buckets[1].mean_reward == 0.9
    assert served_mean(served, 10.0, 30.0) == pytest.approx(0.5)
    assert math.isnan(served_buckets(served, 40.0, 45.0, 10.0)[0].mean_reward)


def test_a_level_is_reached_at_the_end_of_the_first_bucket_at_or_above_it():
    """Buckets after a change at 100 s: 0.1, 0.3, 0.5 with 10, 20, 30 events: 0.3 is reached at
    the end of the second, 20 s and 30 events after the change; 0.6 not in the 30 s measured."""
    buckets = [
        Bucket(100.0 + 10 * i, 110.0 + 10 * i, m, 5, e)
        for i, (m, e) in enumerate([(0.1, 10), (0.3, 20), (0.5, 30)])
    ]
    assert first_reaching(buckets, 0.3) == Reached(0.3, 20.0, 30, 30.0)
    never = first_reaching(buckets, 0.6)
    assert never.after_s is None and never.describe() == "0.600 not reached in 30 s"


def test_time_below_a_level_counts_the_longest_run_and_the_worst_bucket():
    """0.2, 0.1, 0.3, 0.05, 0.15, 0.4 against 0.25: runs of 20 s and 20 s below (40 s in all);
    the worst, 0.05, starts 30 s after the change."""
    means = [0.2, 0.1, 0.3, 0.05, 0.15, 0.4]
    buckets = [Bucket(10.0 * i, 10.0 * (i + 1), m, 5, 1) for i, m in enumerate(means)]
    below = time_below(buckets, 0.25)
    assert below == Below(0.25, 0.05, 30.0, 20.0, 40.0)

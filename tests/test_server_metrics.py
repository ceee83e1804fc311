"""The server's own metric types, against prometheus_client's: the same exposition, and label
values bounded by the model versions the server has loaded."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from feedloop.server.metrics import OTHER_VERSION, RATING_BUCKETS, VersionFeedback

RATINGS = "feedloop_feedback_rating_normalised"
WINS = "feedloop_feedback_version_wins_total"


def exposition(registry: CollectorRegistry, name: str) -> list[str]:
    """Sample lines of one family, without the _created series a prometheus_client Histogram
    adds and without _sum, which it leaves out when a bucket bound is negative (checked on its
    own below)."""
    text = generate_latest(registry).decode()
    lines = text.splitlines()
    return sorted(
        line
        for line in lines
        if line.startswith(name) and "_created" not in line and "_sum" not in line
    )


def label_values(registry: CollectorRegistry, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in registry.collect()
        for sample in family.samples
        if label in sample.labels
    }


def test_ratings_by_version_expose_what_a_histogram_would_for_the_same_observations() -> None:
    values = {"v0001": [-1.0, -0.75, 0.0, 0.0, 0.25, 1.0, 1.0], "v0002": [0.5, -0.5]}
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    feedback = VersionFeedback(registry=ours)
    feedback.track(["v0001", "v0002", "v0003"])
    reference = Histogram(RATINGS, "doc", ["version"], buckets=RATING_BUCKETS, registry=theirs)
    for version in ("v0003", OTHER_VERSION):  # never observed: still shown, at zero
        reference.labels(version)
    for version, observed in values.items():
        feedback.observe([(version, v) for v in observed[:3]], [])
        feedback.observe([(version, v) for v in observed[3:]], [])
        for value in observed:
            reference.labels(version).observe(value)
    assert exposition(ours, RATINGS) == exposition(theirs, RATINGS)
    # _sum is there, as the mean-rating recording rule and the dashboard need.
    sample = ours.get_sample_value
    assert sample(f"{RATINGS}_sum", {"version": "v0001"}) == pytest.approx(0.5)
    assert sample(f"{RATINGS}_sum", {"version": "v0002"}) == 0.0
    assert sample(f"{RATINGS}_sum", {"version": "v0003"}) == 0.0
    # A value on a bound is counted in that bound's bucket (le: less than or equal).
    assert sample(f"{RATINGS}_bucket", {"version": "v0002", "le": "-0.5"}) == 1


def test_feedback_on_versions_not_tracked_counts_under_other() -> None:
    registry = CollectorRegistry()
    feedback = VersionFeedback(registry=registry)
    feedback.track(["v0002", "v0003"])
    feedback.observe(
        [("v0002", 1.0), ("v0001", -1.0), ("v0009", 0.5)],
        [("v0003", "v0002"), ("v0001", "v0003"), ("v0002", "v0002"), ("v0001", "v0009")],
    )
    sample = registry.get_sample_value
    assert sample(f"{RATINGS}_count", {"version": "v0002"}) == 1
    assert sample(f"{RATINGS}_count", {"version": OTHER_VERSION}) == 2
    assert sample(f"{RATINGS}_sum", {"version": OTHER_VERSION}) == -0.5
    assert sample(WINS, {"winner": "v0003", "loser": "v0002"}) == 1
    assert sample(WINS, {"winner": OTHER_VERSION, "loser": "v0003"}) == 1
    # Within one label (one version, or two versions both under "other") nothing is compared.
    assert sample(WINS, {"winner": "v0002", "loser": "v0002"}) is None
    assert sample(WINS, {"winner": OTHER_VERSION, "loser": OTHER_VERSION}) is None
    assert sample(WINS, {"winner": "v0002", "loser": "v0003"}) == 0  # exists before a win


def test_series_stay_bounded_as_many_versions_come_and_go() -> None:
    registry = CollectorRegistry()
    feedback = VersionFeedback(registry=registry)
    for n in range(1, 200):
        loaded = [f"v{k:04d}" for k in range(max(1, n - 2), n + 1)]  # the last three
        feedback.track(loaded)
        # Feedback keeps arriving on old generations too, from versions long unloaded.
        feedback.observe(
            [(f"v{n:04d}", 1.0), (f"v{max(1, n - 50):04d}", -1.0)],
            [(f"v{n:04d}", f"v{max(1, n - 50):04d}")],
        )
        assert label_values(registry, "version") == {*loaded, OTHER_VERSION}
        assert label_values(registry, "winner") <= {*loaded, OTHER_VERSION}
        assert label_values(registry, "loser") <= {*loaded, OTHER_VERSION}
    # An unloaded version's series are gone; its feedback from then on is "other"'s.
    assert registry.get_sample_value(f"{RATINGS}_count", {"version": "v0150"}) is None
    assert registry.get_sample_value(f"{RATINGS}_count", {"version": "v0199"}) == 1


def test_a_version_keeps_its_counts_while_it_stays_tracked() -> None:
    registry = CollectorRegistry()
    feedback = VersionFeedback(registry=registry)
    feedback.track(["v0001"])
    feedback.observe([("v0001", 0.5)], [])
    feedback.track(["v0001", "v0002"])  # a swap that keeps v0001 loaded resets nothing
    feedback.observe([("v0001", 0.25)], [("v0002", "v0001")])
    feedback.track(["v0002", "v0001"])
    assert registry.get_sample_value(f"{RATINGS}_count", {"version": "v0001"}) == 2
    assert registry.get_sample_value(f"{RATINGS}_sum", {"version": "v0001"}) == 0.75
    assert registry.get_sample_value(WINS, {"winner": "v0002", "loser": "v0001"}) == 1


def test_unsorted_buckets_are_refused() -> None:
    with pytest.raises(ValueError, match="increasing"):
        VersionFeedback(registry=CollectorRegistry(), buckets=(1.0, 0.0))

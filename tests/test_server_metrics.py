"""The server's own metric types, against prometheus_client's: the same exposition."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from feedloop.server.metrics import BatchHistogram


def exposition(registry: CollectorRegistry) -> list[str]:
    """Sample lines, without the _created series a prometheus_client Histogram adds and without
    _sum, which it leaves out when a bucket bound is negative (checked on its own below)."""
    text = generate_latest(registry).decode()
    lines = text.splitlines()
    return sorted(line for line in lines if "_created" not in line and "_sum" not in line)


def test_batch_histogram_exposes_what_a_histogram_would_for_the_same_observations() -> None:
    buckets = (-1.0, -0.5, 0.0, 0.5, 1.0)
    values = {"a": [-1.0, -0.75, 0.0, 0.0, 0.25, 1.0, 1.0], "b": [0.5, -0.5]}
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("h", "doc", "slot", ("a", "b", "c"), buckets, registry=ours)
    reference = Histogram("h", "doc", ["slot"], buckets=buckets, registry=theirs)
    reference.labels("c")  # a label value never observed still shows, at zero
    for slot, observed in values.items():
        batch.observe_many(slot, observed[:3])
        batch.observe_many(slot, observed[3:])
        for value in observed:
            reference.labels(slot).observe(value)
    assert exposition(ours) == exposition(theirs)
    # _sum is there, as the mean-rating recording rule and the dashboard need.
    assert ours.get_sample_value("h_sum", {"slot": "a"}) == pytest.approx(0.5)
    assert ours.get_sample_value("h_sum", {"slot": "b"}) == 0.0
    assert ours.get_sample_value("h_sum", {"slot": "c"}) == 0.0
    # A value on a bound is counted in that bound's bucket (le: less than or equal).
    assert ours.get_sample_value("h_bucket", {"slot": "b", "le": "-0.5"}) == 1


def test_batch_histogram_refuses_unknown_label_values_and_unsorted_buckets() -> None:
    registry = CollectorRegistry()
    histogram = BatchHistogram("h", "doc", "slot", ("a",), (0.0, 1.0), registry=registry)
    with pytest.raises(KeyError):
        histogram.observe_many("z", [0.5])
    with pytest.raises(ValueError, match="increasing"):
        BatchHistogram("g", "doc", "slot", ("a",), (1.0, 0.0), registry=registry)

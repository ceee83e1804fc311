"""Trials, pauses and compare-and-set on the live pointer: the same promises from both registry
backends (the directory, and PostgreSQL where a server answers)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from pg_support import fresh_schema, schema_url

from feedloop.core.errors import LiveChanged, TrialError, UnknownVersionError
from feedloop.core.registry import (
    CANARY,
    PAUSED,
    PROMOTED,
    RESUMED,
    ROLLED_BACK,
    SHADOW,
    DirectoryRegistry,
    LivePointer,
    ModelRegistry,
)
from feedloop.core.registry.postgres import PostgresRegistry

Opener = Callable[[], ModelRegistry]


@pytest.fixture(params=["directory", pytest.param("postgres", marks=pytest.mark.postgres)])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens registry objects on one shared location, as separate processes would."""
    with ExitStack() as stack:
        if request.param == "directory":
            url = str(tmp_path / "reg")
        else:
            url = schema_url(stack.enter_context(fresh_schema("trials")))

        def open_one() -> ModelRegistry:
            registry: ModelRegistry
            if request.param == "directory":
                registry = DirectoryRegistry(Path(url), poll_interval_s=0.02)
            else:
                registry = PostgresRegistry(url, cache_dir=tmp_path / "cache", poll_interval_s=0.05)
            stack.callback(registry.close)
            return registry

        yield open_one


@pytest.fixture
def registry(opener: Opener, tiny_checkpoint: Path) -> ModelRegistry:
    """v0001 live, v0002 and v0003 published."""
    registry = opener()
    registry.publish(tiny_checkpoint, make_live=True)
    registry.publish(tiny_checkpoint)
    registry.publish(tiny_checkpoint)
    return registry


def test_a_canary_starts_beside_live_and_is_recorded_with_its_figures(
    registry: ModelRegistry, opener: Opener
) -> None:
    pointer = registry.start_trial(
        "v0002", share=0.1, reason="round 3", expect_live="v0001", details={"reward": 0.4}
    )
    assert pointer.live == "v0001" and pointer.paused is False
    assert pointer.trial is not None
    trial = pointer.trial
    assert (trial.version, trial.mode, trial.share) == ("v0002", CANARY, 0.1)
    assert pointer.trial.parent == "v0001" and pointer.trial.since
    assert opener().pointer() == pointer  # durable, and seen by every other reader
    decision = registry.history(limit=1)[0]
    assert (decision.version, decision.action, decision.reason) == ("v0002", CANARY, "round 3")
    assert decision.details == {"reward": 0.4, "share": 0.1, "parent": "v0001"}


def test_a_shadow_trial_is_recorded_as_shadow(registry: ModelRegistry) -> None:
    pointer = registry.start_trial("v0003", mode=SHADOW, share=0.25)
    assert pointer.trial is not None and pointer.trial.mode == SHADOW
    assert registry.history(limit=1)[0].action == SHADOW


def test_promoting_the_trial_makes_it_live_and_stacks_the_old_live_version(
    registry: ModelRegistry,
) -> None:
    registry.start_trial("v0002", share=0.5)
    pointer = registry.end_trial(promote=True, reason="not worse", details={"lower": -0.01})
    assert pointer == LivePointer("v0002", ("v0001",))
    decision = registry.history(limit=1)[0]
    assert (decision.version, decision.action) == ("v0002", PROMOTED)
    assert decision.details == {"lower": -0.01, "previous": "v0001", "trial": CANARY}
    assert registry.rollback().live == "v0001"  # the promotion is undone like any other


def test_rolling_the_trial_back_keeps_live_and_names_what_was_removed(
    registry: ModelRegistry,
) -> None:
    registry.start_trial("v0002", share=0.5)
    pointer = registry.end_trial(promote=False, reason="worse", expect_version="v0002")
    assert pointer == LivePointer("v0001")
    decision = registry.history(limit=1)[0]
    assert (decision.version, decision.action) == ("v0001", ROLLED_BACK)
    assert decision.details == {"from": "v0002", "trial": CANARY}


def test_set_live_of_the_trial_version_ends_the_trial_and_other_versions_keep_it(
    registry: ModelRegistry,
) -> None:
    registry.start_trial("v0002", share=0.5)
    kept = registry.set_live("v0003")
    assert kept.live == "v0003" and kept.trial is not None and kept.trial.version == "v0002"
    ended = registry.set_live("v0002")
    assert ended.live == "v0002" and ended.trial is None
    assert registry.history(limit=1)[0].details == {"previous": "v0003", "trial": CANARY}


def test_pause_and_resume_are_recorded_once_each(registry: ModelRegistry, opener: Opener) -> None:
    assert registry.set_paused(True, reason="incident 12").paused is True
    assert opener().pointer().paused is True
    assert registry.set_paused(True).paused is True  # already paused: nothing to record
    assert registry.set_live("v0002").paused is True  # other changes keep the pause
    assert registry.set_paused(False).paused is False
    actions = [(d.action, d.reason) for d in registry.history(limit=3)]
    assert actions == [(RESUMED, ""), (PROMOTED, ""), (PAUSED, "incident 12")]


def test_set_live_with_an_expected_live_version_is_compare_and_set(
    registry: ModelRegistry,
) -> None:
    before, history = registry.pointer(), registry.history()
    with pytest.raises(LiveChanged, match=r"'v0003'.*'v0001'"):
        registry.set_live("v0002", expect_live="v0003")
    assert registry.pointer() == before and registry.history() == history
    assert registry.set_live("v0002", expect_live="v0001").live == "v0002"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda r: r.start_trial("v0002", share=1.5), ValueError),
        (lambda r: r.start_trial("v0002", share=-0.1), ValueError),
        (lambda r: r.start_trial("v0002", share=float("nan")), ValueError),
        (lambda r: r.start_trial("v0002", mode="split", share=0.1), ValueError),
        (lambda r: r.start_trial("v0042", share=0.1), UnknownVersionError),
        (lambda r: r.start_trial("v0001", share=0.1), TrialError),
        (lambda r: r.start_trial("v0002", share=0.1, expect_live="v0003"), LiveChanged),
        (lambda r: r.end_trial(promote=True), TrialError),
        (lambda r: r.end_trial(promote=False), TrialError),
    ],
)
def test_refused_trial_calls_change_nothing(
    registry: ModelRegistry, call: Callable[[ModelRegistry], object], error: type[Exception]
) -> None:
    before, history = registry.pointer(), registry.history()
    with pytest.raises(error):
        call(registry)
    assert registry.pointer() == before and registry.history() == history


def test_a_second_trial_or_ending_another_versions_trial_is_refused(
    registry: ModelRegistry,
) -> None:
    registry.start_trial("v0002", share=0.1)
    before, history = registry.pointer(), registry.history()
    with pytest.raises(TrialError, match="v0002 is already on trial"):
        registry.start_trial("v0003", share=0.1)
    with pytest.raises(LiveChanged, match=r"'v0003'.*'v0002'"):
        registry.end_trial(promote=True, expect_version="v0003")
    assert registry.pointer() == before and registry.history() == history


def test_a_trial_needs_a_live_version(opener: Opener, tiny_checkpoint: Path) -> None:
    registry = opener()
    registry.publish(tiny_checkpoint)
    with pytest.raises(TrialError, match="no live version"):
        registry.start_trial("v0001", share=0.1)


def test_compare_and_set_under_concurrent_writers_lets_exactly_one_win(
    registry: ModelRegistry, opener: Opener
) -> None:
    """Several processes read live v0001 and each tries to put its own version on trial with
    compare-and-set: one succeeds, the others see the trial and are refused."""
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def contend(version: str) -> None:
        writer = opener()
        barrier.wait()
        try:
            writer.start_trial(version, share=0.1, expect_live="v0001")
            outcomes.append("won")
        except TrialError:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend, args=(v,)) for v in ("v0002", "v0003") * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["refused", "refused", "refused", "won"]
    assert [d.action for d in registry.history()].count(CANARY) == 1


def test_a_live_change_between_read_and_write_refuses_the_stale_writer(
    registry: ModelRegistry, opener: Opener
) -> None:
    trainer, operator = registry, opener()
    parent = trainer.pointer().live  # the trainer starts a round from this version
    operator.set_live("v0003", reason="operator")  # while the round runs
    with pytest.raises(LiveChanged):
        trainer.start_trial("v0002", share=0.1, expect_live=parent)
    assert trainer.pointer() == LivePointer("v0003", ("v0001",))


def test_wait_for_change_wakes_on_trial_and_pause_changes(
    registry: ModelRegistry, opener: Opener
) -> None:
    seen = registry.pointer()
    assert registry.wait_for_change(seen, timeout_s=0.05) == seen
    for change in (
        lambda r: r.start_trial("v0002", share=0.1),
        lambda r: r.set_paused(True),
        lambda r: r.end_trial(promote=False),
    ):
        threading.Timer(0.1, lambda c=change: c(opener())).start()
        woken = registry.wait_for_change(seen, timeout_s=10)
        assert woken != seen and woken == registry.pointer()
        seen = woken

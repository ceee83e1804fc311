"""What the trainer's watch and bring-back decisions read: users' ratings by version, discounted
by age (feedloop.core.discount) from where each comparison's looks begin, the older versions'
exploration traffic included (feedloop.core.store.outcomes), and the older versions users can
still be served.

The verdicts themselves are pure (feedloop.trainer.decisions); this module only gathers their
inputs from the store and the registry's pointer and history.
"""

from __future__ import annotations

from collections.abc import Sequence

from feedloop.core.discount import Discount
from feedloop.core.registry import PROMOTED, ROLLED_BACK, Decision, LivePointer
from feedloop.core.registry.pointer import unix_seconds
from feedloop.core.store import ReplayStore
from feedloop.core.store.outcomes import JudgedGeneration, tally_outcomes
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.decisions import (
    WAIT,
    Verdict,
    bring_back,
    compared_versions,
    judge_live,
)


def made_live_at(history: Sequence[Decision], live: str) -> float | None:
    """When `live` last became live (a promotion, a rollback to it, a set-live), from the
    registry's history, newest first; None if the history shown does not say. A trial rolled
    back names the live version too, but changes nothing live: it is passed over."""
    for decision in history:
        if decision.version != live:
            continue
        if decision.action == PROMOTED:
            return unix_seconds(decision.at)
        if decision.action == ROLLED_BACK and (
            "previous" in decision.details or "trial" not in decision.details
        ):
            return unix_seconds(decision.at)
    return None


def bring_back_candidates(
    pointer: LivePointer, reference: str | None, available: Sequence[str]
) -> list[str]:
    """The older versions live is compared with: the reference, then the rollback stack newest
    first, each once, without live, and only those whose weights are still `available`. The set
    depends on the pointer alone (not on any rating), so splitting alpha over it is fixed for as
    long as this version stays live."""
    live = pointer.live
    stack = list(reversed(pointer.previous))
    ordered = dict.fromkeys([reference, *stack] if reference else stack)
    present = set(available)
    return [v for v in ordered if v is not None and v != live and v in present]


def judge_live_now(
    store: ReplayStore,
    pointer: LivePointer,
    config: TrainConfig,
    now: float,
    *,
    promoted_at: float | None,
    live_since: float,
    candidates: Sequence[str],
    not_before: float | None = None,
) -> Verdict | None:
    """With no trial running: the watch's verdict on a live version promoted less than watch_s
    ago, and when it waits, the bring-back verdict. None when there is nothing to judge.

    promoted_at: when live was promoted (None if it became live otherwise); live_since: when it
    became live by any route (the bring-back's looks begin there); candidates: the versions it
    may bring back (bring_back_candidates); not_before: ratings received earlier are left out
    of both (e.g. from before a detected change of taste)."""
    live = pointer.live
    if live is None:
        return None
    c = config

    def read(discount: Discount) -> list[JudgedGeneration]:
        since = discount.cutoff_s(c.decision_lookback_s)
        return store.judged_generations(since if not_before is None else max(since, not_before))

    stack = [v for v in dict.fromkeys(pointer.previous) if v != live]
    verdict: Verdict | None = None
    if promoted_at is not None and now - promoted_at < c.watch_s:
        discount = Discount(c.evidence_half_life_s, now, min(promoted_at, now))
        judged = read(discount)
        recent = tally_outcomes(judged, stack, discount=discount, explored=stack)
        earlier = compared_versions(
            pointer.previous, live, c.decision_recent_versions, recent, c.decision_min_ratings
        )
        since_promotion = [row for row in judged if row.received_at >= promoted_at]
        mine = tally_outcomes(since_promotion, [live], discount=discount)[live]
        verdict = judge_live(mine, now - promoted_at, [recent[v] for v in earlier], c)
        if verdict.action != WAIT:
            return verdict
    if not c.bring_back or not candidates:
        return verdict
    discount = Discount(c.evidence_half_life_s, now, min(live_since, now))
    judged = read(discount)
    outcomes = tally_outcomes(judged, [live, *candidates], discount=discount, explored=candidates)
    brought = bring_back(outcomes[live], [outcomes[v] for v in candidates], c)
    if brought.action != WAIT and pointer.paused:
        return Verdict(WAIT, brought.version, f"paused: {brought.reason}", brought.figures)
    return brought

"""The trainer brings an older version back on current evidence, and only on current evidence
(trainer/evidence.py through Trainer.decide: real SQLite store, directory registry)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from store_support import rate_version
from trainer_support import Env, env, fast_config, one_torch_thread

from feedloop.core.registry import ROLLED_BACK
from feedloop.core.store.base import SERVED_EXPLORATION, SERVED_LIVE
from feedloop.trainer.decisions import ROLL_BACK, WAIT
from feedloop.trainer.evidence import judge_live_now
from feedloop.trainer.loop import Trainer

__all__ = ["env", "one_torch_thread"]
LATER_S = 100.0  # the trainer's clock runs this far ahead of the promotion


def trainer(env: Env, **overrides: Any) -> Trainer:
    values: dict[str, Any] = {
        "publish_as": "canary",
        "decision_min_ratings": 50,
        "watch_s": 10.0,  # past the watch: what decides is the bring-back
        **overrides,
    }
    return Trainer(
        fast_config(env.root, **values),
        env.store,
        env.registry,
        log=lambda _: None,
        clock=lambda: time.time() + LATER_S,
    )


def rate(env: Env, version: str, scores: list[float], at: float, served_as: str) -> None:
    rate_version(env.store, version, scores, at, served_as)


def promote_second(env: Env, tiny_checkpoint: Path) -> float:
    """v0002 made live over v0001 (which goes on the rollback stack); returns when."""
    version = env.registry.publish(tiny_checkpoint, reason="candidate")
    assert version == "v0002"
    env.registry.set_live(version, reason="promoted by a test")
    return time.time()


def test_an_older_version_users_now_rate_better_through_exploration_is_made_live_again(
    env: Env, tiny_checkpoint: Path
) -> None:
    promoted = promote_second(env, tiny_checkpoint)
    now = promoted + LATER_S / 2
    rate(env, "v0002", [0.1] * 120, now, SERVED_LIVE)
    rate(env, "v0002", [1.0] * 120, now, SERVED_EXPLORATION)  # live explored: not live's own
    rate(env, "v0001", [0.9] * 120, now, SERVED_EXPLORATION)  # the older version's arm
    verdict = trainer(env).decide()
    assert verdict is not None and (verdict.action, verdict.version) == (ROLL_BACK, "v0001")
    assert env.registry.live() == "v0001"
    decision = env.registry.history()[0]
    assert (decision.version, decision.action) == ("v0001", ROLLED_BACK)
    assert decision.reason.startswith("brought back v0001")
    assert "half-life 300 s" in decision.reason
    assert decision.details["brought_back"] is True
    assert decision.details["previous"] == "v0002"
    assert decision.details["discount"]["half_life_s"] == 300.0
    assert decision.details["live"]["n"] == 120  # live's own ratings, its exploration left out
    assert decision.details["v0001"]["n"] == 120
    assert 0 < decision.details["v0001"]["weight"] <= 120


def test_evidence_from_before_a_change_of_taste_fades_and_brings_nothing_back(
    env: Env, tiny_checkpoint: Path
) -> None:
    promoted = promote_second(env, tiny_checkpoint)
    # v0001 was rated well 2,900 s ago (almost ten half-lives: each rating weighs about 0.1%),
    # live is rated poorly now.
    rate(env, "v0001", [0.9] * 120, promoted - 2900.0, SERVED_LIVE)
    rate(env, "v0002", [0.1] * 120, promoted + LATER_S / 2, SERVED_LIVE)
    verdict = trainer(env).decide()
    assert verdict is not None and verdict.action == WAIT, verdict
    assert env.registry.live() == "v0002"
    assert verdict.figures["v0001"]["weight"] < 0.2
    # ... and so would they without the discount, unless they are from before a known change
    undiscounted = fast_config(env.root, evidence_half_life_s=0.0, decision_min_ratings=50)
    look = {
        "promoted_at": None,
        "live_since": promoted,
        "candidates": ["v0001"],
    }
    pointer, now = env.registry.pointer(), promoted + LATER_S
    cut = judge_live_now(env.store, pointer, undiscounted, now, not_before=promoted, **look)
    assert cut is not None and cut.action == WAIT
    stale = trainer(env, evidence_half_life_s=0.0).decide()
    assert stale is not None and (stale.action, stale.version) == (ROLL_BACK, "v0001")


def test_a_paused_trainer_brings_nothing_back(env: Env, tiny_checkpoint: Path) -> None:
    promoted = promote_second(env, tiny_checkpoint)
    rate(env, "v0002", [0.1] * 120, promoted + 1, SERVED_LIVE)
    rate(env, "v0001", [0.9] * 120, promoted + 1, SERVED_EXPLORATION)
    env.registry.set_paused(True, reason="operator")
    verdict = trainer(env).decide()
    assert verdict is not None and verdict.action == WAIT and "paused" in verdict.reason
    assert env.registry.live() == "v0002"
    off = trainer(env, bring_back=False).decide()
    assert off is None

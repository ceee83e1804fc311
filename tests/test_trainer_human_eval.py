"""The promotion policy's human-evaluation requirement (off by default): the pure rule on
hand-built evaluations, and the trainer's decide() on a real store and registry, both ways."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_trainer_deploy import on_trial, rate, trainer
from trainer_support import Env, env, one_torch_thread

from feedloop.core.config import config_from_args
from feedloop.core.human_eval import A_BETTER, B_BETTER, TIE, VerdictRecord, tally_verdicts
from feedloop.core.registry import CANARY, Trial
from feedloop.trainer.cli import build_parser
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.decisions import PROMOTE, ROLL_BACK, WAIT, Verdict, require_human_evaluation

__all__ = ["env", "one_torch_thread"]
TRIAL = Trial("v3", CANARY, 0.1, "2030-01-01T00:00:00+00:00", "v2")
ONLINE_PROMOTE = Verdict(PROMOTE, "v3", "online rating not worse", {"alpha": 0.05})


def verdicts(choices: str, a: str = "v3", b: str = "v2", prefix: str = "x") -> list[VerdictRecord]:
    """One verdict per letter: a (A better), b (B better), t (tie), by raters r0, r1, r0, ..."""
    names = {"a": A_BETTER, "b": B_BETTER, "t": TIE}
    return [
        VerdictRecord(
            f"{prefix}{i}",
            "s",
            f"r{i % 2}",
            a,
            f"ga{i}",
            b,
            f"gb{i}",
            names[c],
            i % 2 == 0,
            "p",
            1.0,
        )
        for i, c in enumerate(choices)
    ]


def config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(data_dir=tmp_path, require_human_eval=True, human_eval_min_verdicts=10)
    values.update(overrides)
    return TrainConfig(**values, max_trial_s=600.0)


def test_off_by_default_a_promotion_needs_no_human_evaluation(tmp_path):
    assert TrainConfig(data_dir=tmp_path).require_human_eval is False
    evaluation = tally_verdicts([], "v3", "v2")
    off = TrainConfig(data_dir=tmp_path)
    assert require_human_evaluation(ONLINE_PROMOTE, TRIAL, 60.0, evaluation, off) is ONLINE_PROMOTE


def test_too_few_verdicts_wait_and_past_max_trial_s_end_the_trial(tmp_path):
    evaluation = tally_verdicts(verdicts("aaaaaaaaa"), "v3", "v2")  # 9 of 10
    waiting = require_human_evaluation(ONLINE_PROMOTE, TRIAL, 60.0, evaluation, config(tmp_path))
    assert (
        waiting.action == WAIT and "awaiting human evaluation (9 of 10 verdicts)" in waiting.reason
    )
    assert waiting.figures["human_evaluation"]["verdicts"] == 9
    late = require_human_evaluation(ONLINE_PROMOTE, TRIAL, 601.0, evaluation, config(tmp_path))
    assert late.action == ROLL_BACK and "no human evaluation (9 of 10 verdicts)" in late.reason


def test_raters_clearly_preferring_live_roll_the_trial_back(tmp_path):
    # 1 win, 1 tie, 10 losses: win rate 1.5/12 = 0.125; Wilson at 95%: centre
    # (0.125 + z²/24) / (1 + z²/12) = 0.285061 / 1.320122 = 0.215938, half-width
    # z / 1.320122 * sqrt(0.125 * 0.875 / 12 + z²/576) = 1.484684 * 0.125634 = 0.186525,
    # so the upper end is 0.402463 < 0.5.
    evaluation = tally_verdicts(verdicts("atbbbbbbbbbb"), "v3", "v2")
    verdict = require_human_evaluation(ONLINE_PROMOTE, TRIAL, 60.0, evaluation, config(tmp_path))
    assert verdict.action == ROLL_BACK and "raters prefer live" in verdict.reason
    figures = verdict.figures["human_evaluation"]
    assert figures["win_rate"] == pytest.approx(0.125)
    assert figures["high"] == pytest.approx(0.402463, abs=1e-5) and figures["raters"] == 2


def test_enough_verdicts_not_clearly_worse_promote_with_the_figures(tmp_path):
    # 4 wins, 6 losses: 0.4 [0.168, 0.687]: not clearly below 0.5, so the promotion stands.
    evaluation = tally_verdicts(verdicts("aaaabbbbbb"), "v3", "v2")
    verdict = require_human_evaluation(ONLINE_PROMOTE, TRIAL, 60.0, evaluation, config(tmp_path))
    assert verdict.action == PROMOTE and "win rate 0.400" in verdict.reason
    assert verdict.figures["alpha"] == 0.05  # the online figures are kept beside
    stricter = config(tmp_path, human_eval_min_win_rate=0.7)
    assert require_human_evaluation(ONLINE_PROMOTE, TRIAL, 60.0, evaluation, stricter).action == (
        ROLL_BACK
    )
    online_no = Verdict(ROLL_BACK, "v3", "online rating worse than live", {})
    assert (
        require_human_evaluation(online_no, TRIAL, 60.0, evaluation, config(tmp_path)) is online_no
    )


def test_the_requirement_is_a_trainer_flag_and_refuses_publishing_live_at_once(tmp_path):
    args = build_parser().parse_args(["--data-dir", str(tmp_path), "--require-human-eval", "true"])
    built = config_from_args(TrainConfig, args, section="train")
    assert built.require_human_eval is True and built.human_eval_min_verdicts == 20
    with pytest.raises(ValueError, match="publish_as"):
        TrainConfig(data_dir=tmp_path, require_human_eval=True, publish_as="live")
    with pytest.raises(ValueError, match="human_eval_min_win_rate"):
        TrainConfig(data_dir=tmp_path, human_eval_min_win_rate=1.5)


def test_the_trainer_promotes_a_trial_only_after_people_judged_it(env: Env, tiny_checkpoint):
    version = on_trial(env, tiny_checkpoint)
    later = time.time() + 1
    rate(env, "v0001", [0.5] * 300, later)
    rate(env, version, [0.9] * 300, later)
    strict = {"decision_min_ratings": 50, "require_human_eval": True, "human_eval_min_verdicts": 6}
    waiting = trainer(env, **strict).decide()
    assert waiting is not None and waiting.action == WAIT
    assert "awaiting human evaluation (0 of 6 verdicts)" in waiting.reason
    assert env.registry.live() == "v0001" and env.registry.pointer().trial is not None
    # Verdicts given with live as A count too, mirrored: here the trial wins 4, ties 2.
    for record in verdicts("aaaa", a=version, b="v0001") + verdicts(
        "tt", a="v0001", b=version, prefix="y"
    ):
        env.store.insert_verdict(record)
    promoted = trainer(env, **strict).decide()
    assert promoted is not None and promoted.action == PROMOTE, promoted
    assert env.registry.live() == version
    details = env.registry.history()[0].details["human_evaluation"]
    assert (details["verdicts"], details["a_wins"], details["ties"]) == (6, 4, 2)

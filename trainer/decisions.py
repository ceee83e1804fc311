"""The decision policy, pure: from users' online feedback, promote a trial, roll it back, or wait;
and roll a freshly promoted live version back when it is confidently worse than a recent one.

Every figure behind a verdict rides with it into the registry's history. The confidence
sequences (feedloop.core.online_eval) are valid however often the trainer looks, so deciding at
every look, as this policy does, keeps the stated confidence 1 - alpha.

A trial (canary) is judged on the difference of mean ratings, trial minus live, both read since
the trial began (the same users, the same time):
- roll back when the difference is below 0 with confidence 1 - alpha (the trial is worse);
- promote when it is above -margin with that confidence (not worse by more than the margin);
- otherwise wait, and roll back after max_trial_s without a verdict, saying so.
Fewer than min_ratings on either side is too little evidence: wait (or time out).
A shadow trial serves no user: it is judged on the live version's rated generations that it
scored, by a lower bound on its mean rating that holds at every look (clipped importance
sampling with the exact ratios, feedloop.core.online_eval.shadow_estimate):
- promote when that bound, at alpha/2, is above live's upper bound at alpha/2 minus the margin
  (live's ratings since the trial began);
- otherwise wait, and end it without promotion after max_trial_s. A lower bound cannot say that
  a shadow is worse, and a shadow costs its users nothing, so it is never rolled back early.

With require_human_eval, a trial the online evidence would promote is promoted only once people
have judged it against live in blind side-by-side evaluations (feedloop.core.human_eval): it
waits for human_eval_min_verdicts verdicts (and is ended without promotion after max_trial_s),
and is rolled back when the upper end of its win rate's Wilson interval is below
human_eval_min_win_rate (raters clearly prefer live). The Wilson interval is a fixed-sample
interval: looked at every decision_interval_s once the minimum is reached, its coverage is lower
than stated, so the minimum count is the guard, and a human evaluation is best run as a session
of a planned size.

A live version promoted less than watch_s ago is compared with each recent version (the
rollback stack's latest ones, and the best-rated one on the stack): if it is below one of them
with confidence 1 - alpha (split evenly over the comparisons), the best such version is made
live again.

Bringing an older version back (bring_back, at any time, no trial running): live is compared
with the older versions users can still judge now, the reference and the rollback stack's
latest and best ones, on their ratings discounted by age (evidence_half_life_s,
feedloop.core.discount), the older ones' including the exploration traffic the server gives
them. If one rates above live with confidence 1 - alpha (split evenly over the comparisons), the
best such version is made live again. Discounting is what makes this safe under drift: a
version rated well under yesterday's taste wins nothing once that evidence has aged, and one
that serves today's taste better shows it in its fresh exploration ratings.

Trials are judged on undiscounted evidence since the trial began: both sides are rated by the
same users over the same span, so a change of taste during the trial moves both alike and aging
adds nothing to the comparison's fairness, while it would cost the trial half its alpha.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from feedloop.core.human_eval import HumanEvaluation
from feedloop.core.online_eval import Estimate, ShadowEstimate, mean_rating, rating_difference
from feedloop.core.registry import SHADOW, Trial
from feedloop.core.store.outcomes import VersionOutcomes
from feedloop.trainer.config import TrainConfig

PROMOTE = "promote"
ROLL_BACK = "roll_back"
WAIT = "wait"
VERDICTS = (PROMOTE, ROLL_BACK, WAIT)


@dataclass(frozen=True)
class Verdict:
    """What to do now. version: the trial's version (a trial) or the version to make live again
    (a watched live version rolled back); None when there is nothing to judge."""

    action: str  # PROMOTE, ROLL_BACK or WAIT
    version: str | None
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def _enough(config: TrainConfig, *outcomes: VersionOutcomes) -> bool:
    return all(o.ratings >= config.decision_min_ratings for o in outcomes)


def _interval(estimate: Estimate) -> str:
    return f"{estimate.mean:+.3f} [{estimate.low:+.3f}, {estimate.high:+.3f}]"


def _undecided(
    trial: Trial,
    age_s: float,
    config: TrainConfig,
    figures: dict[str, Any],
    waiting: str,
    ending: str,
) -> Verdict:
    """Wait, saying `waiting`; past max_trial_s, end the trial without promotion instead."""
    if age_s < config.max_trial_s:
        return Verdict(WAIT, trial.version, waiting, figures)
    ended = "shadow trial ended" if trial.mode == SHADOW else "no verdict"
    return Verdict(
        ROLL_BACK,
        trial.version,
        f"{ended} after {age_s:.0f} s (max_trial_s {config.max_trial_s:.0f}){ending}",
        figures,
    )


def _too_little(
    trial: Trial, age_s: float, config: TrainConfig, figures: dict[str, Any], counts: str
) -> Verdict:
    """Too little evidence to judge: wait, or past max_trial_s end the trial saying so."""
    evidence = f"{counts} (min_ratings {config.decision_min_ratings})"
    return _undecided(
        trial, age_s, config, figures, f"too little evidence: {evidence}",
        f": too little evidence, {evidence}",
    )  # fmt: skip


def judge_trial(
    trial: Trial,
    age_s: float,
    live: VersionOutcomes,
    candidate: VersionOutcomes,
    config: TrainConfig,
    shadow: ShadowEstimate | None = None,
) -> Verdict:
    """The verdict on a running trial `age_s` seconds old (module docstring); shadow: a shadow
    trial's estimate, at alpha/2, from the live generations it scored."""
    alpha, margin = config.decision_alpha, config.decision_margin
    if trial.mode == SHADOW:
        return _judge_shadow(trial, age_s, live, shadow, config)
    difference = rating_difference(candidate, live, alpha)
    figures: dict[str, Any] = {
        "trial_age_s": age_s,
        "alpha": alpha,
        "margin": margin,
        "live": mean_rating(live, alpha).as_dict(),
        "candidate": mean_rating(candidate, alpha).as_dict(),
        "difference": difference.as_dict(),
        "discounted": False,  # trials read undiscounted evidence (module docstring)
    }
    if not _enough(config, live, candidate):
        return _too_little(
            trial, age_s, config, figures,
            f"{candidate.ratings} ratings of {trial.version}, {live.ratings} of {live.version}",
        )  # fmt: skip
    versus = (
        f"{trial.version} minus {live.version}: {_interval(difference)} "
        f"at {1 - alpha:.0%} (time-uniform)"
    )
    if difference.high < 0:
        return Verdict(
            ROLL_BACK, trial.version, f"online rating worse than live: {versus}", figures
        )
    if difference.low >= -margin:
        return Verdict(
            PROMOTE,
            trial.version,
            f"online rating not worse than live by more than {margin}: {versus}",
            figures,
        )
    return _undecided(trial, age_s, config, figures, f"undecided: {versus}", f": {versus}")


def require_human_evaluation(
    verdict: Verdict,
    trial: Trial,
    age_s: float,
    evaluation: HumanEvaluation,
    config: TrainConfig,
) -> Verdict:
    """A promotion held to the human evaluation of the trial (A) against live (B); any other
    verdict, or any verdict when the requirement is off, stands."""
    if verdict.action != PROMOTE or not config.require_human_eval:
        return verdict
    tally = evaluation.overall
    low, high = tally.interval(config.decision_alpha)
    figures = {
        **verdict.figures,
        "human_evaluation": {
            "verdicts": tally.verdicts,
            "a_wins": tally.a_wins,
            "b_wins": tally.b_wins,
            "ties": tally.ties,
            "both_bad": tally.both_bad,
            "win_rate": tally.a_win_rate,
            "low": low,
            "high": high,
            "raters": len(evaluation.raters),
        },
    }
    if tally.verdicts < config.human_eval_min_verdicts:
        counts = f"{tally.verdicts} of {config.human_eval_min_verdicts} verdicts"
        waiting = f"awaiting human evaluation ({counts}); {verdict.reason}"
        return _undecided(
            trial, age_s, config, figures, waiting, f": no human evaluation ({counts})"
        )
    versus = (
        f"human evaluation of {trial.version} against {evaluation.version_b}: win rate "
        f"{tally.a_win_rate:.3f} [{low:.3f}, {high:.3f}] over {tally.verdicts} verdicts"
    )
    if high < config.human_eval_min_win_rate:
        return Verdict(ROLL_BACK, trial.version, f"raters prefer live: {versus}", figures)
    return Verdict(PROMOTE, trial.version, f"{verdict.reason}; {versus}", figures)


def _judge_shadow(
    trial: Trial,
    age_s: float,
    live: VersionOutcomes,
    shadow: ShadowEstimate | None,
    config: TrainConfig,
) -> Verdict:
    alpha, margin = config.decision_alpha, config.decision_margin
    live_rating = mean_rating(live, alpha / 2)
    figures: dict[str, Any] = {
        "trial_age_s": age_s,
        "alpha": alpha,
        "margin": margin,
        "live": live_rating.as_dict(),
        "shadow": shadow.as_dict() if shadow is not None else None,
        "discounted": False,
    }
    scored = shadow.n if shadow is not None else 0
    if shadow is None or scored < config.decision_min_ratings or not _enough(config, live):
        return _too_little(
            trial, age_s, config, figures,
            f"{scored} rated generations scored by {trial.version}, {live.ratings} ratings of "
            f"{live.version}",
        )  # fmt: skip
    versus = (
        f"{trial.version}'s off-policy lower bound {shadow.low:+.3f} (self-normalised estimate "
        f"{shadow.mean:+.3f}, {shadow.n} scored, effective {shadow.effective_n:.0f}) against "
        f"{live.version}'s upper bound {live_rating.high:+.3f}, time-uniform at {1 - alpha:.0%}"
    )
    if shadow.low >= live_rating.high - margin:
        return Verdict(
            PROMOTE,
            trial.version,
            f"shadow not worse than live by more than {margin}: {versus}",
            figures,
        )
    return _undecided(
        trial, age_s, config, figures, f"undecided: {versus}", f" without a promotion: {versus}"
    )


def _comparison_figures(live: VersionOutcomes, alpha: float) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "alpha_per_comparison": alpha,
        "live": mean_rating(live, alpha).as_dict(),
    }
    if live.discount is not None:
        figures["discount"] = live.discount.as_dict()
    return figures


def _better_than_live(
    live: VersionOutcomes,
    others: Sequence[VersionOutcomes],
    alpha: float,
    config: TrainConfig,
    figures: dict[str, Any],
) -> list[tuple[float, str, Estimate]]:
    """The others whose mean rating is above live's with confidence 1 - alpha: (their mean,
    version, live minus them); each one's figures added to `figures`."""
    better: list[tuple[float, str, Estimate]] = []
    for other in others:
        figures[other.version] = mean_rating(other, alpha).as_dict()
        if not _enough(config, live, other):
            continue
        difference = rating_difference(live, other, alpha)
        figures[f"difference_to_{other.version}"] = difference.as_dict()
        if difference.high < 0:
            better.append((other.mean, other.version, difference))
    return better


def _ratings_kind(live: VersionOutcomes) -> str:
    if live.discount is None or not live.discount.on:
        return "time-uniform"
    return f"time-uniform, discounted with half-life {live.discount.half_life_s:.0f} s"


def judge_live(
    live: VersionOutcomes,
    live_for_s: float,
    recent: Sequence[VersionOutcomes],
    config: TrainConfig,
) -> Verdict:
    """The verdict on a live version promoted `live_for_s` seconds ago (module docstring)."""
    if live_for_s >= config.watch_s or not recent:
        return Verdict(WAIT, None, f"{live.version} is past its watch or has no recent versions")
    alpha = config.decision_alpha / len(recent)  # one comparison per recent version
    figures = {"live_for_s": live_for_s, **_comparison_figures(live, alpha)}
    better = _better_than_live(live, recent, alpha, config, figures)
    if not better:
        return Verdict(
            WAIT, None, f"{live.version} is not confidently below a recent version", figures
        )
    _, best, difference = max(better)
    return Verdict(
        ROLL_BACK,
        best,
        f"{live.version}, live for {live_for_s:.0f} s, rates below {best}: {live.version} minus "
        f"{best} {_interval(difference)} ({_ratings_kind(live)}, alpha {alpha:.3g} per "
        "comparison)",
        figures,
    )


def bring_back(
    live: VersionOutcomes, older: Sequence[VersionOutcomes], config: TrainConfig
) -> Verdict:
    """Make an older version (or the reference) live again when its ratings, discounted by age,
    are above live's with confidence 1 - alpha, split evenly over the comparisons (module
    docstring). older: the candidates' outcomes, tallied like live's (same discount)."""
    if not config.bring_back or not older:
        return Verdict(WAIT, None, "no older version to bring back")
    alpha = config.decision_alpha / len(older)
    figures = _comparison_figures(live, alpha)
    better = _better_than_live(live, older, alpha, config, figures)
    if not better:
        return Verdict(
            WAIT, None, f"no older version rates confidently above {live.version}", figures
        )
    _, best, difference = max(better)
    figures["brought_back"] = True
    return Verdict(
        ROLL_BACK,
        best,
        f"brought back {best}: it rates above live {live.version} on current evidence: "
        f"{live.version} minus {best} {_interval(difference)} ({_ratings_kind(live)}, alpha "
        f"{alpha:.3g} per comparison)",
        figures,
    )


def compared_versions(
    previous: Sequence[str],
    live: str,
    count: int,
    outcomes: Mapping[str, VersionOutcomes],
    min_ratings: int,
) -> list[str]:
    """What a freshly promoted live version is watched against: the `count` latest earlier live
    versions, and the best-rated one on the rollback stack (in `outcomes`, with min_ratings) if
    it is not among them. Without the best, a chain of versions each a little worse than the one
    before (none confidently below the latest ones) walks away from it unseen."""
    compared = recent_versions(previous, live, count)
    rated = [
        v
        for v in dict.fromkeys(previous)
        if v != live and v in outcomes and outcomes[v].ratings >= min_ratings
    ]
    if rated:
        best = max(rated, key=lambda v: outcomes[v].mean)
        if best not in compared:
            compared.append(best)
    return compared


def recent_versions(previous: Sequence[str], live: str, count: int) -> list[str]:
    """The `count` latest earlier live versions (rollback stack, newest first), live left out."""
    return list(dict.fromkeys(v for v in reversed(previous) if v != live))[:count]

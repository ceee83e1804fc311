"""The trainer's rounds: read, reward, update, evaluate, publish, then move the cursor.

A round, top to bottom:
  1. read the window through the cursor (trainer.data);
  2. turn feedback into rewards: ratings, a Bradley-Terry reward model on every preference the
     feedback implies (it also scores unrated generations), corrections (trainer.rewards,
     trainer.reward_model);
  3. update a copy of the live policy (trainer.algorithms, through trainer.update's loop);
  4. evaluate it against the live policy and, off-policy, the best recent live version
     (trainer.gate);
  5. publish it if the gate passed and deploy it as `publish_as` says (a canary trial by
     default, compare-and-set on the live version it was trained from), else record a refusal
     with every figure;
  6. only then persist the cursor: a crash before 6 replays the window, never loses it. The
     window's end is also written into the published manifest, so a restart after a publish
     whose cursor write was lost does not train on the same data twice.
Too little data skips the round (cursor kept, the reason logged); NaN or exploding losses
abandon the update and keep the live policy (a refusal is recorded and the window consumed, so a
poisoned window cannot stall the trainer). If live changed during the round (an operator or an
automatic rollback), the candidate is published but neither made live nor tried, and the
window is left for the next round, which trains from the new live version.

No round runs while an operator has paused publication (the feedback waits behind the cursor,
nothing in the registry changes) or while a trial runs (its verdict decides what the next round
trains from). Between rounds, and every decision_interval_s while waiting for work, the trainer
judges the trial and the freshly promoted live version on users' ratings (trainer.decisions)
and applies the verdict through the registry, compare-and-set. While paused it still rolls
back (that only takes a version away from users) but promotes nothing.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from feedloop.core.checkpoint import base_digest, load_checkpoint, save_checkpoint
from feedloop.core.config import describe
from feedloop.core.corpus import load_phrases, split_corpus
from feedloop.core.errors import FeedloopError, LiveChanged
from feedloop.core.human_eval import tally_verdicts
from feedloop.core.online_eval import shadow_estimate
from feedloop.core.policy import Policy
from feedloop.core.registry import (
    PROMOTED,
    REFUSED,
    ROLLED_BACK,
    SHADOW,
    Decision,
    ModelRegistry,
)
from feedloop.core.registry.pointer import unix_seconds
from feedloop.core.store.base import ReplayStore
from feedloop.core.store.outcomes import rated_generations as rated_by_version
from feedloop.core.store.outcomes import tally_outcomes
from feedloop.trainer.algorithms import make_algorithm
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.data import Cursor, Window, build_experience, read_window, version_number
from feedloop.trainer.decisions import (
    PROMOTE,
    ROLL_BACK,
    WAIT,
    Verdict,
    judge_trial,
    recent_versions,
    require_human_evaluation,
)
from feedloop.trainer.distributed import SharedUpdate
from feedloop.trainer.drift import RatingBucket, detect_drop, restart_version
from feedloop.trainer.evidence import bring_back_candidates, judge_live_now, made_live_at
from feedloop.trainer.gate import Gate
from feedloop.trainer.metrics import TrainerMetrics
from feedloop.trainer.mismatch import behaviour_mismatch
from feedloop.trainer.rl_math import AdaptiveKLController
from feedloop.trainer.signals import learning_signals
from feedloop.trainer.update import Experience, TrainingDiverged, UpdateResult

# A promotion older than this many decisions is long past any watch_s.
_PROMOTION_SEARCH_DECISIONS = 200


class RoundAbandoned(Exception):
    """A stop was requested mid-round: nothing of the round is kept."""


@dataclass(frozen=True)
class DriftState:
    """The last change of users' taste the trainer detected (persisted beside its cursor):
    when it happened (the change point), when it was seen, and the mean rating served after it
    at detection (the collapsed level a version must beat to be trained from)."""

    change_at: float | None = None
    detected_at: float | None = None
    collapsed_level: float = math.nan

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DriftState:
        if not data or data.get("change_at") is None:
            return cls()
        return cls(
            float(data["change_at"]),
            float(data["detected_at"]),
            float(data.get("collapsed_level", math.nan)),
        )


# The round and decision lines as log records (the CLI routes them; core/logs.py).
records = logging.getLogger("feedloop.trainer")


@dataclass
class RoundResult:
    outcome: str  # published, superseded, refused, skipped, aborted, abandoned
    reason: str
    version: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        f = self.figures
        bits = [f"round {f.get('round', '?')}: {self.outcome}"]
        if self.version:
            bits.append(self.version)
        for key, fmt in (
            ("new_events", "{}"),
            ("train_sequences", "{}"),
            ("perplexity_ratio_live", "{:.3f}"),
            ("keyword_inclusion_candidate", "{:.3f}"),
            ("kl_to_reference", "{:.3f}"),
            ("rm_heldout_accuracy", "{:.3f}"),
            ("round_seconds", "{:.1f}s"),
        ):
            value = f.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                bits.append(f"{key}={fmt.format(value)}")
        drift = f.get("drift") or {}
        if drift.get("restarted"):
            bits.append(f"trained_from={drift['trained_from']}")
        stale = f.get("stale_data")
        if stale:
            bits.append(f"stale_events={stale['stale_events']}/{stale['events']}x{stale['weight']}")
        return " ".join(bits) + f" ({self.reason})"


def json_safe(value: Any) -> Any:
    """Figures as JSON: non-finite floats become None, tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        store: ReplayStore,
        registry: ModelRegistry,
        *,
        metrics: TrainerMetrics | None = None,
        stop: threading.Event | None = None,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
        data_parallel: SharedUpdate | None = None,
    ) -> None:
        self.config = config
        self.data_parallel = data_parallel  # the update's other ranks (--nproc > 1, torchrun)
        self.store = store
        self.registry = registry
        self.metrics = metrics or TrainerMetrics()
        self.stop = stop or threading.Event()
        self.log = log
        self.clock = clock  # Unix seconds: the join window and the trials' ages are read on it
        # Where the bring-back's looks begin when the history no longer says when live did.
        self._started_at = clock()
        self.algorithm = make_algorithm(config)
        self._policies: dict[str, Policy] = {}
        # LoRA bases by digest: an adapter version (live, reference, the gate's earlier ones)
        # loads over the one base held here, never reading it again. Nothing trains them: a
        # candidate is a deep copy.
        self._bases: dict[str, Policy] = {}
        self._gate: Gate | None = None
        self._gate_reference: str | None = None
        self.work_dir = config.work_path
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.drift_cursor_name = f"{config.cursor_name}:drift"

    # -- policies ------------------------------------------------------------------------------

    def policy(self, version: str) -> Policy:
        """A published version's policy (verified on load), cached: live and reference only."""
        if version not in self._policies:
            policy, _ = load_checkpoint(self.registry.checkpoint_dir(version), bases=self._bases)
            self._retain(self.registry.live(), self._gate_reference)
            self._policies[version] = policy
        return self._policies[version]

    def _uncached_policies(self, versions: list[str]) -> Iterator[tuple[str, Policy]]:
        """Each version's policy, loaded when asked for and not kept (a cached one is reused):
        the gate's earlier references, so memory never holds all of them at once."""
        for version in versions:
            policy = self._policies.get(version)
            if policy is None:
                directory = self.registry.checkpoint_dir(version)
                policy, _ = load_checkpoint(directory, bases=self._bases)
            yield version, policy

    def _retain(self, *versions: str | None) -> None:
        """Drop every cached policy but these (a rollback reloads its version from the registry)."""
        self._policies = {v: p for v, p in self._policies.items() if v in versions}

    def reference_version(self, live: str) -> str:
        """The configured reference, or the root of the live version's lineage."""
        if self.config.reference_version:
            return self.config.reference_version
        return self.registry.lineage_root(live)

    def gate(self, reference_version: str) -> Gate:
        if self._gate is None or self._gate_reference != reference_version:
            self._gate_reference = reference_version
            phrases = load_phrases(self.config.corpus)
            test = split_corpus(phrases, seed=self.config.corpus_seed).test
            self._gate = Gate(self.config, self.policy(reference_version), test)
        return self._gate

    # -- the cursor ----------------------------------------------------------------------------

    def cursor(self, live: str) -> Cursor:
        """The stored cursor, moved past any window a published manifest says was consumed."""
        cursor = Cursor.from_dict(self.store.get_cursor(self.config.cursor_name))
        summary = self.registry.manifest(live).training_summary or {}
        consumed = summary.get("window") or {}
        generation_seq = int(consumed.get("generation_seq_after") or 0)
        feedback_seq = int(consumed.get("feedback_seq_after") or 0)
        if generation_seq > cursor.generation_seq or feedback_seq > cursor.feedback_seq:
            kl = summary.get("kl_coef_next")
            cursor = Cursor(
                max(generation_seq, cursor.generation_seq),
                max(feedback_seq, cursor.feedback_seq),
                kl if isinstance(kl, float) else cursor.kl_coef,
                cursor.rounds + 1,
            )
        return cursor

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise RoundAbandoned("stop requested")

    # -- drift -----------------------------------------------------------------------------------

    def drift_state(self) -> DriftState:
        return DriftState.from_dict(self.store.get_cursor(self.drift_cursor_name))

    def rating_buckets(self, since: float | None, now: float) -> list[RatingBucket]:
        """Users' ratings of what the policies served (exploration left out: the store's
        judged rows), in drift_buckets buckets ending now, none before `since`."""
        c = self.config
        width = c.drift_window_s / c.drift_buckets
        start = now - c.drift_window_s if since is None else max(since, now - c.drift_window_s)
        edges = [start] + [
            now - k * width for k in range(c.drift_buckets - 1, 0, -1) if now - k * width > start
        ]
        edges.append(now)
        buckets = []
        for begin, end in itertools.pairwise(edges):
            rated = rated_by_version(self.store.judged_generations(begin, end)).values()
            buckets.append(RatingBucket(begin, end, len(rated), sum(r for _, r in rated)))
        return buckets

    def watch_drift(self) -> tuple[DriftState, dict[str, Any]]:
        """Look for a sharp drop of the served rating since the last known change; record a new
        change (a decision in the registry, the drift cursor) when there is one."""
        c = self.config
        state = self.drift_state()
        if not c.drift_detect:
            return state, {"detect": False, "change_at": state.change_at}
        now = self.clock()
        check = detect_drop(
            self.rating_buckets(state.change_at, now),
            min_drop=c.drift_min_drop,
            alpha=c.drift_alpha,
            min_ratings=c.drift_min_ratings,
        )
        if check.detected and check.change_at is not None:
            state = DriftState(check.change_at, now, check.after.mean)
            self.store.set_cursor(
                self.drift_cursor_name,
                {
                    "change_at": state.change_at,
                    "detected_at": state.detected_at,
                    "collapsed_level": state.collapsed_level,
                },
            )
            self.metrics.drift_changes.inc()
            reason = (
                f"users' mean rating fell from {check.before.mean:.3f} to "
                f"{check.after.mean:.3f} ({check.before.n} and {check.after.n} rated; the drop's "
                f"lower bound {check.drop_low:.3f} > drift_min_drop {c.drift_min_drop}) "
                f"{now - check.change_at:.0f} s ago: a change of taste"
            )
            # Recorded in the store beside the cursor, and in every later round's figures (the
            # registry's decision details and the published manifests' training summaries).
            self._report(f"drift: {reason}")
        figures = {
            "check": check.figures(),
            "change_at": state.change_at,
            "detected_at": state.detected_at,
            "collapsed_level": state.collapsed_level,
            "detected_now": check.detected,
        }
        return state, figures

    def training_base(
        self, live: str, reference: str, drift: DriftState, figures: dict[str, Any]
    ) -> str:
        """The version this round trains from: live, or after a detected change, until live is
        a version trained after it, the best one under the evidence since the change
        (trainer/drift.py's restart_version). Records the choice in figures."""
        c = self.config
        base, reason = live, "live"
        if drift.change_at is not None and c.drift_restart:
            summary = self.registry.manifest(live).training_summary or {}
            trained_after = (summary.get("drift") or {}).get("change_at") == drift.change_at
            if trained_after:
                reason = "live was trained after the change"
            else:
                # Older versions' exploration traffic counts as theirs (served at the request's
                # own sampling); live's is at the exploration temperature, so it does not.
                older = [v for v in self.registry.versions() if v != live]
                outcomes = {
                    v: o
                    for v, o in self.store.online_outcomes(drift.change_at, explored=older).items()
                    if v in older or v == live
                }
                choice = restart_version(
                    outcomes,
                    reference=reference,
                    collapsed_level=drift.collapsed_level,
                    alpha=c.drift_alpha,
                    min_ratings=c.drift_min_ratings,
                )
                base, reason = choice.version, f"restart from {choice.version}: {choice.reason}"
        figures["trained_from"] = base
        figures["trained_from_number"] = version_number(base)
        figures["restarted"] = base != live
        figures["trained_from_reason"] = reason
        return base

    # -- one round -----------------------------------------------------------------------------

    def run_round(self) -> RoundResult:
        started = time.monotonic()
        try:
            result = self._round()
        except RoundAbandoned as exc:
            result = RoundResult("abandoned", str(exc))
        duration = time.monotonic() - started
        result.figures["round_seconds"] = duration
        self.metrics.observe_round(result.outcome, result.figures, duration)
        return result

    def _round(self) -> RoundResult:
        c = self.config
        phases: dict[str, float] = {}
        mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phases[name] = now - mark
            mark = now

        pointer = self.registry.pointer()
        live = pointer.live
        if live is None:
            return RoundResult("skipped", "no live version in the registry: nothing to improve")
        # Looked for on every round, a skipped one too: a trial in flight must not hide a change.
        drift, drift_figures = self.watch_drift()
        if pointer.paused:
            return RoundResult(
                "skipped",
                "publication paused by an operator: no round until resumed",
                figures={"drift": drift_figures},
            )
        if pointer.trial is not None:
            return RoundResult(
                "skipped",
                f"{pointer.trial.version} is on trial: waiting for its verdict",
                figures={"drift": drift_figures},
            )
        cursor = self.cursor(live)
        round_number = cursor.rounds + 1
        seed = c.seed + round_number
        window = read_window(self.store, cursor, c, now=self.clock(), live_version=live, seed=seed)
        figures: dict[str, Any] = {
            "round": round_number,
            "live_version": live,
            "live_version_number": version_number(live),
            **window.figures(),
            "phase_seconds": phases,
            "drift": drift_figures,
        }
        phase("read")
        if window.new_events < c.min_feedback_events:
            return RoundResult(
                "skipped",
                f"too little data: {window.new_events} new feedback events "
                f"(< min_feedback_events {c.min_feedback_events}); waiting for more",
                None,
                figures,
            )
        self._check_stop()

        live_policy = self.policy(live)
        reference_version = self.reference_version(live)
        reference = self.policy(reference_version)
        figures["reference_version"] = reference_version
        kl = AdaptiveKLController(
            # A coefficient saved before the bound existed (or under a higher one) starts at it.
            min(
                cursor.kl_coef if cursor.kl_coef and cursor.kl_coef > 0 else c.kl_coef,
                c.kl_coef_max,
            ),
            c.kl_target,
            c.kl_horizon,
            c.kl_coef_max,
        )
        figures["kl_coef"] = kl.value
        mismatch = behaviour_mismatch(live_policy, live, window.generations.values())
        if mismatch is not None:
            figures.update(mismatch.figures())
        signals = learning_signals(window, live_policy.tokenizer, c, drift.change_at)
        figures.update(signals.figures)
        experience, skipped_corrections = build_experience(
            live_policy.tokenizer, signals.examples, signals.corrections
        )
        notes = list(signals.notes)
        if skipped_corrections:
            notes.append(f"{skipped_corrections} corrections use words outside the vocabulary")
        figures["train_sequences"] = len(signals.examples)
        figures["corrections"] = len(signals.corrections) - skipped_corrections
        figures["heldout_rated"] = len(signals.heldout)
        figures["notes"] = notes
        phase("rewards")
        if experience is None:
            reason = "no learning signal in the window: " + "; ".join(notes or ["no rewards"])
            return self._finish_without_candidate(
                "skipped", reason, live, window, cursor, kl, figures, record=False
            )
        self._check_stop()

        base = self.training_base(live, reference_version, drift, drift_figures)
        candidate = self._trainable(
            copy.deepcopy(live_policy if base == live else self.policy(base)), base
        )
        if base != live:
            # The carried coefficient was adapted to live's distance from the reference; a
            # restart starts elsewhere (often at the reference itself), so the controller does.
            kl = AdaptiveKLController(
                min(c.kl_coef, c.kl_coef_max), c.kl_target, c.kl_horizon, c.kl_coef_max
            )
            figures["kl_coef"] = kl.value
        try:
            update = self._update(candidate, reference, experience, kl.value)
        except TrainingDiverged as exc:
            phase("update")
            return self._finish_without_candidate(
                "aborted", str(exc), live, window, cursor, kl, figures, record=True
            )
        figures["update_steps"] = update.steps
        figures.update(update.figures)
        phase("update")
        self._check_stop()

        # Those an operator's `feedloop registry prune` deleted are left out: their weights are
        # gone (the trainer's own retention always keeps gate_best_of_recent of them).
        servable = set(self.registry.versions())
        earlier = [
            v
            for v in recent_versions(pointer.previous, live, c.gate_best_of_recent)
            if v in servable
        ]
        report = self.gate(reference_version).evaluate(
            candidate,
            live_policy,
            signals.heldout,
            signals.reward_model,
            seed=seed,
            live_version=live,
            recent=self._uncached_policies(earlier),
        )
        figures.update(report.figures)
        figures["gate_passed"] = report.passed
        if c.adaptive_kl:
            kl.update(
                float(report.figures.get("kl_to_reference", float("nan"))), len(signals.examples)
            )
        figures["kl_coef_next"] = kl.value
        phase("evaluate")
        self._check_stop()

        if not report.passed:
            return self._finish_without_candidate(
                "refused", report.summary, live, window, cursor, kl, figures, record=True
            )
        version = self._publish(candidate, base, window, figures, report.summary)
        try:
            deployed = self._deploy(version, live, report.summary, figures)
        except LiveChanged as exc:
            phase("publish")
            return RoundResult(
                "superseded",
                f"{version} published but neither made live nor tried: {exc}; the next round "
                "trains from the new live version on the same feedback",
                version,
                figures,
            )
        self._save_cursor(window, cursor, kl)
        phase("publish")
        self.prune_registry(reference_version)
        phase("prune")
        return RoundResult("published", f"{deployed}; {report.summary}", version, figures)

    def _trainable(self, candidate: Policy, live: str) -> Policy:
        """The candidate the update trains: with lora_rank set, a full HF policy gains fresh
        adapters (B = 0: unchanged outputs) over its own weights, frozen as their base."""
        c = self.config
        if not c.lora_rank:
            return candidate
        from feedloop.core import hf_lora  # transformers and peft only where LoRA is asked for

        targets = tuple(t.strip() for t in c.lora_targets.split(",") if t.strip())
        digest = base_digest(self.registry.manifest(live).files)
        return hf_lora.adapt(candidate, digest, c.lora_rank, c.lora_alpha, targets)

    def _update(
        self, candidate: Policy, reference: Policy, experience: Experience, kl_coef: float
    ) -> UpdateResult:
        """The algorithm's update of the candidate, here or shared with the data-parallel ranks
        (whose failure raises RankFailed: the round is lost, nothing is published)."""
        on_step = lambda _: self._check_stop()  # noqa: E731
        if self.data_parallel is None:
            return self.algorithm.update(candidate, reference, experience, kl_coef, on_step=on_step)
        return self.data_parallel.update(
            self.algorithm, candidate, reference, experience, kl_coef, on_step=on_step
        )

    def _publish(
        self,
        candidate: Policy,
        parent: str,
        window: Window,
        figures: dict[str, Any],
        reason: str,
    ) -> str:
        staging = self.work_dir / f"candidate-{uuid.uuid4().hex[:12]}"
        try:
            summary = json_safe(
                {
                    **figures,
                    "window": window.figures(),
                    "algorithm": self.config.algorithm,
                    "config": describe(self.config),
                }
            )
            save_checkpoint(candidate, staging, parent_version=parent, training_summary=summary)
            version = self.registry.publish(staging, reason=reason, details=json_safe(figures))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._retain(self._gate_reference)  # the parent is no longer live
        self._policies[version] = candidate
        self.metrics.last_publish.set(time.time())
        self.metrics.observe_version(version, figures)
        return version

    def _deploy(self, version: str, parent: str, reason: str, figures: dict[str, Any]) -> str:
        """Make the published candidate live or put it on trial, compare-and-set on its parent
        (LiveChanged when live moved during the round: nothing changes)."""
        c = self.config
        if c.publish_as == "live":
            self.registry.set_live(version, reason=reason, expect_live=parent)
            return f"{version} live"
        self.registry.start_trial(
            version,
            mode=c.publish_as,
            share=c.canary_share,
            reason=reason,
            expect_live=parent,
            details=json_safe(figures),
        )
        return f"{version} on trial as {c.publish_as} (share {c.canary_share})"

    def prune_registry(self, reference_version: str | None = None) -> None:
        """Apply the configured retention to the registry and export its size. A failed prune is
        logged, not raised: the round's publish is already durable, and the next one retries."""
        try:
            if self.config.registry_retention:
                plan = self.registry.prune(
                    self.config.retention_policy,
                    reference=reference_version or self.config.reference_version,
                    reason="retention after a publish",
                )
                self.metrics.registry_pruned.inc(len(plan.prune))
                if plan.prune:
                    self._report(f"registry retention pruned {', '.join(plan.prune)}")
            self.metrics.observe_registry(
                self.registry.size_bytes(),
                len(self.registry.versions()),
                len(self.registry.pruned_versions()),
            )
        except FeedloopError as exc:
            self._report(f"registry retention failed: {type(exc).__name__}: {exc}", logging.WARNING)

    def _save_cursor(self, window: Window, cursor: Cursor, kl: AdaptiveKLController) -> None:
        self.store.set_cursor(
            self.config.cursor_name,
            Cursor(
                window.next_generation_seq, window.next_feedback_seq, kl.value, cursor.rounds + 1
            ).to_dict(),
        )

    def _finish_without_candidate(
        self,
        outcome: str,
        reason: str,
        live: str,
        window: Window,
        cursor: Cursor,
        kl: AdaptiveKLController,
        figures: dict[str, Any],
        *,
        record: bool,
    ) -> RoundResult:
        if record:
            self.registry.record(
                Decision(
                    f"candidate-from-{live}", REFUSED, f"{outcome}: {reason}", json_safe(figures)
                )
            )
        self._save_cursor(window, cursor, kl)  # after the decision is durable
        return RoundResult(outcome, reason, None, figures)

    # -- online decisions ----------------------------------------------------------------------

    def decide(self) -> Verdict | None:
        """Judge the trial, or the live version within its watch, and apply the verdict.

        Returns the verdict (None when there is nothing to judge). A verdict the pointer
        outran (LiveChanged: an operator acted meanwhile) is logged and dropped.
        """
        pointer = self.registry.pointer()
        self.metrics.paused.set(1 if pointer.paused else 0)
        live = pointer.live
        if live is None:
            return None
        c, now = self.config, self.clock()
        trial = pointer.trial
        if trial is not None:
            since = unix_seconds(trial.since)
            judged = self.store.judged_generations(since)  # read once: tally and shadow
            outcomes = tally_outcomes(judged, [live, trial.version])
            shadow = None
            if trial.mode == SHADOW:
                evidence = self.store.shadow_evidence(trial.version, live, judged)
                shadow = shadow_estimate(evidence, c.decision_alpha / 2, c.shadow_max_weight)
            verdict = judge_trial(
                trial, now - since, outcomes[live], outcomes[trial.version], c, shadow
            )
            if c.require_human_eval and verdict.action == PROMOTE:
                evaluation = tally_verdicts(
                    self.store.verdicts_between(trial.version, live), trial.version, live
                )
                verdict = require_human_evaluation(verdict, trial, now - since, evaluation, c)
            if verdict.action == PROMOTE and pointer.paused:
                verdict = Verdict(WAIT, trial.version, f"paused: {verdict.reason}", verdict.figures)
        else:  # the watch, then bringing an older version back (trainer/evidence.py)
            history = self.registry.history(limit=_PROMOTION_SEARCH_DECISIONS)
            candidates = bring_back_candidates(
                pointer, self.reference_version(live), self.registry.versions()
            )
            found = made_live_at(history, live)
            outcome = judge_live_now(
                self.store,
                pointer,
                c,
                now,
                promoted_at=self._promoted_at(live),
                live_since=found if found is not None else self._started_at,
                candidates=candidates,
                # Ratings from before a detected change of taste judge the old taste.
                not_before=self.drift_state().change_at,
            )
            if outcome is None:
                return None
            verdict = outcome
        self.metrics.decisions.labels(verdict.action).inc()
        try:
            self._apply(verdict, live, trial is not None)
        except LiveChanged as exc:
            self._report(f"decision dropped, the pointer moved: {exc} ({verdict.reason})")
        return verdict

    def _apply(self, verdict: Verdict, live: str, on_trial: bool) -> None:
        if verdict.action not in (PROMOTE, ROLL_BACK) or verdict.version is None:
            return
        figures = json_safe(verdict.figures)
        if on_trial:
            self.registry.end_trial(
                promote=verdict.action == PROMOTE,
                reason=verdict.reason,
                details=figures,
                expect_version=verdict.version,
            )
        else:
            self.registry.set_live(
                verdict.version,
                reason=verdict.reason,
                action=ROLLED_BACK,
                expect_live=live,
                details=figures,
            )
        self._report(
            f"decision: {verdict.action} {verdict.version} ({verdict.reason})",
            version=verdict.version,
        )

    def _promoted_at(self, live: str) -> float | None:
        """When `live` was last promoted (None if it became live otherwise, e.g. a rollback)."""
        for decision in self.registry.history(limit=_PROMOTION_SEARCH_DECISIONS):
            if decision.version == live:
                return unix_seconds(decision.at) if decision.action == PROMOTED else None
        return None

    # -- the loop ------------------------------------------------------------------------------

    def wait_for_work(self, last_feedback_seq: int) -> None:
        """Sleep until interval_s passes, K new events arrive, or a stop is requested; judge the
        trial and the watched live version every decision_interval_s meanwhile."""
        now = time.monotonic()
        deadline, next_decision = (
            now + self.config.interval_s,
            now + self.config.decision_interval_s,
        )
        while not self.stop.is_set() and time.monotonic() < deadline:
            _, feedback_seq = self.store.max_seq()
            if feedback_seq - last_feedback_seq >= self.config.wake_after_feedback_events:
                return
            if time.monotonic() >= next_decision:
                self._decide_logging_failures()
                next_decision = time.monotonic() + self.config.decision_interval_s
            self.stop.wait(min(self.config.poll_interval_s, max(0.0, deadline - time.monotonic())))

    def _decide_logging_failures(self) -> None:
        try:
            self.decide()
        except Exception as exc:  # a failed look must not end the loop: the next one retries
            self._report(f"decision failed: {type(exc).__name__}: {exc}", logging.WARNING)

    def _report(self, line: str, level: int = logging.INFO, **fields: Any) -> None:
        """A line for `log` (the human summary) and the same as a log record of
        "feedloop.trainer" with fields (round, version, outcome), which `--log-format json`
        writes as JSON (core/logs.py); without logging configured, INFO records go nowhere."""
        self.log(line)
        records.log(level, line, extra={k: v for k, v in fields.items() if v is not None})

    def run(self, *, once: bool = False) -> int:
        """Rounds until stopped (or one with once=True); returns the process exit code."""
        torch.set_num_threads(self.config.torch_threads)
        self.prune_registry()  # a restarted trainer applies retention (and exports sizes) at once
        while not self.stop.is_set():
            seen_feedback_seq = self.store.max_seq()[1]
            self._decide_logging_failures()
            try:
                result = self.run_round()
                self._report(
                    result.line(),
                    round=result.figures.get("round"),
                    version=result.version,
                    outcome=result.outcome,
                )
                waiting = result.outcome in ("skipped", "abandoned")
            except Exception as exc:  # a failed round must not end the loop: report, retry
                self.metrics.rounds.labels("failed").inc()
                self._report(f"round failed: {type(exc).__name__}: {exc}", logging.WARNING)
                if once:
                    return 1
                waiting = True
            if once:
                return 0
            if self.config.pause_between_rounds_s > 0:
                self.stop.wait(self.config.pause_between_rounds_s)
            # After a round that consumed its window, K events past the cursor wake the next
            # one; after one that could not, K events past what it saw (no busy loop).
            self.wait_for_work(seen_feedback_seq if waiting else self._consumed_feedback())
        return 0

    def _consumed_feedback(self) -> int:
        cursor = self.store.get_cursor(self.config.cursor_name) or {}
        return int(cursor.get("feedback_seq", 0))

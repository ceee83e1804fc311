"""Every series the trainer exports, declared once (prefix feedloop_trainer_).

One `TrainerMetrics` object per trainer owns its own CollectorRegistry, so several trainers
(tests, benches) can live in one process; the CLI serves it on /metrics.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from feedloop.trainer.decisions import VERDICTS

# superseded: published, but live changed during the round, so the candidate was neither made
# live nor put on trial, and its window is left for the next round (from the new live version).
# Per-version series keep only the newest published versions: a label per version forever
# would grow the series without bound (one per round).
VERSIONS_EXPORTED = 5
OUTCOMES = ("published", "superseded", "refused", "skipped", "aborted", "abandoned", "failed")
PREFIX = "feedloop_trainer_"


class TrainerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # process_* and python_info, which a private registry gets only when asked.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.rounds = Counter(
            PREFIX + "rounds_total", "Training rounds by outcome", ["outcome"], registry=r
        )
        for outcome in OUTCOMES:
            self.rounds.labels(outcome)  # every outcome exported from the start, at 0
        self.update_steps = Counter(
            PREFIX + "update_steps_total", "Gradient steps taken", registry=r
        )
        self.feedback_events = Counter(
            PREFIX + "feedback_events_consumed_total",
            "New feedback events consumed by rounds",
            registry=r,
        )
        self.policy_loss = Gauge(
            PREFIX + "policy_loss", "Mean policy loss of the last round", registry=r
        )
        self.value_loss = Gauge(
            PREFIX + "value_loss", "Mean value loss of the last round", registry=r
        )
        self.entropy = Gauge(
            PREFIX + "entropy_nats", "Mean per-token entropy, last round", registry=r
        )
        self.kl_to_reference = Gauge(
            PREFIX + "kl_to_reference_nats",
            "KL(candidate || reference) per phrase, last round",
            registry=r,
        )
        self.gate_max_kl = Gauge(
            PREFIX + "gate_max_kl_nats",
            "The gate's limit on KL to the reference per phrase (config gate_max_kl)",
            registry=r,
        )
        self.kl_coef = Gauge(
            PREFIX + "kl_coef", "Coefficient of the per-token KL penalty", registry=r
        )
        self.reward_model_accuracy = Gauge(
            PREFIX + "reward_model_heldout_accuracy",
            "Reward model pairwise accuracy on held-out pairs",
            registry=r,
        )
        self.drift_changes = Counter(
            PREFIX + "drift_changes_total",
            "Changes of users' taste detected (a sharp drop of the served rating)",
            registry=r,
        )
        self.drift_drop_low = Gauge(
            PREFIX + "drift_drop_lower_bound",
            "Largest lower bound on a drop of the served mean rating ([-1, 1]) at the last look",
            registry=r,
        )
        self.drift_restarted = Gauge(
            PREFIX + "drift_restarted",
            "1 when the last round trained from another version than live (after a change)",
            registry=r,
        )
        self.drift_trained_from = Gauge(
            PREFIX + "drift_trained_from_version",
            "Number of the version the last round trained from",
            registry=r,
        )
        self.drift_stale_share = Gauge(
            PREFIX + "drift_stale_events_ratio",
            "Share of the last round's feedback events from before the detected change point "
            "(each weighed drift_stale_weight)",
            registry=r,
        )
        self.logprob_mismatch = Gauge(
            PREFIX + "behaviour_logprob_mismatch_nats",
            "|logged behaviour log-prob - trainer recompute| per token on the live version's "
            "generations of the last round: max and mean",
            ["stat"],
            registry=r,
        )
        self.mean_reward = Gauge(
            PREFIX + "window_mean_reward",
            "Mean reward of the last round's training data",
            registry=r,
        )
        self.gate_perplexity_ratio = Gauge(
            PREFIX + "gate_perplexity_ratio", "Candidate / live held-out perplexity", registry=r
        )
        self.gate_perplexity = Gauge(
            PREFIX + "gate_perplexity", "Held-out perplexity", ["policy"], registry=r
        )
        self.gate_keyword_inclusion = Gauge(
            PREFIX + "gate_keyword_inclusion_ratio",
            "Share of held-out prompts whose sampled phrase contains all their keywords",
            ["policy"],
            registry=r,
        )
        self.version_perplexity = Gauge(
            PREFIX + "version_heldout_perplexity",
            f"Held-out perplexity of each published version (the newest {VERSIONS_EXPORTED})",
            ["version"],
            registry=r,
        )
        self.version_keyword_inclusion = Gauge(
            PREFIX + "version_keyword_inclusion_ratio",
            f"Keyword inclusion of each published version (the newest {VERSIONS_EXPORTED})",
            ["version"],
            registry=r,
        )
        self._versions: list[str] = []
        self.gate_ope_value = Gauge(
            PREFIX + "gate_offpolicy_reward",
            "Off-policy expected reward on held-out feedback",
            ["policy", "estimator"],
            registry=r,
        )
        self.gate_decisions = Counter(
            PREFIX + "gate_decisions_total", "Gate decisions", ["decision"], registry=r
        )
        for decision in ("pass", "refuse"):
            self.gate_decisions.labels(decision)
        self.window_generations = Gauge(
            PREFIX + "window_generations", "Generations in the last round's window", registry=r
        )
        self.window_dropped = Counter(
            PREFIX + "window_dropped_stale_total",
            "Generations dropped as too old or too stale",
            registry=r,
        )
        self.window_unusable = Counter(
            PREFIX + "window_dropped_unusable_total",
            "Generations skipped as unusable (a non-finite logged log-probability, or sampling "
            "parameters that do not validate)",
            registry=r,
        )
        self.newest_data_age = Gauge(
            PREFIX + "newest_feedback_age_seconds",
            "Age of the newest feedback consumed (feedback lag)",
            registry=r,
        )
        self.oldest_data_age = Gauge(
            PREFIX + "oldest_feedback_age_seconds",
            "Age of the oldest new feedback consumed",
            registry=r,
        )
        self.round_duration = Histogram(
            PREFIX + "round_duration_seconds",
            "Wall time of a training round",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=r,
        )
        self.phase_seconds = Gauge(
            PREFIX + "round_phase_seconds",
            "Wall time of each phase of the last round",
            ["phase"],
            registry=r,
        )
        self.last_publish = Gauge(
            PREFIX + "last_publish_timestamp_seconds",
            "Unix time of the last published version",
            registry=r,
        )
        self.decisions = Counter(
            PREFIX + "online_decisions_total",
            "Online verdicts on the trial or the watched live version, by action",
            ["action"],
            registry=r,
        )
        for action in VERDICTS:
            self.decisions.labels(action)
        self.paused = Gauge(
            PREFIX + "paused",
            "1 while an operator has paused the trainer's publication, else 0",
            registry=r,
        )
        self.live_version = Gauge(
            PREFIX + "live_version_number",
            "Number of the live version the trainer last trained from",
            registry=r,
        )

        self.registry_bytes = Gauge(
            PREFIX + "registry_bytes",
            "Bytes of checkpoint files in the model registry (after the last retention pass)",
            registry=r,
        )
        self.registry_versions = Gauge(
            PREFIX + "registry_versions",
            "Published versions in the model registry: servable, or pruned (weights deleted)",
            ["state"],
            registry=r,
        )
        self.registry_pruned = Counter(
            PREFIX + "registry_pruned_versions_total",
            "Versions whose weights this trainer's registry retention deleted",
            registry=r,
        )
        self._declare_learning_knobs(r)

    def _declare_learning_knobs(self, r: CollectorRegistry) -> None:
        """Series of exploration, rebalancing, shaping and diversity (issues 14 and 21)."""
        self.candidate_sampled_entropy = Gauge(
            PREFIX + "candidate_sampled_entropy_nats",
            "Mean -log p(phrase) of the last candidate's own samples (the gate's diversity)",
            registry=r,
        )
        self.candidate_distinct_share = Gauge(
            PREFIX + "candidate_distinct_phrase_share",
            "Distinct phrases / phrases among the last candidate's own samples",
            registry=r,
        )
        self.reward_by_arm = Gauge(
            PREFIX + "window_mean_rating_by_arm",
            "Mean rating of the last window's rated generations by how they were served "
            "(exploration, policy): the gap is exploration's cost in served reward",
            ["arm"],
            registry=r,
        )
        self.balance_weight = Gauge(
            PREFIX + "balance_weight",
            "Rebalancing weight of each rating class and feedback kind in the last window",
            ["group", "label"],
            registry=r,
        )
        self.shaping_contribution = Gauge(
            PREFIX + "shaping_mean_contribution",
            "Mean reward added by each declared shaping term in the last round",
            ["term"],
            registry=r,
        )

    def observe_drift(self, figures: dict[str, Any]) -> None:
        """The drift detector's last look, what the round trained from, and how much of its
        window predates a detected change."""
        drift = figures.get("drift") or {}
        drop = (drift.get("check") or {}).get("drop_low")
        if isinstance(drop, float) and math.isfinite(drop):
            self.drift_drop_low.set(drop)
        if "trained_from" in drift:
            self.drift_restarted.set(1 if drift.get("restarted") else 0)
            number = drift.get("trained_from_number")
            if isinstance(number, int):
                self.drift_trained_from.set(number)
        stale = figures.get("stale_data") or {}
        if stale.get("events"):
            self.drift_stale_share.set(stale["stale_events"] / stale["events"])

    def observe_learning_knobs(self, figures: dict[str, Any]) -> None:
        for key, gauge in (
            ("candidate_sampled_entropy_nats", self.candidate_sampled_entropy),
            ("candidate_distinct_phrase_share", self.candidate_distinct_share),
        ):
            value = figures.get(key)
            if isinstance(value, float) and math.isfinite(value):
                gauge.set(value)
        for arm, report in (figures.get("reward_by_arm") or {}).items():
            mean = report.get("mean_rating")
            if isinstance(mean, float) and math.isfinite(mean):
                self.reward_by_arm.labels(arm).set(mean)
        for group in ("rating_class", "feedback_kind"):
            for label, weight in (figures.get(f"{group}_weights") or {}).items():
                self.balance_weight.labels(group, label).set(weight)
        for term, report in (figures.get("shaping") or {}).items():
            self.shaping_contribution.labels(term).set(report["mean_contribution"])

    def observe_version(self, version: str, figures: dict[str, Any]) -> None:
        """A published version's automatic evaluation, by version; the oldest label goes once
        more than VERSIONS_EXPORTED are exported."""
        for gauge, key in (
            (self.version_perplexity, "perplexity_candidate"),
            (self.version_keyword_inclusion, "keyword_inclusion_candidate"),
        ):
            value = figures.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                gauge.labels(version).set(value)
        if version not in self._versions:
            self._versions.append(version)
        while len(self._versions) > VERSIONS_EXPORTED:
            old = self._versions.pop(0)
            for gauge in (self.version_perplexity, self.version_keyword_inclusion):
                gauge.remove(old)  # a label never set is no error

    def observe_registry(self, size_bytes: int, servable: int, pruned: int) -> None:
        self.registry_bytes.set(size_bytes)
        self.registry_versions.labels("servable").set(servable)
        self.registry_versions.labels("pruned").set(pruned)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics over HTTP in a daemon thread; returns the bound address."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound_host, bound_port = server.server_address[:2]
        return str(bound_host), int(bound_port)

    def observe_round(self, outcome: str, figures: dict[str, Any], duration_s: float) -> None:
        self.rounds.labels(outcome).inc()
        self.round_duration.observe(duration_s)

        def put(gauge: Gauge, key: str) -> None:
            value = figures.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                gauge.set(value)

        put(self.policy_loss, "policy_loss")
        put(self.value_loss, "value_loss")
        put(self.entropy, "entropy")
        put(self.kl_to_reference, "kl_to_reference")
        put(self.kl_coef, "kl_coef")
        put(self.reward_model_accuracy, "rm_heldout_accuracy")
        put(self.mean_reward, "mean_reward")
        put(self.logprob_mismatch.labels("max"), "logprob_mismatch_max")
        put(self.logprob_mismatch.labels("mean"), "logprob_mismatch_mean")
        put(self.gate_perplexity_ratio, "perplexity_ratio_live")
        put(self.window_generations, "window_generations")
        put(self.newest_data_age, "newest_event_age_s")
        put(self.oldest_data_age, "oldest_event_age_s")
        put(self.live_version, "live_version_number")
        for policy in ("candidate", "live"):
            put(self.gate_keyword_inclusion.labels(policy), f"keyword_inclusion_{policy}")
        for policy in ("candidate", "live", "reference"):
            put(self.gate_perplexity.labels(policy), f"perplexity_{policy}")
            ope = figures.get(f"ope_{policy}")
            if isinstance(ope, dict):
                for estimator in ("snips", "dr"):
                    value = (ope.get(estimator) or {}).get("value")
                    if isinstance(value, float) and math.isfinite(value):
                        self.gate_ope_value.labels(policy, estimator).set(value)
        steps = figures.get("update_steps")
        if isinstance(steps, int) and steps > 0:
            self.update_steps.inc(steps)
        new_events = figures.get("new_events")
        if outcome in ("published", "refused", "aborted") and isinstance(new_events, int):
            self.feedback_events.inc(new_events)
        dropped = figures.get("dropped_stale")
        if isinstance(dropped, int) and dropped > 0:
            self.window_dropped.inc(dropped)
        unusable = figures.get("dropped_unusable")
        if isinstance(unusable, int) and unusable > 0:
            self.window_unusable.inc(unusable)
        if "gate_passed" in figures:
            self.gate_decisions.labels("pass" if figures["gate_passed"] else "refuse").inc()
        for phase, seconds in (figures.get("phase_seconds") or {}).items():
            self.phase_seconds.labels(phase).set(seconds)
        self.observe_learning_knobs(figures)
        self.observe_drift(figures)

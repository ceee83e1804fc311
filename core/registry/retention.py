"""Registry retention: which published versions keep their weights, as a pure function of the
registry's state and a declared policy.

A long run publishes a version every round (the demo: about one every 11 s, 6 MB each), so the
registry grows without end unless something deletes weights. What an online RL loop still needs
is kept whatever the policy's numbers say:
    live        serves every request
    trial       the canary or shadow beside live
    pinned      an operator said so (`feedloop models pin VERSION`)
    rollback    the newest `keep_rollback` distinct earlier live versions: a rollback goes back to
                them, and the trainer's gate loads the newest `gate_best_of_recent` of them (3
                by default) to compare a candidate with
    reference   the version the KL leash pulls towards: the root of the live (and trial)
                version's lineage, the reference a manifest says its round used, and one the
                caller names (the trainer's configured reference)
    base        the full checkpoint a kept LoRA adapter is trained over (named in the adapter's
                manifest by its base's content digest): an adapter is nothing without it
    last        the newest `keep_last` published versions
    best        the `keep_best` versions with the highest off-policy value the gate recorded in
                their manifest (see `evaluation_value`)
Everything else is pruned: its weights are deleted, its manifest and every decision stay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from feedloop.core.registry.pointer import LivePointer

LIVE, TRIAL, PINNED_REASON, ROLLBACK, REFERENCE, LAST, BEST, BASE = (
    "live",
    "trial",
    "pinned",
    "rollback",
    "reference",
    "last",
    "best",
    "base",
)


@dataclass(frozen=True)
class RetentionPolicy:
    """How many versions beyond those serving or pinned keep their weights.

    The defaults keep at most 11 unprotected versions plus live, trial, reference and pins:
    about 90 MB with the default 1.5M-parameter policy (6 MB a version), whatever the run's
    length. keep_rollback is 3 because the trainer's gate compares each candidate with the 3
    newest earlier live versions (gate_best_of_recent) and must be able to load them; an
    operator's rollback rarely goes further back than that.
    """

    keep_last: int = 5
    keep_best: int = 3
    keep_rollback: int = 3

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best", "keep_rollback"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.keep_last < 1:
            # The newest version is the trainer's next parent whenever it is made live.
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")


@dataclass(frozen=True)
class VersionFacts:
    """What retention reads of one published version; provides_base: the content digest of the
    base model a full HF checkpoint gives adapters, needs_base: the one an adapter needs."""

    parent: str | None
    training_summary: Mapping[str, Any]
    pruned: bool
    provides_base: str | None = None
    needs_base: str | None = None


def base_provider(digest: str, versions: Mapping[str, VersionFacts]) -> str | None:
    """The oldest servable version that provides the base with this digest, if any."""
    for version, facts in versions.items():
        if facts.provides_base == digest and not facts.pruned:
            return version
    return None


@dataclass(frozen=True)
class RegistrySnapshot:
    """The registry's state, read under its writers' lock: every published version (oldest
    first, pruned ones included), the live pointer and the pins."""

    versions: Mapping[str, VersionFacts]
    pointer: LivePointer
    pins: frozenset[str]


@dataclass(frozen=True)
class PrunePlan:
    """Versions that keep their weights (with every reason) and versions pruned, oldest first."""

    keep: Mapping[str, tuple[str, ...]]
    prune: tuple[str, ...]


def evaluation_value(training_summary: Mapping[str, Any]) -> float | None:
    """The gate's recorded off-policy value of a version (the estimator it used), or None when
    its round had too few held-out ratings to estimate one. Values come from different rounds'
    held-out ratings, so the ranking is approximate: the best record there is in the registry."""
    estimator = training_summary.get("ope_estimator")
    candidate = training_summary.get("ope_candidate")
    if not isinstance(estimator, str) or not isinstance(candidate, Mapping):
        return None
    value = (candidate.get(estimator) or {}).get("value")
    return float(value) if isinstance(value, int | float) and value == value else None


def lineage_root(version: str, parents: Mapping[str, str | None]) -> str:
    """The oldest ancestor of version among published ones (pruned included): the pretrained
    policy the KL leash pulls towards unless the trainer is configured otherwise."""
    seen = {version}
    while (parent := parents.get(version)) and parent in parents and parent not in seen:
        seen.add(parent)
        version = parent
    return version


def plan_prune(
    snapshot: RegistrySnapshot, policy: RetentionPolicy, reference: str | None = None
) -> PrunePlan:
    """Which versions keep their weights and which are pruned (see the module's docstring)."""
    facts = snapshot.versions
    servable = [v for v, f in facts.items() if not f.pruned]
    servable_set = set(servable)
    keep: dict[str, list[str]] = {}

    def mark(version: str | None, reason: str) -> None:
        reasons = keep.setdefault(version, []) if version in servable_set else None
        if reasons is not None and reason not in reasons:
            reasons.append(reason)

    pointer = snapshot.pointer
    trial = pointer.trial.version if pointer.trial else None
    mark(pointer.live, LIVE)
    mark(trial, TRIAL)
    for version in sorted(snapshot.pins):
        mark(version, PINNED_REASON)
    earlier = [v for v in dict.fromkeys(reversed(pointer.previous)) if v != pointer.live]
    for version in earlier[: policy.keep_rollback]:
        mark(version, ROLLBACK)
    parents = {v: f.parent for v, f in facts.items()}
    for serving in (pointer.live, trial):
        if serving is None or serving not in facts:
            continue
        mark(lineage_root(serving, parents), REFERENCE)
        named = facts[serving].training_summary.get("reference_version")
        mark(named if isinstance(named, str) else None, REFERENCE)
    mark(reference, REFERENCE)
    for version in servable[-policy.keep_last :]:
        mark(version, LAST)
    scored = [
        (value, number, version)
        for number, version in enumerate(servable)
        if (value := evaluation_value(facts[version].training_summary)) is not None
    ]
    for _, _, version in sorted(scored, reverse=True)[: policy.keep_best]:
        mark(version, BEST)
    # Last: every adapter kept above, whatever kept it, keeps its base (bases need none); a
    # provider of that base kept anyway is enough, else the oldest one is kept for it.
    provided = {facts[v].provides_base for v in keep}
    for version in list(keep):
        needs = facts[version].needs_base
        if needs is not None and needs not in provided:
            mark(base_provider(needs, facts), BASE)
            provided.add(needs)
    return PrunePlan(
        {v: tuple(keep[v]) for v in servable if v in keep},
        tuple(v for v in servable if v not in keep),
    )

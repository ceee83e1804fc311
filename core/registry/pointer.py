"""The live pointer and the history's decisions, and every change of the pointer as a pure
function: from the current pointer to the next one and the decisions that record it.

Both registry backends apply these transitions under their writers' lock and store the result in
one crash-safe step, so they refuse and accept exactly the same changes. A transition that raises
changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from feedloop.core.errors import LiveChanged, RegistryError, TrialError

PUBLISHED, PROMOTED, REFUSED, ROLLED_BACK = "published", "promoted", "refused", "rolled_back"
# A trial's two modes are also the actions that record its start.
CANARY, SHADOW = "canary", "shadow"
PAUSED, RESUMED = "paused", "resumed"
# An operator's pins, and retention deleting a version's weights.
PINNED, UNPINNED, PRUNED = "pinned", "unpinned", "pruned"
TRIAL_MODES = (CANARY, SHADOW)
ACTIONS = (
    PUBLISHED,
    PROMOTED,
    REFUSED,
    ROLLED_BACK,
    CANARY,
    SHADOW,
    PAUSED,
    RESUMED,
    PINNED,
    UNPINNED,
    PRUNED,
)
# How many earlier live versions a rollback can go back to.
ROLLBACK_DEPTH = 20


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def unix_seconds(iso_time: str) -> float:
    """A registry time (a trial's start, a decision's) as Unix seconds, the store's clock."""
    return datetime.fromisoformat(iso_time).timestamp()


@dataclass(frozen=True)
class Decision:
    """One entry of the registry's history."""

    version: str
    action: str
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=now_iso)


@dataclass(frozen=True)
class Trial:
    """A version on trial beside the live one (at most one at a time).

    A canary serves `share` of the requests not pinned to a version; a shadow serves nothing and
    scores `share` of the live version's candidates.
    """

    version: str
    mode: str  # CANARY or SHADOW
    share: float  # in [0, 1]
    since: str  # ISO time the trial started
    parent: str  # the live version when it started

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        return cls(
            str(data["version"]),
            str(data["mode"]),
            float(data["share"]),
            str(data["since"]),
            str(data["parent"]),
        )


@dataclass(frozen=True)
class LivePointer:
    """What serves: the live version, the rollback stack, the trial, and whether the trainer may
    publish."""

    live: str | None
    previous: tuple[str, ...] = ()  # earlier live versions, oldest first: the rollback stack
    trial: Trial | None = None
    paused: bool = False  # an operator paused the trainer's publication


Change = tuple[LivePointer, tuple[Decision, ...]]
# A pointer change, applied by a backend to its current pointer under its writers' lock.
Transition = Callable[[LivePointer], Change]


def _check_live(current: LivePointer, expect_live: str | None) -> None:
    if expect_live is not None and current.live != expect_live:
        raise LiveChanged(
            f"expected live version {expect_live!r} but the live version is {current.live!r}: "
            "it changed since it was read; nothing was changed"
        )


def _with_live(current: LivePointer, version: str) -> LivePointer:
    """The pointer with `version` live and the old live version on the rollback stack; a trial
    of that version ends, since it now serves everything."""
    previous = current.previous + ((current.live,) if current.live else ())
    trial = None if current.trial and current.trial.version == version else current.trial
    return replace(current, live=version, previous=previous[-ROLLBACK_DEPTH:], trial=trial)


def to_live(
    current: LivePointer,
    version: str,
    reason: str,
    action: str,
    expect_live: str | None,
    figures: dict[str, Any] | None = None,
) -> Change:
    _check_live(current, expect_live)
    if current.live == version:
        return current, ()
    details: dict[str, Any] = {**(figures or {}), "previous": current.live}
    if current.trial and current.trial.version == version:
        details["trial"] = current.trial.mode
    return _with_live(current, version), (Decision(version, action, reason, details),)


def to_rolled_back(current: LivePointer, reason: str) -> Change:
    if not current.previous:
        raise RegistryError("nothing to roll back to: no earlier live version")
    target = current.previous[-1]
    trial = None if current.trial and current.trial.version == target else current.trial
    pointer = replace(current, live=target, previous=current.previous[:-1], trial=trial)
    return pointer, (Decision(target, ROLLED_BACK, reason, {"from": current.live}),)


def valid_share(share: float) -> bool:
    """Whether share is a number in [0, 1] (NaN is not)."""
    return not math.isnan(share) and 0.0 <= share <= 1.0


def to_trial(
    current: LivePointer,
    version: str,
    mode: str,
    share: float,
    reason: str,
    expect_live: str | None,
    details: dict[str, Any],
) -> Change:
    if mode not in TRIAL_MODES:
        raise ValueError(f"mode must be one of {', '.join(TRIAL_MODES)}, got {mode!r}")
    if not valid_share(share):
        raise ValueError(f"share must be in [0, 1], got {share!r}")
    _check_live(current, expect_live)
    if current.trial is not None:
        raise TrialError(
            f"{current.trial.version} is already on trial ({current.trial.mode}); end that trial "
            "first"
        )
    if current.live is None:
        raise TrialError("no live version to run a trial beside")
    if current.live == version:
        raise TrialError(f"{version} is the live version; a trial needs another version")
    trial = Trial(version, mode, share, now_iso(), current.live)
    figures = {**details, "share": share, "parent": current.live}
    return replace(current, trial=trial), (Decision(version, mode, reason, figures),)


def to_trial_end(
    current: LivePointer,
    promote: bool,
    reason: str,
    details: dict[str, Any],
    expect_version: str | None,
) -> Change:
    trial = current.trial
    if trial is None:
        raise TrialError("no trial is running")
    if expect_version is not None and trial.version != expect_version:
        raise LiveChanged(
            f"expected {expect_version!r} on trial but {trial.version!r} is; nothing was changed"
        )
    if promote:
        figures = {**details, "previous": current.live, "trial": trial.mode}
        return _with_live(current, trial.version), (
            Decision(trial.version, PROMOTED, reason, figures),
        )
    # As for any rollback, the decision names the version that serves and `from` the one removed.
    figures = {**details, "from": trial.version, "trial": trial.mode}
    return replace(current, trial=None), (
        Decision(current.live or "", ROLLED_BACK, reason, figures),
    )


def to_paused(current: LivePointer, paused: bool, reason: str) -> Change:
    if current.paused == paused:
        return current, ()
    action = PAUSED if paused else RESUMED
    return replace(current, paused=paused), (Decision(current.live or "", action, reason),)


def pointer_to_dict(pointer: LivePointer) -> dict[str, Any]:
    """The pointer as JSON-ready data (the directory backend's LIVE file)."""
    return {
        "live": pointer.live,
        "previous": list(pointer.previous),
        "trial": pointer.trial.to_dict() if pointer.trial else None,
        "paused": pointer.paused,
    }


def pointer_from_dict(data: dict[str, Any]) -> LivePointer:
    """Reads what pointer_to_dict wrote, and a pointer written before trials existed."""
    trial = data.get("trial")
    return LivePointer(
        data.get("live"),
        tuple(data.get("previous", ())),
        Trial.from_dict(trial) if trial else None,
        bool(data.get("paused", False)),
    )

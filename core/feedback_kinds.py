"""The feedback vocabulary: the kinds of feedback event, the rating scales, and the one mapping
of a rating to [-1, 1].

Pure Python, shared by the server (validation and rating metrics), the trainer (rewards) and the
simulated users (ratings on a scale), so that all three read a rating the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# The simulated users draw a kind by its position in this order, so reordering it changes what
# every seeded simulation does.
FeedbackKind = Literal["rating", "comparison", "ranking", "correction"]
FEEDBACK_KINDS: tuple[FeedbackKind, ...] = get_args(FeedbackKind)

RatingScaleName = Literal["unit", "thumbs", "stars5"]


@dataclass(frozen=True)
class RatingScale:
    """Scores from `low` (worst) to `high` (best)."""

    name: RatingScaleName
    low: float
    high: float


RATING_SCALES: dict[str, RatingScale] = {
    "unit": RatingScale("unit", 0.0, 1.0),
    "thumbs": RatingScale("thumbs", 0.0, 1.0),  # down or up, nothing between
    "stars5": RatingScale("stars5", 1.0, 5.0),  # whole or fractional stars
}
# The scale of a rating that names none (the wire's RATING_SCALE_UNSPECIFIED).
DEFAULT_RATING_SCALE: RatingScaleName = "unit"


def rating_scale(name: str) -> RatingScale:
    """The scale called `name`; ValueError naming the known ones for any other."""
    found = RATING_SCALES.get(name)
    if found is None:
        raise ValueError(f"unknown rating scale {name!r} (one of {', '.join(RATING_SCALES)})")
    return found


def normalise_rating(score: float, scale: str | None) -> float:
    """A rating mapped linearly from its scale to [-1, 1], clamped to [-1, 1].

    scale None or "": the default scale (unit). ValueError for an unknown scale.
    """
    bounds = rating_scale(scale or DEFAULT_RATING_SCALE)
    # Centre and half-width rather than (score - low) / (high - low): exact for stars
    # ((score - 3) / 2) and for unit (2 * score - 1), so no rating is off by a rounding.
    middle = (bounds.low + bounds.high) / 2
    half_width = (bounds.high - bounds.low) / 2
    return max(-1.0, min(1.0, (score - middle) / half_width))

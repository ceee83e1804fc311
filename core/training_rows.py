"""Feedback events as the rows preference and fine-tuning trainers take (TRL's dataset formats).

Pure functions of one stored event and the generations it names; `feedloop export` streams them
to files, and anything else that archives feedback can reuse them.

- Preference pairs, TRL's standard preference format {prompt, chosen, rejected} (DPO, IPO,
  ORPO, reward modelling): a comparison is one pair; a ranking of K candidates is its K(K-1)/2
  pairs, every better one over every worse one, as InstructGPT turned rankings into comparisons
  (Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
  section 3.5); a correction is the user's text chosen over the original.
- KTO rows, TRL's unpaired preference format {prompt, completion, label} (Ethayarajh et al.
  2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): one per rating, label by
  `kto_label`'s declared rule.
- SFT rows, TRL's prompt-completion format {prompt, completion}: one per correction.

Each row also says where it came from (kind, event_id, model_version); trainers ignore extra
columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Literal, get_args

from feedloop.core.feedback_kinds import FeedbackKind, normalise_rating
from feedloop.core.store.base import FeedbackRecord, GenerationRecord

DatasetName = Literal["preference", "kto", "sft"]
DATASETS: tuple[DatasetName, ...] = get_args(DatasetName)
# Which feedback kinds each dataset is made of.
KINDS_OF: dict[DatasetName, tuple[FeedbackKind, ...]] = {
    "preference": ("comparison", "ranking", "correction"),
    "kto": ("rating",),
    "sft": ("correction",),
}
# Every row's columns, in order: the format's own, then provenance.
PROVENANCE = ("kind", "event_id", "model_version")
COLUMNS: dict[DatasetName, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected", *PROVENANCE),
    "kto": ("prompt", "completion", "label", *PROVENANCE),
    "sft": ("prompt", "completion", *PROVENANCE),
}

Row = dict[str, Any]


def ranking_pairs(ranked_ids: list[str]) -> list[tuple[str, str]]:
    """Every (better, worse) pair of a ranking given best first: K(K-1)/2 of them."""
    unique = list(dict.fromkeys(ranked_ids))
    return list(combinations(unique, 2))


def kto_label(score: float, scale: str | None, threshold: float) -> bool | None:
    """KTO's label for a rating: desirable (True) when the rating, mapped to [-1, 1] by its
    scale (feedback_kinds.normalise_rating), is above threshold; undesirable (False) when below
    minus threshold; None (no row) in between, e.g. 3 of 5 stars with the default threshold 0.
    """
    value = normalise_rating(score, scale)
    if value > threshold:
        return True
    if value < -threshold:
        return False
    return None


@dataclass
class Skipped:
    """Why events gave fewer rows than they name pairs or generations: a count by reason."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1


def _provenance(event: FeedbackRecord, version: str) -> Row:
    return {"kind": event.kind, "event_id": event.event_id, "model_version": version}


def preference_rows(
    event: FeedbackRecord, generations: Mapping[str, GenerationRecord], skipped: Skipped
) -> list[Row]:
    """The {prompt, chosen, rejected} pairs of a comparison, ranking or correction."""
    if event.kind == "correction":
        original = generations.get(event.generation_ids[0])
        if original is None:
            skipped.add("generation erased or missing")
            return []
        if event.text is None or event.text == original.text:
            skipped.add("correction equal to the original")
            return []
        return [
            {
                "prompt": original.prompt,
                "chosen": event.text,
                "rejected": original.text,
                **_provenance(event, original.model_version),
            }
        ]
    if event.kind == "comparison":
        pairs = [(event.generation_ids[0], event.generation_ids[1])]
    elif event.kind == "ranking":
        pairs = ranking_pairs(event.generation_ids)
    else:
        return []
    rows = []
    for better_id, worse_id in pairs:
        better, worse = generations.get(better_id), generations.get(worse_id)
        if better is None or worse is None:
            skipped.add("generation erased or missing")
        elif better.prompt != worse.prompt:
            skipped.add("pair of different prompts")
        elif better.text == worse.text:
            skipped.add("pair of equal texts")  # no preference a trainer could learn
        else:
            rows.append(
                {
                    "prompt": better.prompt,
                    "chosen": better.text,
                    "rejected": worse.text,
                    **_provenance(event, better.model_version),
                }
            )
    return rows


def kto_rows(
    event: FeedbackRecord,
    generations: Mapping[str, GenerationRecord],
    threshold: float,
    skipped: Skipped,
) -> list[Row]:
    """The {prompt, completion, label} row of a rating (kto_label's rule), if it has one."""
    if event.kind != "rating" or event.score is None:
        return []
    rated = generations.get(event.generation_ids[0])
    if rated is None:
        skipped.add("generation erased or missing")
        return []
    label = kto_label(event.score, event.scale, threshold)
    if label is None:
        skipped.add("rating within the threshold")
        return []
    return [
        {
            "prompt": rated.prompt,
            "completion": rated.text,
            "label": label,
            **_provenance(event, rated.model_version),
        }
    ]


def sft_rows(
    event: FeedbackRecord, generations: Mapping[str, GenerationRecord], skipped: Skipped
) -> list[Row]:
    """The {prompt, completion} row of a correction: the prompt and the user's text."""
    if event.kind != "correction" or event.text is None:
        return []
    original = generations.get(event.generation_ids[0])
    if original is None:
        skipped.add("generation erased or missing")
        return []
    return [
        {
            "prompt": original.prompt,
            "completion": event.text,
            **_provenance(event, original.model_version),
        }
    ]


def rows_of(
    dataset: DatasetName,
    event: FeedbackRecord,
    generations: Mapping[str, GenerationRecord],
    *,
    kto_threshold: float,
    skipped: Skipped,
) -> list[Row]:
    """The rows of `dataset` one event gives."""
    if dataset == "preference":
        return preference_rows(event, generations, skipped)
    if dataset == "kto":
        return kto_rows(event, generations, kto_threshold, skipped)
    return sft_rows(event, generations, skipped)

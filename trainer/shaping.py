"""Declared reward shaping: named terms, each with a weight, added to every training reward.

An ML engineer states what users' feedback does not say but the product wants, e.g.
`shaping = ["length:-0.05", "keyword:0.3"]` in the trainer's TOML (or
`--shaping length:-0.05,keyword:0.3`): the reward of a training generation becomes
    r + sum_i weight_i * term_i(generation)
(potential-free, sequence-level terms on the whole phrase, as in the RLHF practice of adding a
length penalty or a format reward to the reward model's score). Terms shape what the policy is
trained on only: the gate still judges candidates by users' ratings.

The terms (each a pure function of the logged generation):
- length: the phrase's words (its output tokens but the end-of-phrase mark); a negative weight
  penalises long phrases;
- keyword: 1 when the phrase contains every keyword of its prompt (the accuracy pretraining
  reports), else 0;
- finished: 1 when the phrase ended by itself, 0 when max_tokens cut it off (a format rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from feedloop.core.store.base import GenerationRecord
from feedloop.core.tokenizer import split_words


def length_term(g: GenerationRecord) -> float:
    return float(len(g.output_ids) - (1 if g.finished else 0))


def keyword_term(g: GenerationRecord) -> float:
    keywords = split_words(g.prompt)  # split_words normalises case
    words = set(split_words(g.text))
    return 1.0 if keywords and all(k in words for k in keywords) else 0.0


def finished_term(g: GenerationRecord) -> float:
    return 1.0 if g.finished else 0.0


TERMS: dict[str, Callable[[GenerationRecord], float]] = {
    "length": length_term,
    "keyword": keyword_term,
    "finished": finished_term,
}


@dataclass(frozen=True)
class ShapingTerm:
    name: str
    weight: float


def parse_shaping(specs: Sequence[str]) -> tuple[ShapingTerm, ...]:
    """Terms from "name:weight" strings; ValueError naming the bad entry."""
    terms: list[ShapingTerm] = []
    for spec in specs:
        name, _, weight_text = spec.partition(":")
        name = name.strip()
        if name not in TERMS:
            raise ValueError(
                f"shaping: unknown term {name!r} in {spec!r} (one of {', '.join(TERMS)})"
            )
        try:
            weight = float(weight_text)  # "" (no colon) is not a number either
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"shaping: {spec!r} needs a finite weight, as in {name}:0.1")
        if any(t.name == name for t in terms):
            raise ValueError(f"shaping: term {name!r} is declared twice")
        terms.append(ShapingTerm(name, weight))
    return tuple(terms)


def shaped_rewards(
    examples: Sequence[tuple[GenerationRecord, float, float]], terms: Sequence[ShapingTerm]
) -> tuple[list[tuple[GenerationRecord, float, float]], dict[str, Any]]:
    """The examples with every term added to their rewards, and per term its weight, mean value
    and mean contribution over the examples (the round's report)."""
    if not terms or not examples:
        return list(examples), {}
    values = {t.name: [TERMS[t.name](g) for g, _, _ in examples] for t in terms}
    shaped = [
        (g, r + sum(t.weight * values[t.name][i] for t in terms), w)
        for i, (g, r, w) in enumerate(examples)
    ]
    n = len(examples)
    report = {
        t.name: {
            "weight": t.weight,
            "mean_term": sum(values[t.name]) / n,
            "mean_contribution": t.weight * sum(values[t.name]) / n,
        }
        for t in terms
    }
    return shaped, report

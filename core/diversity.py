"""Diversity of what a policy samples: the two figures that show a collapse before users do.

A policy trained on its own samples can concentrate on a few phrases users liked (issue 21: the
share of distinct phrases among served candidates fell from 0.93 to 0.61 while one taste was
learned), and then the phrases a new taste would like are never sampled, so never rated. Two
figures, computed alike by the trainer's gate (on a candidate's own samples) and the server (on
what it served):
- sampled entropy: the mean of -log p(phrase) over sampled phrases, in nats per phrase, a Monte
  Carlo estimate of the entropy of the phrase distribution (averaged over prompts);
- distinct-phrase share: distinct phrases / phrases among the samples.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Diversity:
    sampled_entropy_nats: float
    distinct_phrase_share: float
    samples: int


def diversity(texts: Sequence[str], logprobs: Sequence[float]) -> Diversity:
    """The figures of these sampled phrases, given each one's sequence log-probability."""
    if len(texts) != len(logprobs):
        raise ValueError("one log-probability per phrase")
    if not texts:
        return Diversity(float("nan"), float("nan"), 0)
    return Diversity(-sum(logprobs) / len(logprobs), len(set(texts)) / len(texts), len(texts))


class RecentDiversity:
    """The figures over the last `capacity` phrases added, updated in O(1) per phrase."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._window: deque[tuple[str, float]] = deque()
        self._counts: Counter[str] = Counter()
        self._logprob_sum = 0.0

    def add(self, text: str, logprob: float) -> None:
        if len(self._window) == self.capacity:
            old_text, old_logprob = self._window.popleft()
            self._logprob_sum -= old_logprob
            self._counts[old_text] -= 1
            if not self._counts[old_text]:
                del self._counts[old_text]
        self._window.append((text, logprob))
        self._counts[text] += 1
        self._logprob_sum += logprob

    def figures(self) -> Diversity:
        n = len(self._window)
        if not n:
            return Diversity(float("nan"), float("nan"), 0)
        return Diversity(-self._logprob_sum / n, len(self._counts) / n, n)

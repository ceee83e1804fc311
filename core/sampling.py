"""Sampling from a policy's next-token logits: temperature, top-k, top-p, and seeded draws.

Two properties matter to the rest of feedloop:
- The log-probabilities returned are those of the distribution actually sampled from (after
  temperature, top-k and top-p): that is the behaviour policy the trainer's importance ratios
  divide by. Logging the raw policy's log-probabilities instead would silently bias every ratio.
- Draws are counter-based: row r's uniform at step t is a hash of (row seed, t). A candidate's
  sample therefore depends only on its own seed, never on which other rows share its batch, and
  inverse-CDF sampling (cumsum + searchsorted) is much cheaper here than torch.multinomial.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
SEED_MASK = (1 << 64) - 1
# The smallest temperature above 0 that is sampled as asked. Logits divided by a temperature
# near 0 overflow float32 (1e-38 makes every logit +-inf, the softmax NaN, and NaN behaviour
# log-probabilities reach the store and every importance ratio). Below 0.01 the distribution is
# already greedy to float32 precision for any logit gap over about 1, so nothing is lost by
# asking for 0 (greedy) instead; vLLM bounds its temperatures at the same 0.01 for the same
# reason (vllm/sampling_params.py, _MAX_TEMP).
MIN_TEMPERATURE = 0.01


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of range; `field` names it, `problem` says what to fix."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; refuses out-of-range values when built (InvalidSamplingParams).

    Defaults are the server's defaults. The dict form (`to_dict`/`from_dict`) is what the
    generation log stores with every generation and what the trainer reads back.
    """

    temperature: float = 1.0  # 0: greedy (the most likely token at every step)
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    max_tokens: int = 16
    seed: int = 0  # the caller resolves 0 to a concrete seed before sampling

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidSamplingParams(
                "temperature", f"must be a finite number >= 0 (0: greedy), got {self.temperature}"
            )
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InvalidSamplingParams(
                "temperature",
                f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {self.temperature:g}",
            )
        if self.top_k < 0:
            raise InvalidSamplingParams("top_k", f"must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise InvalidSamplingParams("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise InvalidSamplingParams("max_tokens", f"must be >= 1, got {self.max_tokens}")

    def to_dict(self) -> dict[str, Any]:
        """The parameters as plain JSON values, keyed by field name."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Parameters from `to_dict`'s form, validated; a missing key takes its default."""
        defaults = cls().to_dict()
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in defaults:
                raise InvalidSamplingParams(name, "is not a sampling parameter")
            try:
                values[name] = type(defaults[name])(value)  # float or int, as the field
            except (TypeError, ValueError):
                raise InvalidSamplingParams(name, f"must be a number, got {value!r}") from None
        return cls(**values)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def candidate_seeds(seed: int, num_candidates: int) -> np.ndarray:
    """Independent 64-bit seeds for the candidates of one request."""
    return batch_candidate_seeds([seed], [num_candidates])


def batch_candidate_seeds(seeds: Sequence[int], counts: Sequence[int]) -> np.ndarray:
    """candidate_seeds of many requests at once, concatenated in order (one numpy pass).

    Candidate c (counted from 1) of a request with seed s gets mix(mix(s) ^ mix(c)): seeds of
    different requests and of different candidates of one request are independent.
    """
    counts_a = np.asarray(counts, dtype=np.int64)
    base = _splitmix64(np.array([s & SEED_MASK for s in seeds], dtype=np.uint64))
    starts = np.cumsum(counts_a) - counts_a
    index = np.arange(1, int(counts_a.sum()) + 1, dtype=np.int64) - np.repeat(starts, counts_a)
    return _splitmix64(np.repeat(base, counts_a) ^ _splitmix64(index.astype(np.uint64)))


def row_uniforms(row_seeds: np.ndarray, steps: int) -> torch.Tensor:
    """Uniforms in (0, 1), shape (rows, steps), a pure function of each row's seed and step."""
    with np.errstate(over="ignore"):
        counters = row_seeds[:, None] + np.arange(1, steps + 1, dtype=np.uint64)[None, :] * _GOLDEN
    bits = (_splitmix64(counters) >> np.uint64(40)).astype(np.float64)  # 24 random bits
    return torch.from_numpy(((bits + 0.5) / float(1 << 24)).astype(np.float32))


def sampling_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Probabilities of the sampling distribution, 0 for filtered tokens.

    logits (B, V); temperature, top_p (B,) float; top_k (B,) int (0 = off). Top-k keeps the k
    most likely tokens; top-p then keeps the smallest most-likely prefix whose mass reaches
    top_p (always at least one token), as in Holtzman et al. (2020). Rows at temperature 1
    without filtering (the common case) cost one softmax: no division, no sort. Rows at
    temperature 0 are greedy: a point mass on the most likely token (the first of a tie, as
    argmax gives it), which every top-k and top-p keeps.
    """
    greedy = temperature == 0
    if not bool(greedy.any()):
        return _softened_probs(logits, temperature, top_k, top_p)
    probs = _softened_probs(logits, torch.where(greedy, 1.0, temperature), top_k, top_p)
    point = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy.unsqueeze(-1), point, probs)


def _softened_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """sampling_probs for temperatures > 0."""
    scaled = logits if bool((temperature == 1).all()) else logits / temperature.unsqueeze(-1)
    needs_filter = bool((top_k > 0).any()) or bool((top_p < 1).any())
    if not needs_filter:
        return torch.softmax(scaled, dim=-1)
    vocab = scaled.shape[-1]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    positions = torch.arange(vocab).unsqueeze(0)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    remove_sorted = positions >= k.unsqueeze(-1)
    sorted_logits = sorted_logits.masked_fill(remove_sorted, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Only rows that asked for a nucleus: in float32 the cumulative sum can reach 1.0 before the
    # last tokens, and a top_p = 1 row batched with a filtered one would lose its tail.
    remove_sorted |= (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1)
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return torch.softmax(scaled.masked_fill(remove, float("-inf")), dim=-1)


def filtered_logprobs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities of the sampling distribution, -inf for filtered tokens."""
    return sampling_probs(logits, temperature, top_k, top_p).log()


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row. probs (B, V), uniforms (B,) in (0, 1)."""
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, targets).squeeze(-1)
    return tokens.clamp_(max=probs.shape[-1] - 1)

"""Sampling's seeds, uniforms and draws against their definitions, and its filters at the edges.

The seeds and uniforms are SplitMix64 (Steele, Lea and Flood 2014) as their docstrings state;
`mix` below is the reference written out in Python integers, independent of the numpy one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from feedloop.core.sampling import (
    SamplingParams,
    batch_candidate_seeds,
    candidate_seeds,
    draw,
    filtered_logprobs,
    row_uniforms,
    sampling_probs,
)

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def mix(x: int) -> int:
    """SplitMix64's output for state x: add the golden gamma, then three xor-shift-multiplies."""
    z = (x + GOLDEN) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_the_reference_mix_is_splitmix64() -> None:
    assert mix(0) == 0xE220A8397B1DCDAF  # the generator's first output from seed 0


def test_candidate_seeds_are_mix_of_mix_of_the_seed_xor_mix_of_the_candidate_number() -> None:
    seeds, counts = [7, 2**63 + 5, 12345], [2, 1, 3]
    expected = [
        mix(mix(s) ^ mix(c)) for s, n in zip(seeds, counts, strict=True) for c in range(1, n + 1)
    ]
    assert batch_candidate_seeds(seeds, counts).tolist() == expected
    assert candidate_seeds(-1, 2).tolist() == [mix(mix(MASK) ^ mix(c)) for c in (1, 2)]
    assert batch_candidate_seeds([], []).tolist() == []


def test_uniforms_are_the_top_24_bits_of_mix_of_the_seed_plus_step_golden_gammas() -> None:
    seeds = [3, MASK - 1]
    uniforms = row_uniforms(np.array(seeds, dtype=np.uint64), 4)
    assert uniforms.dtype == torch.float32
    expected = [
        [((mix((s + t * GOLDEN) & MASK) >> 40) + 0.5) / (1 << 24) for t in range(1, 5)]
        for s in seeds
    ]
    torch.testing.assert_close(uniforms, torch.tensor(expected), rtol=0, atol=1e-7)


def test_one_token_is_a_valid_max_tokens() -> None:
    assert SamplingParams(max_tokens=1).max_tokens == 1


def test_top_p_stops_at_the_first_token_whose_mass_reaches_it_exactly() -> None:
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0]])  # probabilities 1/2, 1/4, 1/4
    probs = sampling_probs(
        logits, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([0.5])
    )
    assert probs.tolist() == [[1.0, 0.0, 0.0]]


def test_top_k_among_equal_logits_keeps_the_lowest_token_ids() -> None:
    logits = torch.zeros(1, 2000)
    probs = sampling_probs(logits, torch.ones(1), torch.tensor([3]), torch.ones(1))
    assert probs.nonzero()[:, 1].tolist() == [0, 1, 2]


def test_filtered_logprobs_are_the_log_of_the_sampling_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.0, 1.5]])
    temperature, top_k, top_p = (
        torch.tensor([0.5, 1.0]),
        torch.tensor([2, 0]),
        torch.tensor([1.0, 0.9]),
    )
    logprobs = filtered_logprobs(logits, temperature, top_k, top_p)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    assert torch.equal(logprobs.isinf(), probs == 0)
    torch.testing.assert_close(logprobs.exp(), probs)
    assert logprobs[0, 2:].tolist() == [-math.inf, -math.inf]  # top-2 of the first row


def test_draw_scales_the_uniform_by_the_total_mass_of_unnormalised_weights() -> None:
    # weights 1, 1, 2: cumulative 1, 2, 4; 0.6 of 4 is 2.4, in the third token's span
    assert draw(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([0.6])).tolist() == [2]


@pytest.mark.parametrize("share", [0.1, 0.9])
def test_uniforms_cover_the_unit_interval_evenly(share: float) -> None:
    uniforms = row_uniforms(np.arange(1, 201, dtype=np.uint64), 50)
    assert float((uniforms < share).float().mean()) == pytest.approx(share, abs=0.02)

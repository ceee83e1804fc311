import json
import math

import numpy as np
import pytest
import torch

from feedloop.core.sampling import (
    MIN_TEMPERATURE,
    InvalidSamplingParams,
    SamplingParams,
    candidate_seeds,
    draw,
    row_uniforms,
    sampling_probs,
)

# Probabilities 0.5, 0.3, 0.15, 0.05 as logits.
PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def run(temperature=1.0, top_k=0, top_p=1.0):
    return sampling_probs(
        LOGITS, torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p])
    )[0]


def test_no_filter_is_the_softmax():
    assert torch.allclose(run(), PROBS[0], atol=1e-6)


def test_top_k_keeps_the_k_most_likely_renormalised():
    assert torch.allclose(run(top_k=2), torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0, 0]), atol=1e-6)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # 0.5 < 0.7, 0.5 + 0.3 = 0.8 >= 0.7: keep two tokens.
    assert torch.allclose(run(top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    # Even a tiny p keeps the most likely token.
    assert torch.allclose(run(top_p=0.01), torch.tensor([1.0, 0, 0, 0]), atol=1e-6)


def test_temperature_two_takes_the_square_root_of_probabilities():
    expected = PROBS[0].sqrt() / PROBS[0].sqrt().sum()
    assert torch.allclose(run(temperature=2.0), expected, atol=1e-6)


def test_rows_with_different_parameters_are_filtered_independently():
    logits = LOGITS.repeat(2, 1)
    out = sampling_probs(
        logits, torch.tensor([1.0, 1.0]), torch.tensor([1, 0]), torch.tensor([1.0, 1.0])
    )
    assert torch.allclose(out[0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(out[1], PROBS[0], atol=1e-6)


def test_a_top_p_one_row_keeps_every_token_and_is_the_same_alone_or_next_to_filtered_rows():
    # Peaked distributions over a vocabulary of the default policy's size: in float32 their
    # cumulative sum reaches 1.0 before the last tokens, which once cut the tail of top_p = 1
    # rows whenever a filtered row shared the batch (a tail token then had probability 0).
    generator = torch.Generator().manual_seed(0)
    vocab, rows = 1164, 400
    scale = torch.linspace(2.0, 12.0, rows).unsqueeze(1)
    logits = torch.randn(rows, vocab, generator=generator) * scale
    alone = sampling_probs(
        logits, torch.ones(rows), torch.zeros(rows, dtype=torch.long), torch.ones(rows)
    )
    filtered = torch.tensor([[0.0] * vocab])  # a top_k = 5 row, then a top_p = 0.9 row
    mixed = sampling_probs(
        torch.cat([filtered, filtered, logits]),
        torch.ones(rows + 2),
        torch.tensor([5, 0] + [0] * rows),
        torch.tensor([1.0, 0.9] + [1.0] * rows),
    )[2:]
    assert bool(((mixed > 0) == (logits.softmax(-1) > 0)).all())
    assert torch.equal(mixed, alone)


@pytest.mark.parametrize(
    ("u", "token"), [(0.1, 0), (0.49, 0), (0.51, 1), (0.79, 1), (0.81, 2), (0.99, 3)]
)
def test_draw_is_the_inverse_cdf(u, token):
    assert draw(LOGITS.softmax(-1), torch.tensor([u])).item() == token


def test_draw_never_picks_a_filtered_token():
    probs = sampling_probs(LOGITS, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([1.0]))
    picks = {draw(probs, torch.tensor([u])).item() for u in np.linspace(0.001, 0.999, 200)}
    assert picks == {0, 1}


def test_uniforms_are_a_function_of_seed_and_step_only():
    seeds = candidate_seeds(42, 3)
    a = row_uniforms(seeds, 10)
    b = row_uniforms(seeds[1:2], 5)
    assert torch.equal(a[1, :5], b[0])
    assert bool(((a > 0) & (a < 1)).all())
    assert not torch.equal(a[0], a[1])
    assert not np.array_equal(candidate_seeds(43, 3), seeds)


def test_uniforms_look_uniform():
    u = row_uniforms(candidate_seeds(1, 2000), 50).flatten()
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.005


INVALID = [
    ("temperature", {"temperature": -0.5}),  # 0 is valid: greedy
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": math.inf}),
    # Above 0 and below MIN_TEMPERATURE: float32 logits overflow (1e-38 stored NaN log-probs).
    ("temperature", {"temperature": 1e-38}),
    ("temperature", {"temperature": 0.0099}),
    ("top_k", {"top_k": -1}),
    ("top_p", {"top_p": 0}),
    ("top_p", {"top_p": 1.5}),
    ("top_p", {"top_p": math.nan}),
    ("max_tokens", {"max_tokens": 0}),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[str(k) for _, k in INVALID])
def test_invalid_parameters_are_refused(field, kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[str(k) for _, k in INVALID])
def test_a_refusal_names_the_field_and_the_value(field, kwargs):
    with pytest.raises(InvalidSamplingParams) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: must be ")
    assert str(err.value).endswith(f"got {kwargs[field]}")


def test_zero_and_the_temperature_bound_itself_are_accepted():
    assert SamplingParams(temperature=0.0).temperature == 0.0
    assert SamplingParams(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE == 0.01


def test_the_dict_form_round_trips_through_json():
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=12, seed=2**62 + 3)
    as_dict = params.to_dict()
    assert as_dict == {
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.9,
        "max_tokens": 12,
        "seed": 2**62 + 3,
    }
    assert SamplingParams.from_dict(json.loads(json.dumps(as_dict))) == params


def test_the_dict_form_takes_defaults_for_missing_keys_and_numbers_of_either_kind():
    assert SamplingParams.from_dict({}) == SamplingParams()
    restored = SamplingParams.from_dict({"temperature": 2, "top_k": 5.0})
    assert restored == SamplingParams(temperature=2.0, top_k=5)
    assert isinstance(restored.temperature, float) and isinstance(restored.top_k, int)


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        ({"top_p": 2.0}, "top_p", "must be in (0, 1], got 2.0"),
        ({"max_tokens": "many"}, "max_tokens", "must be a number, got 'many'"),
        ({"temperature": None}, "temperature", "must be a number, got None"),
        ({"repetition_penalty": 1.1}, "repetition_penalty", "is not a sampling parameter"),
    ],
)
def test_the_dict_form_is_validated_and_a_refusal_names_the_key(data, field, problem):
    with pytest.raises(InvalidSamplingParams) as err:
        SamplingParams.from_dict(data)
    assert (err.value.field, err.value.problem) == (field, problem)
    assert str(err.value) == f"{field}: {problem}"

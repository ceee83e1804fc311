"""Decoding knobs at the policy: temperature 0 is greedy, max_tokens leaves <eos> uncounted.

Both are what the proto documents for SamplingParams; the server's tests check that they reach
the wire (tests/test_server_decoding.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.policy import SampleRequest, TokenBatch
from feedloop.core.sampling import SamplingParams, sampling_probs
from feedloop.core.tokenizer import EOS_ID, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def policy(tiny_checkpoint: Path):
    return load_checkpoint(tiny_checkpoint)[0]


def test_temperature_zero_is_a_point_mass_on_the_argmax_beside_rows_that_sample() -> None:
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [0.1, 2.0, 2.0, -1.0]])
    probs = sampling_probs(
        logits, torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0])
    )
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]  # a tie goes to the lowest token id
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], dim=-1))


def test_temperature_zero_decodes_greedily_whatever_the_seed(policy) -> None:
    prompt = policy.encode_prompt("ocean sunrise")
    params = [SamplingParams(temperature=0.0, max_tokens=12, seed=seed) for seed in (1, 2, 3)]
    outs = policy.sample([SampleRequest(prompt, p, 2) for p in params])
    samples = [o for out in outs for o in out]
    assert all(o.token_ids == samples[0].token_ids for o in samples)
    greedy = samples[0]
    assert greedy.behaviour_logprobs == [0.0] * len(greedy.token_ids)
    # Each token is the raw policy's most likely one given the tokens before it.
    batch = TokenBatch.from_lists([prompt], [greedy.token_ids])
    logits = policy.teacher_forced(batch).logits[0, : len(greedy.token_ids)]
    assert logits.argmax(dim=-1).tolist() == greedy.token_ids


def coin_policy(policy, word: str):
    """A copy of policy whose every step is a fair coin between `word` and <eos>."""
    coin = copy.deepcopy(policy)
    word_id = coin.tokenizer.id_of(word)
    assert word_id >= len(SPECIAL_TOKENS)
    with torch.no_grad():
        coin.output.weight.zero_()
        coin.output.bias.fill_(-1e4)
        coin.output.bias[word_id] = 0.0
        coin.output.bias[EOS_ID] = 0.0
    return coin, word_id


def test_max_tokens_does_not_count_the_end_of_phrase(policy) -> None:
    coin, word = coin_policy(policy, "ocean")
    requests = [SampleRequest(coin.encode_prompt("sea"), SamplingParams(max_tokens=2, seed=7), 64)]
    samples = coin.sample(requests)[0]
    assert all(len(s.phrase_ids) <= 2 for s in samples)
    assert all(len(s.behaviour_logprobs) == len(s.token_ids) for s in samples)
    outcomes = {tuple(s.token_ids) for s in samples}
    # Two phrase tokens and then the end-of-phrase: possible only if <eos> is not counted.
    assert (word, word, EOS_ID) in outcomes
    assert (word, word) in outcomes  # cut at max_tokens: not finished
    for s in samples:
        assert s.finished == (s.token_ids[-1] == EOS_ID)
        assert s.behaviour_logprobs == pytest.approx([-0.6931] * len(s.token_ids), abs=1e-3)


def test_max_tokens_one_allows_one_word_then_the_end_of_phrase(policy) -> None:
    coin, word = coin_policy(policy, "ocean")
    samples = coin.sample(
        [SampleRequest(coin.encode_prompt("sea"), SamplingParams(max_tokens=1, seed=3), 64)]
    )[0]
    assert {tuple(s.token_ids) for s in samples} == {(EOS_ID,), (word, EOS_ID), (word,)}

"""The gate's estimates on policies whose distributions are known by construction.

A GRU policy whose output layer has zero weights emits softmax(bias) at every step, whatever the
prompt: with a zero bias it is uniform over the vocabulary, with a bias of 0 on two tokens and
-1e4 on the rest it writes each of the two with probability 1/2. That makes the KL to the
reference and the off-policy values computable by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch

from feedloop.core.corpus import load_phrases
from feedloop.core.gru import GRUConfig, GRUPolicy
from feedloop.core.policy import SampleRequest
from feedloop.core.sampling import SamplingParams
from feedloop.core.store.base import SERVED_EXPLORATION, GenerationRecord
from feedloop.core.tokenizer import EOS_ID, Tokenizer
from feedloop.trainer.gate import (
    kl_to_reference,
    off_policy_values,
    served_logprobs,
    target_params,
)
from feedloop.trainer.reward_model import Calibration, FittedRewardModel, RewardModel

TOKENIZER = Tokenizer.build(load_phrases())
PROMPTS = ["sun", "quiet rain", "little lamp", "warm morning", "old river", "green hill"]


def policy(seed: int = 0) -> GRUPolicy:
    torch.manual_seed(seed)
    config = GRUConfig(TOKENIZER.vocab_size, embedding_dim=8, hidden_dim=16, value_hidden_dim=8)
    return GRUPolicy(config, TOKENIZER).eval()


def emitting(probabilities: dict[int, float], others: float = -1e4) -> GRUPolicy:
    """A policy that writes each given token with its probability at every step.

    Every other token gets logit `others`: -1e4 is probability 0 in float32; -30 is as good as
    0 for sampling but keeps log-ratios to the reference finite on padding.
    """
    fixed = policy()
    with torch.no_grad():
        fixed.output.weight.zero_()
        fixed.output.bias.fill_(others)
        for token, p in probabilities.items():
            fixed.output.bias[token] = math.log(p)
    return fixed


def uniform() -> GRUPolicy:
    flat = policy()
    with torch.no_grad():
        flat.output.weight.zero_()
        flat.output.bias.zero_()
    return flat


def records(source: GRUPolicy, params: Sequence[SamplingParams]) -> list[GenerationRecord]:
    """What the server logs for one sample per prompt, each request alone in its batch."""
    out = []
    for i, p in enumerate(params):
        prompt = PROMPTS[i % len(PROMPTS)]
        [[sample]] = source.sample([SampleRequest(source.encode_prompt(prompt), p)])
        out.append(
            GenerationRecord(
                generation_id=f"g{i}",
                request_id=f"r{i}",
                prompt=prompt,
                prompt_ids=source.encode_prompt(prompt),
                output_ids=list(sample.token_ids),
                behaviour_logprobs=list(sample.behaviour_logprobs),
                policy_logprobs=list(sample.policy_logprobs),
                finished=sample.finished,
                text=source.decode(sample.token_ids),
                sampling={
                    "temperature": p.temperature,
                    "top_k": p.top_k,
                    "top_p": p.top_p,
                    "max_tokens": p.max_tokens,
                    "seed": p.seed,
                },
                model_version="v0001",
                client_id="app",
                created_at=0.0,
            )
        )
    return out


def constant_reward_model(empty_phrase_score: float) -> FittedRewardModel:
    """Scores an empty phrase `empty_phrase_score` and every other phrase 0 (tanh-calibrated)."""
    model = RewardModel(TOKENIZER)
    with torch.no_grad():
        model.length.weight[0, 0] = empty_phrase_score
    return FittedRewardModel(model.eval(), Calibration(1.0, 0.0, 0), 0, 0, float("nan"), 0.0, {})


def test_the_gate_measures_kl_of_the_candidate_to_the_reference_on_its_own_samples() -> None:
    # The candidate writes "warm" or <eos> with probability 1/2 each; the reference is uniform
    # over V tokens. Per token, with r = ref / pi = 2 / V: k1 = log(V / 2) and
    # k3 = (r - 1) - log r = 2 / V - 1 + log(V / 2). A phrase sums its tokens.
    warm = TOKENIZER.id_of("warm")
    candidate, reference = emitting({warm: 0.5, EOS_ID: 0.5}, others=-30.0), uniform()
    kl = kl_to_reference(candidate, reference, PROMPTS * 4, seed=0)
    v = TOKENIZER.vocab_size
    length = kl["mean_length_tokens"]
    assert 1.0 < length < 16.0  # phrases of several lengths were sampled
    assert kl["kl_k1"] == pytest.approx(length * math.log(v / 2), rel=1e-5)
    assert kl["kl_k3"] == pytest.approx(length * (2 / v - 1 + math.log(v / 2)), rel=1e-5)


def test_records_served_with_different_sampling_parameters_each_get_their_own() -> None:
    served = policy(seed=1)
    params = [
        SamplingParams(temperature=0.5, max_tokens=6, seed=1),
        SamplingParams(top_k=3, max_tokens=4, seed=2),
        SamplingParams(max_tokens=8, seed=3),
        SamplingParams(temperature=1.5, top_p=0.5, max_tokens=5, seed=4),
        SamplingParams(temperature=2.0, top_k=40, max_tokens=7, seed=5),
    ]
    logged = records(served, params)
    assert len({len(r.output_ids) for r in logged}) > 1  # padded to different lengths
    expected = [sum(r.behaviour_logprobs) for r in logged]
    assert served_logprobs(served, logged).tolist() == pytest.approx(expected, abs=1e-4)


def test_a_candidate_that_never_writes_what_was_logged_is_valued_by_the_reward_model() -> None:
    # The candidate only ever writes the empty phrase (<eos> first), which no logged record is:
    # every importance weight is 0, so SNIPS has nothing to say and doubly robust is the direct
    # method: the reward model's tanh(0.5) for the empty phrase, for every prompt, exactly.
    logged = records(policy(seed=2), [SamplingParams(max_tokens=6, seed=s) for s in range(1, 9)])
    assert all(r.output_ids[0] != EOS_ID for r in logged)
    rewards = torch.linspace(-1, 1, len(logged), dtype=torch.float64)
    values = off_policy_values(
        emitting({EOS_ID: 1.0}),
        logged,
        rewards,
        constant_reward_model(0.5),
        weight_max=20.0,
        seed=0,
    )
    assert math.isnan(values["snips"]["value"])
    assert values["ess"] == 0.0
    assert values["dm"] == pytest.approx(math.tanh(0.5))
    assert values["dr"] == pytest.approx(
        {"value": math.tanh(0.5), "ci_low": math.tanh(0.5), "ci_high": math.tanh(0.5), "n": 8}
    )


def test_doubly_robust_adds_the_weighted_residuals_of_the_logged_rewards() -> None:
    # Target = behaviour (every weight 1) and a reward model that scores every phrase 0:
    # DR = DM + mean(1 * (r - 0)) = 0 + mean(r), with the interval of the terms r.
    served = policy(seed=3)
    logged = records(served, [SamplingParams(max_tokens=6, seed=s) for s in range(1, 9)])
    rewards = torch.tensor([1.0, 0.0, 0.5, -0.5, 1.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    values = off_policy_values(
        served, logged, rewards, constant_reward_model(0.0), weight_max=20.0, seed=0
    )
    assert values["dm"] == 0.0
    assert values["dr"]["value"] == pytest.approx(0.25, abs=1e-5)  # 2 / 8
    assert values["snips"]["value"] == pytest.approx(0.25, abs=1e-5)
    assert values["ess"] == pytest.approx(8.0, abs=1e-3)
    # stderr = sample sd of the terms / sqrt(n)
    stderr = float(rewards.std(unbiased=True)) / math.sqrt(8)
    assert values["dr"]["ci_high"] - values["dr"]["value"] == pytest.approx(1.96 * stderr, rel=1e-3)


def test_an_explored_record_is_valued_as_the_target_serves_by_default() -> None:
    # The server sampled it at its exploration parameters (the behaviour); the request itself
    # left sampling to the server, so the target policy would have served it at the defaults.
    served = policy(seed=1)
    explored = SamplingParams(temperature=2.5, top_k=5, top_p=0.9, max_tokens=6, seed=7)
    [record] = records(served, [explored])
    record = replace(record, served_as=SERVED_EXPLORATION)
    assert target_params(record) == SamplingParams(max_tokens=6, seed=7)
    scored_default = replace(
        record, served_as="live", sampling=SamplingParams(max_tokens=6, seed=7).to_dict()
    )
    assert served_logprobs(served, [record]).tolist() == pytest.approx(
        served_logprobs(served, [scored_default]).tolist(), abs=1e-6
    )
    assert sum(record.behaviour_logprobs) != pytest.approx(
        served_logprobs(served, [record]).item(), abs=1e-3
    )
    live = replace(record, served_as="live")
    assert target_params(live) == explored

"""The Hugging Face causal-LM policy behind the policy interface (core/hf_policy.py).

A tiny GPT-2 built here (conftest's hf_checkpoint, random weights): batched KV-cache sampling
that gives a candidate the same sample alone or in any batch, behaviour log-probabilities equal
to the trainer's teacher-forced recompute, rows leaving at <eos> or their max_tokens, and
checkpoints that round-trip through `load_checkpoint`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from feedloop.core.checkpoint import ARCHITECTURES, load_checkpoint, save_checkpoint
from feedloop.core.hf_policy import HFCausalPolicy, left_aligned
from feedloop.core.policy import SampleRequest, TokenBatch
from feedloop.core.sampling import SamplingParams
from feedloop.core.tokenizer import EOS_ID

PROMPTS = ["ocean", "fresh morning coffee", "garden", "quiet winter night walk"]
# Float rounding between a cached step and one teacher-forced pass, per token.
EXACT = 1e-5


@pytest.fixture(scope="module")
def policy(hf_checkpoint: Path) -> HFCausalPolicy:
    loaded = load_checkpoint(hf_checkpoint)[0]
    assert isinstance(loaded, HFCausalPolicy)
    return loaded


def request(policy, prompt, seed, n=1, **kw):
    params = SamplingParams(seed=seed, **{"max_tokens": 12, **kw})
    return SampleRequest(policy.encode_prompt(prompt), params, n)


MIXED = [
    dict(prompt=PROMPTS[0], seed=11, n=2),
    dict(prompt=PROMPTS[1], seed=12, temperature=0.7, top_k=20),
    dict(prompt=PROMPTS[2], seed=13, top_p=0.9, max_tokens=5),
    dict(prompt=PROMPTS[3], seed=14, n=3, temperature=1.3),
    dict(prompt=PROMPTS[0], seed=15, temperature=0.0),
]


def mixed_requests(policy):
    return [request(policy, **kw) for kw in MIXED]


def test_the_architecture_is_registered_and_its_checkpoint_round_trips(policy, tmp_path):
    assert "hf-causal-lm" in ARCHITECTURES
    manifest = save_checkpoint(policy, tmp_path / "copy")
    assert {"config.json", "model.safetensors", "tokenizer.json", "value_head.safetensors"} <= set(
        manifest.files
    )
    assert not [n for n in manifest.files if n.endswith((".bin", ".pt", ".pkl"))]
    again, read = load_checkpoint(tmp_path / "copy")
    assert read.hyperparameters["prompt_template"] == "keywords: {keywords} =>"
    reqs = mixed_requests(policy)
    assert [[o.token_ids for o in outs] for outs in again.sample(reqs)] == [
        [o.token_ids for o in outs] for outs in policy.sample(reqs)
    ]
    batch = TokenBatch.from_lists([policy.encode_prompt("ocean")], [[7, 8, EOS_ID]])
    assert torch.equal(again.teacher_forced(batch).values, policy.teacher_forced(batch).values)


def test_the_prompt_template_declared_in_the_checkpoint_wraps_the_keywords(policy):
    text = policy.tokenizer.compiled.decode(
        [i - policy.tokenizer.offset for i in policy.encode_prompt("ocean")]
    )
    assert text.strip() == "keywords: ocean =>"


def test_a_candidate_gets_the_same_sample_alone_or_in_any_batch(policy):
    reqs = mixed_requests(policy)
    together = policy.sample(reqs)
    reversed_batch = policy.sample(list(reversed(reqs)))[::-1]
    for i, req in enumerate(reqs):
        alone = policy.sample([req])[0]
        for a, b, c in zip(alone, together[i], reversed_batch[i], strict=True):
            assert a.token_ids == b.token_ids == c.token_ids
            assert a.finished == b.finished
            for x, y in ((a, b), (a, c)):
                gap = max(
                    (
                        abs(p - q)
                        for p, q in zip(x.behaviour_logprobs, y.behaviour_logprobs, strict=True)
                    ),
                    default=0.0,
                )
                assert gap < EXACT
    # different seeds of one request differ (the draws are not shared)
    assert together[0][0].token_ids != together[0][1].token_ids


def test_behaviour_logprobs_equal_the_trainers_recompute_within_1e_5_per_token(policy):
    reqs = mixed_requests(policy)
    outs = policy.sample(reqs)
    prompts = [r.prompt_ids for r in reqs for _ in range(r.num_candidates)]
    params = [r.params for r in reqs for _ in range(r.num_candidates)]
    flat = [o for row in outs for o in row]
    behaviour = policy.score(prompts, [o.token_ids for o in flat], params)
    raw = policy.score(prompts, [o.token_ids for o in flat])
    for o, b, r in zip(flat, behaviour, raw, strict=True):
        assert len(b) == len(o.token_ids)
        assert max(abs(x - y) for x, y in zip(o.behaviour_logprobs, b, strict=True)) < EXACT
        assert max(abs(x - y) for x, y in zip(o.policy_logprobs, r, strict=True)) < EXACT
    # greedy rows log 0: a point mass
    assert all(lp == 0.0 for lp in outs[4][0].behaviour_logprobs)
    # a request alone (no left padding: the model gets no attention mask) is exact too
    for req in reqs:
        for out in policy.sample([req])[0]:
            again = policy.score([req.prompt_ids], [out.token_ids], [req.params])[0]
            assert (
                max(abs(x - y) for x, y in zip(out.behaviour_logprobs, again, strict=True)) < EXACT
            )


def test_rows_end_at_eos_or_one_step_past_max_tokens(policy):
    outs = policy.sample([request(policy, p, s, n=4, max_tokens=3) for s, p in enumerate(PROMPTS)])
    for row in outs:
        for o in row:
            assert len(o.token_ids) <= 4
            assert o.finished == (o.token_ids[-1:] == [EOS_ID])
            assert EOS_ID not in o.phrase_ids
            if not o.finished:
                assert len(o.token_ids) == 3


def test_rows_leaving_the_batch_do_not_change_the_rows_that_stay(policy):
    """A batch where most rows stop after one token samples the long row as it would alone."""
    long_row = request(policy, "garden", 21, max_tokens=14)
    short = [request(policy, p, 30 + i, n=3, max_tokens=1) for i, p in enumerate(PROMPTS)]
    mixed = policy.sample([*short, long_row])[-1][0]
    alone = policy.sample([long_row])[0][0]
    assert mixed.token_ids == alone.token_ids
    assert len(alone.token_ids) > 2


def test_values_come_from_the_value_head_per_position_and_are_differentiable(policy):
    trainee = copy.deepcopy(policy)
    batch = TokenBatch.from_lists(
        [trainee.encode_prompt("ocean"), trainee.encode_prompt("morning coffee")],
        [[7, 8, EOS_ID], [9, EOS_ID]],
    )
    out = trainee.teacher_forced(batch)
    assert out.values.shape == (2, 3)
    assert out.logits.shape == (2, 3, trainee.tokenizer.vocab_size)
    out.values.sum().backward()
    assert trainee.value_head[0].weight.grad is not None
    # padding is invisible: a row's values are the same alone
    alone = trainee.teacher_forced(
        TokenBatch.from_lists([trainee.encode_prompt("morning coffee")], [[9, EOS_ID]])
    )
    assert torch.allclose(alone.values[0], out.values[1, :2], atol=EXACT)


def test_left_alignment_moves_each_prompt_to_the_right_edge():
    ids = torch.tensor([[5, 6, 7], [8, 0, 0]])
    aligned, mask = left_aligned(ids, torch.tensor([3, 1]))
    assert aligned.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_a_row_running_past_the_models_positions_is_refused_by_name_and_one_ending_before_is_not(
    policy,
):
    """Sampling checks positions only when its cheap bound reaches the model's limit (160 in
    the fixture): a greedy row that never draws <eos> gets a ValueError naming both lengths, not
    an IndexError deep in torch; a row whose max_tokens could overflow but that ends sooner is
    served."""
    with pytest.raises(ValueError, match="longer than the model's 160 positions"):
        policy.sample([request(policy, "ocean", 3, temperature=0.0, max_tokens=300)])
    ended = policy.sample([request(policy, "ocean", 3, max_tokens=300)])[0][0]
    assert ended.finished
    assert len(policy.encode_prompt("ocean")) + len(ended.token_ids) < 160

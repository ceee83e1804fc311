"""How well a policy models phrases: the figures pretraining and the trainer's gate both report.

- perplexity: per token, of held-out phrases given their prompts (fluency);
- keyword inclusion: the share of phrases sampled for a prompt that contain every one of its
  keywords (the task's accuracy: a prompt is keywords, a good phrase uses them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from feedloop.core.policy import Policy, SampleRequest, TokenBatch, token_logprobs
from feedloop.core.sampling import SamplingParams
from feedloop.core.tokenizer import EOS_ID, split_words


@torch.no_grad()
def perplexity(policy: Policy, pairs: Sequence[tuple[str, str]], batch_size: int = 512) -> float:
    """Per-token perplexity of phrases given their prompts (<eos> counted as a token).

    Measured with dropout off; the policy is left in the mode it came in (pretraining calls
    this between epochs).
    """
    was_training = policy.training
    policy.eval()
    total, tokens = 0.0, 0
    try:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            prompts = [policy.encode_prompt(p) for p, _ in chunk]
            outputs = [[*policy.tokenizer.encode(t), EOS_ID] for _, t in chunk]
            batch = TokenBatch.from_lists(prompts, outputs)
            logprobs = token_logprobs(policy.teacher_forced(batch).logits, batch.output_ids)
            total -= float((logprobs * batch.output_mask).sum())
            tokens += int(batch.output_mask.sum())
    finally:
        policy.train(was_training)
    return math.exp(total / max(tokens, 1))


def contains_keywords(prompt: str, phrase: str) -> bool:
    """Whether the phrase contains every keyword (word) of the prompt, as whole words."""
    words = set(split_words(phrase))
    return all(k in words for k in split_words(prompt))


@torch.no_grad()
def keyword_inclusion(
    policy: Policy, prompts: Sequence[str], *, seed: int, temperature: float = 1.0
) -> float:
    """Share of phrases sampled at `temperature` (one per prompt, seeded by prompt index)
    containing every keyword of their prompt."""
    requests = [
        SampleRequest(
            policy.encode_prompt(p),
            SamplingParams(temperature=temperature, max_tokens=16, seed=seed + i),
        )
        for i, p in enumerate(prompts)
    ]
    hits = sum(
        contains_keywords(prompt, policy.decode(outs[0].token_ids))
        for prompt, outs in zip(prompts, policy.sample(requests), strict=True)
    )
    return hits / max(len(prompts), 1)

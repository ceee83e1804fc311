"""How well a policy models phrases: the figures pretraining and the trainer's gate both report."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from feedloop.core.policy import Policy, TokenBatch, token_logprobs
from feedloop.core.tokenizer import EOS_ID


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

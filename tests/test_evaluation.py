"""Keyword inclusion, the task's accuracy that pretraining and the gate both report."""

from __future__ import annotations

from pathlib import Path

from trainer_support import TRAIN_PROMPTS, one_torch_thread

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.evaluation import contains_keywords, keyword_inclusion
from feedloop.core.policy import SampleRequest
from feedloop.core.sampling import SamplingParams

__all__ = ["one_torch_thread"]


def test_a_phrase_contains_the_keywords_only_if_it_has_every_one_as_a_whole_word() -> None:
    assert contains_keywords("good", "a good day")
    assert contains_keywords("good day", "a good day")
    assert contains_keywords("day good", "a good day")  # order is free
    assert not contains_keywords("good night", "a good day")  # one of two is not enough
    assert not contains_keywords("go", "a good day")  # a prefix is not the word
    assert contains_keywords("Good", "a good day")  # words as the tokenizer splits them
    assert contains_keywords("", "anything")  # no keyword asked, none missing


def test_keyword_inclusion_is_the_share_of_seeded_samples_that_contain_their_keywords(
    tiny_checkpoint: Path,
) -> None:
    policy, _ = load_checkpoint(tiny_checkpoint)
    prompts = TRAIN_PROMPTS[:40]
    outs = policy.sample(
        [
            SampleRequest(policy.encode_prompt(p), SamplingParams(max_tokens=16, seed=7 + i))
            for i, p in enumerate(prompts)
        ]
    )
    hits = [
        contains_keywords(p, policy.decode(o[0].token_ids))
        for p, o in zip(prompts, outs, strict=True)
    ]
    assert 0 < sum(hits) < len(hits)  # neither extreme: the figure is a real share
    assert keyword_inclusion(policy, prompts, seed=7) == sum(hits) / len(hits)
    assert keyword_inclusion(policy, [], seed=7) == 0.0

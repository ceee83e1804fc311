"""The Generate reply: served samples in the wire form the caller receives.

Built on the model worker's reader thread (off the event loop) once the model process has
answered, beside the generation records of the same samples (GenerationRecord.from_samples).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from feedloop.core.policy import SampledOutput
from feedloop.core.tokenizer import Tokenizer
from feedloop.v1 import feedloop_pb2 as pb


def new_generation_ids(count: int) -> list[str]:
    """count fresh generation ids of 128 random bits each, from one system call."""
    random_hex = os.urandom(16 * count).hex()
    return [random_hex[32 * i : 32 * i + 32] for i in range(count)]


def generate_reply(
    request_id: str,
    model_version: str,
    served_as: str,
    seed: int,
    samples: Sequence[SampledOutput],
    *,
    generation_ids: Sequence[str],
    texts: Sequence[str],
    tokenizer: Tokenizer,
    token_logprobs: bool = False,
    reply_id: str = "",
) -> pb.GenerateResponse:
    """One request's reply; a candidate's log_prob is under the distribution sampled from, and
    so are its token_logprobs (one per phrase token, <eos> left out) when asked for."""
    return pb.GenerateResponse(
        request_id=request_id,
        model_version=model_version,
        candidates=[
            pb.Candidate(
                generation_id=generation_id,
                text=text,
                tokens=tokenizer.token_strings(sample.phrase_ids),
                log_prob=sum(sample.behaviour_logprobs),
                finished=sample.finished,
                token_logprobs=(
                    sample.behaviour_logprobs[: len(sample.phrase_ids)] if token_logprobs else ()
                ),
            )
            for sample, generation_id, text in zip(samples, generation_ids, texts, strict=True)
        ],
        seed=seed,
        served_as=served_as,
        reply_id=reply_id,
    )

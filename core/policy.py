"""The policy interface: the one surface through which the server and trainer use a model.

A policy maps a prompt to a distribution over phrases. The server only samples; the trainer
samples, scores logged outputs and differentiates through teacher-forced passes. Another
architecture is added by implementing this class and naming it in `checkpoint.ARCHITECTURES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from feedloop.core import sampling
from feedloop.core.sampling import SamplingParams
from feedloop.core.tokenizer import PAD_ID, UNK_ID, Tokenizer


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to sample num_candidates outputs for, with its own sampling parameters."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    num_candidates: int = 1


@dataclass(frozen=True)
class SampledOutput:
    """One sampled phrase.

    token_ids include the final <eos> when `finished`; behaviour_logprobs and policy_logprobs
    have one entry per token id: the first under the distribution sampled from (after
    temperature/top-k/top-p), the second under the raw policy (temperature 1, no filtering).
    """

    token_ids: list[int]
    behaviour_logprobs: list[float]
    policy_logprobs: list[float]
    finished: bool

    @property
    def phrase_ids(self) -> list[int]:
        """The output without its <eos>."""
        return self.token_ids[:-1] if self.finished else self.token_ids


@dataclass(frozen=True)
class TokenBatch:
    """Padded prompts and outputs for teacher-forced passes.

    prompt_ids (B, S) and output_ids (B, T) are right-padded with <pad>; output_ids include
    <eos> where the phrase finished. Lengths are the unpadded lengths.
    """

    prompt_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    output_ids: torch.Tensor
    output_lengths: torch.Tensor

    @property
    def output_mask(self) -> torch.Tensor:
        """(B, T) float mask: 1 where output_ids holds a real token."""
        steps = torch.arange(self.output_ids.shape[1]).unsqueeze(0)
        return (steps < self.output_lengths.unsqueeze(1)).float()

    @classmethod
    def from_lists(
        cls, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
    ) -> TokenBatch:
        prompt_ids, prompt_lengths = pad([nonempty_prompt(p) for p in prompts])
        output_ids, output_lengths = pad(outputs, min_length=1)
        return cls(prompt_ids, prompt_lengths, output_ids, output_lengths)


@dataclass(frozen=True)
class PolicyOutput:
    """Teacher-forced pass: logits (B, T, V) for each output position and values (B, T).

    values[b, t] estimates the return from the state before output token t is chosen.
    """

    logits: torch.Tensor
    values: torch.Tensor


def nonempty_prompt(prompt_ids: Sequence[int]) -> list[int]:
    """A prompt with no known token is encoded as a single <unk> (encoders need one step)."""
    return list(prompt_ids) if len(prompt_ids) else [UNK_ID]


def pad(seqs: Sequence[Sequence[int]], *, min_length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id sequences into one (rows, width) tensor, and their lengths."""
    lengths = [len(s) for s in seqs]
    width = max([min_length, *lengths])
    rows = [[*s, *([PAD_ID] * (width - n))] for s, n in zip(seqs, lengths, strict=True)]
    if not rows:
        return torch.empty((0, width), dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)


class Policy(ABC, torch.nn.Module):
    """A generative policy with a value head. Subclasses are torch modules."""

    architecture: str = ""
    tokenizer: Tokenizer

    @abstractmethod
    def hyperparameters(self) -> dict[str, Any]:
        """Everything needed, with the tokenizer, to rebuild this architecture."""

    @abstractmethod
    def sample(self, requests: Sequence[SampleRequest]) -> list[list[SampledOutput]]:
        """Sample num_candidates outputs per request, in one batched pass, without gradients.

        Each candidate's draw depends only on its request's seed and its candidate index, so a
        request gives the same sample alone or inside any batch.
        """

    @abstractmethod
    def teacher_forced(self, batch: TokenBatch) -> PolicyOutput:
        """Differentiable logits and values for given outputs (for training)."""

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
        params: Sequence[SamplingParams] | None = None,
    ) -> list[list[float]]:
        """Per-token log-probabilities of given outputs under the raw policy (no filtering).

        params (one per output): under the distribution each output was sampled from instead
        (its temperature, top-k and top-p), the counterpart of the behaviour log-probabilities
        logged at sampling, so that the two make exact importance ratios; -inf for a token
        that this policy's filters would have removed.
        """
        batch = TokenBatch.from_lists(prompts, outputs)
        logits = self.teacher_forced(batch).logits
        if params is None:
            logprobs = token_logprobs(logits, batch.output_ids)
        else:
            chosen = batch.output_ids.unsqueeze(-1)
            logprobs = sampled_logprobs(logits, params).gather(-1, chosen).squeeze(-1)
        return [logprobs[i, : len(o)].tolist() for i, o in enumerate(outputs)]

    def encode_prompt(self, prompt: str) -> list[int]:
        return nonempty_prompt(self.tokenizer.encode_prompt(prompt))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sampled_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Log-probabilities (B, T, V) of the distribution each row was sampled from, given its
    logits (B, T, V) and its sampling parameters (B of them); -inf for filtered tokens."""
    b, t, v = logits.shape

    def per_position(values: list[float] | list[int]) -> torch.Tensor:
        return torch.tensor(values).repeat_interleave(t)

    logprobs = sampling.filtered_logprobs(
        logits.reshape(b * t, v),
        per_position([p.temperature for p in params]),
        per_position([p.top_k for p in params]),
        per_position([p.top_p for p in params]),
    )
    return logprobs.reshape(b, t, v)


def draw_step(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
    unfiltered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding step of every running row, for every policy: (token drawn, its behaviour
    log-probability under the tempered and filtered distribution it was drawn from, its raw
    log-probability under the untempered policy). One owner, so every architecture logs the
    exact propensities the trainer's importance ratios divide by."""
    probs = sampling.sampling_probs(logits, temperature, top_k, top_p)
    token = sampling.draw(probs, uniforms)
    chosen = token.unsqueeze(1)
    behaviour = probs.gather(1, chosen).squeeze(1).log()
    if unfiltered:  # temperature 1, no filter: the two distributions are the same
        return token, behaviour, behaviour
    raw = (logits.gather(1, chosen) - logits.logsumexp(-1, keepdim=True)).squeeze(1)
    return token, behaviour, raw


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_ids[b, t]) from logits (B, T, V): shape (B, T)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)

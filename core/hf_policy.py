"""A policy over any Hugging Face causal language model, with a value head beside it.

    prompt text = template with the keywords  ─▶ the model's tokens (left-padded in a batch)
    [prompt ; output] ─▶ AutoModelForCausalLM ─┬─▶ logits over the model's vocabulary
                                               └─▶ last hidden states ─▶ value head ─▶ V(s_t)

The same interface as the GRU (core/policy.py): sampling is batched with a KV cache
(`past_key_values`): the prompts are read in one pass, every candidate then costs one token per
step, and a row that draws `<eos>` or reaches its max_tokens leaves the batch (its cache rows
go with it). Every candidate draws from the same counter-based uniforms as the GRU's, so a
sample is the same alone or in any batch, and its behaviour log-probabilities are those of the
distribution it was drawn from, the trainer's recompute of the same tokens (`teacher_forced`,
one pass over prompt and output) equal to float rounding (tests/test_hf_policy.py: 1e-5).

Ids: feedloop's (see core/hf_tokenizer.py). With a tokenizer trained here they are the model's;
with a user's, `_model_input` maps feedloop's ids to the model's and `_policy_logits` maps the
model's logits back (feedloop's `<eos>` takes the model's end-of-text logit; the other four
specials can never be drawn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from feedloop.core import sampling
from feedloop.core.hf_tokenizer import HFTokenizer
from feedloop.core.policy import (
    Policy,
    PolicyOutput,
    SampledOutput,
    SampleRequest,
    TokenBatch,
    draw_step,
    nonempty_prompt,
    pad,
)
from feedloop.core.tokenizer import EOS_ID, PAD_ID

ARCHITECTURE = "hf-causal-lm"
# A token feedloop can never draw (a shifted special): a finite floor, not -inf, so that the
# trainer's entropy (p log p, with p = 0) stays 0 instead of 0 * -inf = NaN.
NEVER = -1e9


class HFCausalPolicy(Policy):
    architecture = ARCHITECTURE
    tokenizer: HFTokenizer
    model_id_table: torch.Tensor  # a buffer: feedloop id -> the model's id

    def __init__(self, model: Any, tokenizer: HFTokenizer, *, value_hidden_dim: int = 64) -> None:
        """model: a transformers causal LM (PreTrainedModel) whose vocabulary covers tokenizer's."""
        super().__init__()
        embedding_size = int(model.get_input_embeddings().weight.shape[0])
        model_vocab = tokenizer.vocab_size - tokenizer.offset
        if model_vocab > embedding_size:
            raise ValueError(
                f"vocabulary mismatch: the tokenizer has {model_vocab} tokens, the model's "
                f"embedding only {embedding_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.value_hidden_dim = value_hidden_dim
        hidden = int(model.config.hidden_size)
        self.value_head = nn.Sequential(
            nn.Linear(hidden, value_hidden_dim), nn.Tanh(), nn.Linear(value_hidden_dim, 1)
        )
        table = torch.tensor(tokenizer.model_ids(), dtype=torch.long)
        self.register_buffer("model_id_table", table, persistent=False)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "prompt_template": self.tokenizer.prompt_template,
            "value_hidden_dim": self.value_hidden_dim,
            "model_type": str(self.model.config.model_type),
            "vocab_size": self.tokenizer.vocab_size,
        }

    # -- ids and logits across the boundary --------------------------------------------------

    def _model_input(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.tokenizer.offset == 0 else self.model_id_table[ids]

    def _policy_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits (..., V_model) as feedloop's (..., vocab_size)."""
        t = self.tokenizer
        if t.offset == 0:
            return logits[..., : t.vocab_size]
        own = logits[..., : t.vocab_size - t.offset]
        specials = torch.full((*logits.shape[:-1], t.offset), NEVER, dtype=logits.dtype)
        specials[..., EOS_ID] = logits[..., t.model_eos_id]
        own = own.clone()
        own[..., t.model_eos_id] = NEVER  # drawn as feedloop's <eos>, never under its own id
        return torch.cat([specials, own], dim=-1)

    def _run(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: Any = None,
        *,
        hidden: bool = False,
        longest: int | None = None,
    ) -> Any:
        """The model's forward pass. longest: a bound on `positions` the caller knows for free;
        the exact check (a reduction) runs only when that bound reaches the model's limit."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if (
            limit is not None
            and (longest is None or longest >= limit)
            and int(positions.max()) >= limit
        ):
            # The model would index past its position table (an IndexError deep in torch).
            raise ValueError(
                f"a sequence of {int(positions.max()) + 1} tokens (prompt and output) is longer "
                f"than the model's {limit} positions"
            )
        return self.model(
            input_ids=self._model_input(ids),
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
            output_hidden_states=hidden,
        )

    # -- teacher forcing (training, scoring) --------------------------------------------------

    def teacher_forced(self, batch: TokenBatch) -> PolicyOutput:
        prompt, prompt_mask = left_aligned(batch.prompt_ids, batch.prompt_lengths)
        s, t = prompt.shape[1], batch.output_ids.shape[1]
        inputs = torch.cat([prompt, batch.output_ids[:, :-1]], dim=1)
        mask = torch.cat([prompt_mask, batch.output_mask[:, :-1].long()], dim=1)
        out = self._run(inputs, mask, positions_of(mask), hidden=True)
        # The logits at position s-1+j predict output token j: the last prompt token's state
        # chooses the first output token.
        logits = self._policy_logits(out.logits[:, s - 1 : s - 1 + t])
        states = out.hidden_states[-1][:, s - 1 : s - 1 + t]
        return PolicyOutput(logits, self.value_head(states).squeeze(-1))

    # -- sampling ------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, requests: Sequence[SampleRequest]) -> list[list[SampledOutput]]:
        """Sample every request's candidates in one batch with a KV cache.

        Each prompt is read once; its cache rows are then repeated for its candidates. Rows
        that finish leave the batch at once (their cache rows too), so the steps after cost
        only what the running rows need.
        """
        if not requests:
            return []
        counts = [r.num_candidates for r in requests]
        rows = [(i, c) for i, r in enumerate(requests) for c in range(r.num_candidates)]
        n = len(rows)
        params = [requests[i].params for i, _ in rows]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        max_tokens = torch.tensor([p.max_tokens for p in params], dtype=torch.long)
        # As the GRU: <eos> is not counted in max_tokens; a row at its limit takes one more
        # step, finished if it draws <eos>, cut (that draw dropped) if not.
        steps = max(p.max_tokens for p in params) + 1
        unfiltered = all(p.temperature == 1 and p.top_k == 0 and p.top_p >= 1 for p in params)
        seeds = sampling.batch_candidate_seeds([r.params.seed for r in requests], counts)
        uniforms = sampling.row_uniforms(seeds, steps)

        from transformers import DynamicCache

        prompt_ids, prompt_lengths = pad([nonempty_prompt(r.prompt_ids) for r in requests])
        prompt, prompt_mask = left_aligned(prompt_ids, prompt_lengths)
        width = prompt.shape[1]
        # Without left padding (one prompt, or prompts of one length) every column is real: no
        # mask at all, which spares the model building one at every step.
        padded = int(prompt_lengths.min()) < width
        cache = DynamicCache()
        # Every column's logits, though only the last is read: with transformers'
        # logits_to_keep=1 (sparing the other columns' vocabulary projection) two copies of one
        # LoRA model's weights sampled log-probs 2e-7 apart, where the LoRA tests ask for equal.
        out = self._run(prompt, prompt_mask if padded else None, positions_of(prompt_mask), cache)
        expand = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(counts))
        cache.batch_select_indices(expand)
        logits = self._policy_logits(out.logits[:, -1])[expand]
        # The whole attention mask at once (prompt, then one column per step), viewed a column
        # wider each step: no concatenation per step. Only the prompt's left padding is 0.
        mask = torch.ones((n, width + steps - 1), dtype=torch.long) if padded else None
        if mask is not None:
            mask[:, :width] = prompt_mask[expand]
        position = prompt_lengths[expand]
        longest = int(prompt_lengths.max()) - 1  # the last prompt position

        tokens = torch.full((n, steps), PAD_ID, dtype=torch.long)
        behaviour = torch.zeros((n, steps))
        raw = torch.zeros((n, steps))
        lengths = torch.zeros(n, dtype=torch.long)
        running = torch.arange(n)  # the batch rows still sampling, in their order
        token = torch.empty(0, dtype=torch.long)  # the last token drawn, per running row
        for t in range(steps):
            if t > 0:
                out = self._run(
                    token.unsqueeze(1),
                    mask[:, : width + t] if mask is not None else None,
                    position.unsqueeze(1),
                    cache,
                    longest=longest + t,
                )
                logits = self._policy_logits(out.logits[:, -1])
                position = position + 1
            token, picked, picked_raw = draw_step(
                logits, temperature, top_k, top_p, uniforms[:, t], unfiltered
            )
            tokens[running, t] = token
            behaviour[running, t] = picked
            raw[running, t] = picked_raw
            ended = token == EOS_ID
            finished = ended | (max_tokens <= t)
            if bool(finished.any()):
                lengths[running[finished]] = t + ended[finished].long()
                keep = ~finished
                if not bool(keep.any()):
                    break
                index = keep.nonzero().squeeze(1)
                cache.batch_select_indices(index)
                running, token = running[index], token[index]
                position = position[index]
                mask = mask[index] if mask is not None else None
                uniforms, max_tokens = uniforms[index], max_tokens[index]
                temperature, top_k, top_p = temperature[index], top_k[index], top_p[index]

        out_rows: list[list[SampledOutput]] = [[] for _ in requests]
        tokens_l, behaviour_l, raw_l = tokens.tolist(), behaviour.tolist(), raw.tolist()
        for row, ((i, _), k) in enumerate(zip(rows, lengths.tolist(), strict=True)):
            ids = tokens_l[row][:k]
            out_rows[i].append(
                SampledOutput(
                    token_ids=ids,
                    behaviour_logprobs=behaviour_l[row][:k],
                    policy_logprobs=raw_l[row][:k],
                    finished=bool(ids) and ids[-1] == EOS_ID,
                )
            )
        return out_rows


def left_aligned(ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows (B, S) moved to the right edge, and their attention mask (B, S).

    A causal LM continues from its last column, so a batch of prompts is padded on the left.
    """
    width = ids.shape[1]
    source = torch.arange(width).unsqueeze(0) - (width - lengths).unsqueeze(1)
    real = source >= 0
    aligned = torch.where(real, ids.gather(1, source.clamp(min=0)), PAD_ID)
    return aligned, real.long()


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding shifts nothing."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)

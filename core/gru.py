"""The default policy: a GRU encoder-decoder (seq2seq) with a value head.

    prompt tokens ─▶ embedding ─▶ encoder GRU ─▶ states e_1..e_S, summary h_enc
    h_enc ─┬─▶ bridge ─▶ decoder's first state
           └─▶ context, fed to every decoder step
    <bos> y1 y2 … ─▶ embedding ⊕ context ─▶ decoder GRU ─▶ h_t
    h_t attends over e_1..e_S ─▶ a_t;  o_t = tanh(W [h_t ; a_t])
    o_t ─┬─▶ output layer ─▶ logits
         └─▶ value head  ─▶ V(s_t)

This is the classic architecture of sequence-to-sequence learning (Sutskever et al., 2014; Cho
et al., 2014) with Luong et al.'s (2015) "general" attention, and a critic on the decoder
states, as actor-critic sequence generation uses it (Bahdanau et al., 2017). Feeding the
prompt's summary to every step keeps the topic in view; attention lets each step look at the
individual keywords, which is what makes two-keyword prompts come out with both words. Because
attention reads the decoder's output (not its input), teacher forcing stays one parallel pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from feedloop.core import sampling
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
from feedloop.core.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


@dataclass(frozen=True)
class GRUConfig:
    """Sizes of the GRU policy. The defaults give about 1.6M parameters with the shipped corpus."""

    vocab_size: int
    embedding_dim: int = 128
    hidden_dim: int = 256
    value_hidden_dim: int = 128
    dropout: float = 0.1  # active only in train() mode (pretraining); RL runs in eval() mode


class GRUPolicy(Policy):
    architecture = "gru-seq2seq"

    def __init__(self, config: GRUConfig, tokenizer: Tokenizer) -> None:
        super().__init__()
        if config.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size {config.vocab_size} != tokenizer size {tokenizer.vocab_size}"
            )
        self.config = config
        self.tokenizer = tokenizer
        e, h = config.embedding_dim, config.hidden_dim
        self.embedding = nn.Embedding(config.vocab_size, e, padding_idx=PAD_ID)
        self.encoder = nn.GRU(e, h, batch_first=True)
        self.bridge = nn.Linear(h, h)
        self.decoder = nn.GRU(e + h, h, batch_first=True)
        self.attention = nn.Linear(h, h, bias=False)
        self.combine = nn.Linear(2 * h, h)
        self.output = nn.Linear(h, config.vocab_size)
        self.value_head = nn.Sequential(
            nn.Linear(h, config.value_hidden_dim), nn.Tanh(), nn.Linear(config.value_hidden_dim, 1)
        )
        self.dropout = nn.Dropout(config.dropout)

    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self.config)

    # -- the network ---------------------------------------------------------------------------

    def encode(
        self, prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder states (B, S, H), their padding mask (B, S) and the summary h_enc (B, H).

        Packing makes padding invisible to each row, so a prompt encodes the same in any batch.
        """
        embedded = self.dropout(self.embedding(prompt_ids))
        packed = pack_padded_sequence(
            embedded, prompt_lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        states, h_n = self.encoder(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=prompt_ids.shape[1])
        mask = torch.arange(prompt_ids.shape[1]).unsqueeze(0) < prompt_lengths.unsqueeze(1)
        return states, mask, h_n[-1]

    def attend(
        self, hidden: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """o_t = tanh(W [h_t ; a_t]) for decoder outputs (B, T, H) over encoder states."""
        scores = torch.bmm(self.attention(hidden), states.transpose(1, 2))  # (B, T, S)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        attended = torch.bmm(torch.softmax(scores, dim=-1), states)
        return torch.tanh(self.combine(torch.cat([hidden, attended], dim=-1)))

    def initial_state(self, context: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bridge(context)).unsqueeze(0)

    def decode_steps(
        self, inputs: torch.Tensor, context: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder over input tokens (B, T): hidden outputs (B, T, H) and the new state."""
        embedded = self.dropout(self.embedding(inputs))
        steps = context.unsqueeze(1).expand(-1, inputs.shape[1], -1)
        outputs, state = self.decoder(torch.cat([embedded, steps], dim=-1), state)
        return outputs, state

    def teacher_forced(self, batch: TokenBatch) -> PolicyOutput:
        states, mask, context = self.encode(batch.prompt_ids, batch.prompt_lengths)
        bos = torch.full((batch.output_ids.shape[0], 1), BOS_ID, dtype=torch.long)
        inputs = torch.cat([bos, batch.output_ids[:, :-1]], dim=1)
        hidden, _ = self.decode_steps(inputs, context, self.initial_state(context))
        hidden = self.dropout(self.attend(hidden, states, mask))
        return PolicyOutput(self.output(hidden), self.value_head(hidden).squeeze(-1))

    # -- sampling ------------------------------------------------------------------------------

    def _input_table(self) -> torch.Tensor:
        """Every token's share of the decoder's input gates, embedding @ W_ih[:, :E]^T (V, 3H).

        A sampling step then looks its token's row up instead of multiplying the embedding by
        the weights: an eighth of a step's arithmetic. Built on first use and kept until a
        weight it derives from is replaced or changed in place (a training step bumps the
        tensor's version counter), so a policy that trains and samples in turn stays exact.
        The key holds weak references: a deep copy (the trainer's candidates) copies them as
        they are, still naming the parent's tensors, so a copy never takes its parent's table
        even once its own fresh version counters have caught up with the parent's.
        """
        weights = (self.embedding.weight, cast(torch.Tensor, self.decoder.weight_ih_l0))
        cached = self.__dict__.get("_input_table_cache")
        if cached is not None and all(
            ref() is w and version == w._version
            for (ref, version), w in zip(cached[0], weights, strict=True)
        ):
            return cast(torch.Tensor, cached[1])
        key = tuple((weakref.ref(w), w._version) for w in weights)
        e = self.config.embedding_dim
        table = weights[0] @ weights[1][:, :e].t()
        self.__dict__["_input_table_cache"] = (key, table)
        return table

    def _decoder_cell(
        self, context: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
        """One decoder step for sampling, the same function as `self.decoder` (PyTorch's GRU).

        The context's share of the input projection is the same at every step, so it is
        computed once per batch (returned, one row per batch row) instead of once per token,
        and the token's share is a row of `_input_table`. step(token, h, context_gates) -> the
        next h.
        """
        e = self.config.embedding_dim
        w_ih, w_hh, b_ih, b_hh = cast(list[torch.Tensor], self.decoder.all_weights[0])
        context_gates = torch.addmm(b_ih, context, w_ih[:, e:].t())
        table, w_hidden = self._input_table(), w_hh.t()

        def step(token: torch.Tensor, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
            gi = gates + table.index_select(0, token)
            gh = torch.addmm(b_hh, h, w_hidden)
            i_r, i_z, i_n = gi.chunk(3, dim=1)
            h_r, h_z, h_n = gh.chunk(3, dim=1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            return n + z * (h - n)  # (1 - z) * n + z * h

        return context_gates, step

    def _attention_memory(
        self, states: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `attend` needs of the encoder states, computed once per batch for sampling.

        Luong's score (W_a h)·s_j equals h·(s_j W_a), so the keys s_j W_a (B, H, S) are fixed
        per batch; and the attended half of the combine layer, W_c2 Σ_j α_j s_j, equals
        Σ_j α_j (W_c2 s_j), so the values W_c2 s_j (B, S, H) are too. A step then costs two
        products over the S prompt positions instead of two H×H matrix products. The mask
        becomes an additive bias (B, 1, S): 0 for a prompt token, -inf for padding.
        """
        h = self.config.hidden_dim
        keys = (states @ self.attention.weight).transpose(1, 2).contiguous()
        values = states @ self.combine.weight[:, h:].t()
        bias = torch.zeros(mask.shape, dtype=states.dtype).masked_fill_(~mask, float("-inf"))
        return keys, values, bias.unsqueeze(1)

    def _attend_step(
        self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """`attend` for one step of decoder outputs (B, H), over `_attention_memory`."""
        h = self.config.hidden_dim
        weights = torch.softmax(torch.baddbmm(bias, hidden.unsqueeze(1), keys), dim=-1)
        own = torch.addmm(self.combine.bias, hidden, self.combine.weight[:, :h].t())
        return torch.tanh(torch.baddbmm(own.unsqueeze(1), weights, values)[:, 0])

    @torch.inference_mode()
    def sample(self, requests: Sequence[SampleRequest]) -> list[list[SampledOutput]]:
        """Sample every request's candidates in one batch.

        Rows that finish (<eos> or their max_tokens) leave the batch at once: the steps after
        cost only what the rows still running need, so a batch costs about its average phrase
        length, not its longest. Every row is computed by the same row-wise arithmetic whoever
        shares its batch, so a seeded sample is the same alone or batched.
        """
        if not requests:
            return []
        rows = [(i, c) for i, r in enumerate(requests) for c in range(r.num_candidates)]
        n = len(rows)
        prompt_ids, prompt_lengths = pad([nonempty_prompt(requests[i].prompt_ids) for i, _ in rows])
        params = [requests[i].params for i, _ in rows]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        max_tokens = torch.tensor([p.max_tokens for p in params], dtype=torch.long)
        # <eos> is not counted in max_tokens: a row that has max_tokens tokens takes one more
        # step, which ends it finished if it draws <eos> and cut (that draw dropped) if not.
        # A cut output's logged log-probs therefore leave out that last draw's log(1 - p(<eos>)).
        steps = int(max_tokens.max()) + 1
        # With temperature 1 and no filtering the sampling distribution is the raw policy's.
        unfiltered = bool((temperature == 1).all() and (top_k == 0).all() and (top_p >= 1).all())
        seeds = sampling.batch_candidate_seeds(
            [r.params.seed for r in requests], [r.num_candidates for r in requests]
        )
        uniforms = sampling.row_uniforms(seeds, steps)

        states, mask, context = self.encode(prompt_ids, prompt_lengths)
        gates, step = self._decoder_cell(context)
        keys, values, bias = self._attention_memory(states, mask)
        state = self.initial_state(context)[0]
        token = torch.full((n,), BOS_ID, dtype=torch.long)
        tokens = torch.full((n, steps), PAD_ID, dtype=torch.long)
        behaviour = torch.zeros((n, steps))
        raw = torch.zeros((n, steps))
        lengths = torch.zeros(n, dtype=torch.long)
        running = torch.arange(n)  # the batch rows still sampling, in their order
        for t in range(steps):
            state = step(token, state, gates)
            logits = self.output(self._attend_step(state, keys, values, bias))
            token, picked, picked_raw = draw_step(
                logits, temperature, top_k, top_p, uniforms[:, t], unfiltered
            )
            tokens[running, t] = token
            behaviour[running, t] = picked
            raw[running, t] = picked_raw
            ended = token == EOS_ID
            finished = ended | (max_tokens <= t)  # max_tokens <= t: the row is at its limit
            if bool(finished.any()):
                lengths[running[finished]] = t + ended[finished].long()
                keep = ~finished
                if not bool(keep.any()):
                    break
                running, token, state, gates = running[keep], token[keep], state[keep], gates[keep]
                keys, values, bias, uniforms = keys[keep], values[keep], bias[keep], uniforms[keep]
                temperature, top_k, top_p = temperature[keep], top_k[keep], top_p[keep]
                max_tokens = max_tokens[keep]

        out: list[list[SampledOutput]] = [[] for _ in requests]
        tokens_l, behaviour_l, raw_l, lengths_l = (
            tokens.tolist(),
            behaviour.tolist(),
            raw.tolist(),
            lengths.tolist(),
        )
        for row, (i, _) in enumerate(rows):
            k = lengths_l[row]
            ids = tokens_l[row][:k]
            out[i].append(
                SampledOutput(
                    token_ids=ids,
                    behaviour_logprobs=behaviour_l[row][:k],
                    policy_logprobs=raw_l[row][:k],
                    finished=bool(ids) and ids[-1] == EOS_ID,
                )
            )
        return out

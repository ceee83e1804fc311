"""The training window: what a round reads from the replay store, and the tensors it trains on.

A round reads through the trainer's persisted cursor (the highest generation and feedback seq
it has consumed):
- new feedback events (seq > cursor), and the generations they name;
- new generations nobody gave feedback on within the join window (they may still carry reward
  from the reward model or a default); younger ones wait for the next round. A settled
  generation that was rated is not added again: its feedback came through the cursor (in this
  round or an earlier one), or will, and the generation comes with it;
- a seeded sample of older generations (the replay buffer), with their feedback;
- every event on any of these generations (so several events on one generation aggregate).
Data produced more than `max_version_lag` versions before live, or older than
`max_data_age_s`, is dropped and counted; so is a generation that cannot be learnt from at all
(a non-finite logged log-probability, or sampling parameters that no longer validate: rows an
older server may have stored), rather than aborting the round.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from feedloop.core.policy import TokenBatch, nonempty_prompt
from feedloop.core.sampling import InvalidSamplingParams, SamplingParams
from feedloop.core.store.base import (
    FeedbackRecord,
    GenerationRecord,
    ReplayStore,
    has_finite_logprobs,
)
from feedloop.core.tokenizer import EOS_ID, UNK_ID, Tokenizer
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.rewards import CorrectionTarget
from feedloop.trainer.update import Experience

_VERSION_NUMBER = re.compile(r"v(\d+)$")


@dataclass(frozen=True)
class Cursor:
    """The trainer's persisted progress (and the state that must survive a restart)."""

    generation_seq: int = 0
    feedback_seq: int = 0
    kl_coef: float | None = None  # the adaptive KL coefficient, carried across rounds
    rounds: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Cursor:
        if not data:
            return cls()
        return cls(
            int(data.get("generation_seq", 0)),
            int(data.get("feedback_seq", 0)),
            data.get("kl_coef"),
            int(data.get("rounds", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_number(version: str | None) -> int | None:
    m = _VERSION_NUMBER.search(version or "")
    return int(m.group(1)) if m else None


@dataclass
class Window:
    generations: dict[str, GenerationRecord]
    events: list[FeedbackRecord]
    new_events: int
    new_generations: int
    replayed: int
    dropped_stale: int
    next_generation_seq: int
    next_feedback_seq: int
    # Feedback lag: seconds between now and the newest / oldest new event consumed.
    newest_event_age_s: float = float("nan")
    oldest_event_age_s: float = float("nan")
    notes: list[str] = field(default_factory=list)
    # Generations dropped as unusable (see `learnable`).
    dropped_unusable: int = 0

    def figures(self) -> dict[str, Any]:
        return {
            "window_generations": len(self.generations),
            "window_events": len(self.events),
            "new_events": self.new_events,
            "new_generations": self.new_generations,
            "replayed_generations": self.replayed,
            "dropped_stale": self.dropped_stale,
            "dropped_unusable": self.dropped_unusable,
            "generation_seq_after": self.next_generation_seq,
            "feedback_seq_after": self.next_feedback_seq,
            "newest_event_age_s": self.newest_event_age_s,
            "oldest_event_age_s": self.oldest_event_age_s,
        }


def before_change(at: float, change_at: float | None) -> bool:
    """Whether data from time `at` (Unix seconds) predates a detected change of users' taste."""
    return change_at is not None and at < change_at


def stale_weight(at: float, change_at: float | None, factor: float) -> float:
    """The weight of data from time `at` once a change of users' taste was detected at
    change_at: `factor` before it, 1 from it on and when no change is known (the declared rule
    of trainer/drift.py; config drift_stale_weight)."""
    return factor if before_change(at, change_at) else 1.0


def learnable(generation: GenerationRecord) -> bool:
    """Whether an update can use a stored generation: every logged log-probability is finite
    (it divides every importance ratio) and its sampling parameters still validate (the gate
    rescores with them)."""
    if not has_finite_logprobs(generation):
        return False
    try:
        SamplingParams.from_dict(generation.sampling)
    except (InvalidSamplingParams, TypeError, ValueError):
        return False
    return True


def read_window(
    store: ReplayStore,
    cursor: Cursor,
    config: TrainConfig,
    *,
    now: float,
    live_version: str | None,
    seed: int,
) -> Window:
    """Read one round's window through the cursor (see the module docstring)."""
    new_events = store.feedback_after(cursor.feedback_seq, config.max_feedback_events)
    next_feedback_seq = max([cursor.feedback_seq, *(e.seq for e in new_events)])
    named = {g for e in new_events for g in e.generation_ids}

    new_generations = store.generations_after(cursor.generation_seq, config.max_new_generations)
    next_generation_seq = cursor.generation_seq
    settled: list[GenerationRecord] = []
    for g in new_generations:
        if now - g.created_at < config.join_window_s:
            break  # feedback may still come: this one and everything after wait
        settled.append(g)
        next_generation_seq = g.seq

    generations = store.get_generations(sorted(named)) if named else {}
    rated = {
        gid
        for e in (store.feedback_for([g.generation_id for g in settled]) if settled else [])
        for gid in e.generation_ids
    }
    generations.update((g.generation_id, g) for g in settled if g.generation_id not in rated)
    new_count = len(generations)
    replay = (
        store.sample_generations(cursor.generation_seq, config.replay_sample_size, seed)
        if config.replay_sample_size > 0 and cursor.generation_seq > 0
        else []
    )
    replayed = 0
    for g in replay:
        if g.generation_id not in generations:
            generations[g.generation_id] = g
            replayed += 1

    live_number = version_number(live_version)
    dropped = 0
    for gid, g in list(generations.items()):
        number = version_number(g.model_version)
        too_old = now - g.created_at > config.max_data_age_s
        too_stale = (
            live_number is not None
            and number is not None
            and live_number - number > config.max_version_lag
        )
        if too_old or too_stale:
            del generations[gid]
            dropped += 1
    unusable = [gid for gid, g in generations.items() if not learnable(g)]
    for gid in unusable:
        del generations[gid]
    events = store.feedback_for(sorted(generations)) if generations else []
    window = Window(
        generations=generations,
        events=events,
        new_events=len(new_events),
        new_generations=new_count,
        replayed=replayed,
        dropped_stale=dropped,
        next_generation_seq=next_generation_seq,
        next_feedback_seq=next_feedback_seq,
    )
    if new_events:
        times = [e.received_at for e in new_events]
        window.newest_event_age_s = max(0.0, now - max(times))
        window.oldest_event_age_s = max(0.0, now - min(times))
    if dropped:
        window.notes.append(f"dropped {dropped} generations older than the staleness bounds")
    if unusable:
        window.dropped_unusable = len(unusable)
        window.notes.append(
            f"skipped {len(unusable)} unusable generations (non-finite log-probabilities or "
            f"invalid sampling parameters), e.g. {unusable[0]}"
        )
    return window


def _pad_floats(rows: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(list(row), dtype=torch.float32)
    return out


def encode_correction(tokenizer: Tokenizer, text: str) -> list[int] | None:
    """Token ids (+ <eos>) of a corrected phrase; None if it has words the model cannot write."""
    ids = tokenizer.encode(text)
    if not ids or UNK_ID in ids:
        return None
    return [*ids, EOS_ID]


def build_experience(
    tokenizer: Tokenizer,
    examples: Sequence[tuple[GenerationRecord, float, float]],
    corrections: Sequence[CorrectionTarget],
) -> tuple[Experience | None, int]:
    """Tensors for the update from (generation, reward, weight) triples and corrections.

    Returns the experience (None if there is nothing to learn from) and the number of
    corrections skipped because they use words outside the vocabulary.
    """
    usable = [(g, r, w) for g, r, w in examples if g.output_ids and w > 0]
    targets: list[tuple[list[int], list[int], float]] = []
    skipped = 0
    for c in corrections:
        ids = encode_correction(tokenizer, c.text)
        if ids is None:
            skipped += 1
        else:
            targets.append((nonempty_prompt(tokenizer.encode_prompt(c.prompt)), ids, c.weight))
    if not usable and not targets:
        return None, skipped
    if usable:
        batch = TokenBatch.from_lists(
            [g.prompt_ids for g, _, _ in usable], [g.output_ids for g, _, _ in usable]
        )
        behaviour = _pad_floats(
            [g.behaviour_logprobs for g, _, _ in usable], batch.output_ids.shape[1]
        )
        rewards = torch.tensor([r for _, r, _ in usable], dtype=torch.float32)
        weights = torch.tensor([w for _, _, w in usable], dtype=torch.float32)
    else:
        batch = TokenBatch.from_lists([[UNK_ID]], [[EOS_ID]])
        behaviour, rewards, weights = torch.zeros((1, 1)), torch.zeros(1), torch.zeros(1)
    corrections_batch = correction_weights = None
    if targets:
        corrections_batch = TokenBatch.from_lists(
            [p for p, _, _ in targets], [o for _, o, _ in targets]
        )
        correction_weights = torch.tensor([w for _, _, w in targets], dtype=torch.float32)
    return Experience(
        batch, behaviour, rewards, weights, corrections_batch, correction_weights
    ), skipped

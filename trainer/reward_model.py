"""A Bradley-Terry reward model: learns from preferences, scores every logged generation.

    score(prompt, phrase) = sum of weights of the words present in the phrase
                          + a weight for the phrase's length in words
                          + weights for the share of the prompt's keywords it contains (and all)

P(a preferred over b) = sigmoid(score(a) - score(b)) (Bradley & Terry 1952). The model is linear
in features a person would name when saying what they like in a short phrase (words, length,
keyword use), so a few hundred noisy preferences are enough to fit it, it trains in well under a
second, and its weights can be read. Scores are calibrated to the [-1, 1] scale of normalised
ratings by least squares on the rated generations when there are enough of them, so rated and
unrated generations carry rewards in the same units.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from feedloop.core.tokenizer import SPECIAL_TOKENS, Tokenizer, split_words
from feedloop.trainer.rewards import PreferencePair
from feedloop.trainer.rl_math import bradley_terry_loss

MAX_LENGTH_WORDS = 16
MIN_CALIBRATION_RATINGS = 20


def is_heldout(key: str, share: float) -> bool:
    """Stable membership of a held-out set by hash of a key (same answer in every process)."""
    return (zlib.crc32(key.encode("utf-8")) % 10_000) < share * 10_000


def pair_is_heldout(pair: PreferencePair, share: float, gate_heldout: Collection[str]) -> bool:
    """A pair is held out by its own key, or because it names a generation the gate holds out.

    gate_heldout: the rated generations on which the gate estimates reward. Training the reward
    model on a pair that names one would fit the very texts on which the gate's doubly robust
    estimate measures the model's residuals.
    """
    return is_heldout(pair.key, share) or any(g in gate_heldout for g in pair.generation_ids)


@dataclass(frozen=True)
class Features:
    word_ids: torch.Tensor  # flat ids of the distinct words of every phrase
    offsets: torch.Tensor  # start of each phrase in word_ids
    length_index: torch.Tensor  # (N,)
    keyword: torch.Tensor  # (N, 2): share of prompt keywords present, all present


class RewardModel(nn.Module):
    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.words = nn.EmbeddingBag(tokenizer.vocab_size, 1, mode="sum")
        self.length = nn.Embedding(MAX_LENGTH_WORDS + 2, 1)
        self.keyword = nn.Linear(2, 1, bias=False)
        for p in self.parameters():
            nn.init.zeros_(p)  # an untrained model prefers nothing

    def features(self, prompts: Sequence[str], texts: Sequence[str]) -> Features:
        ids: list[int] = []
        offsets, lengths, keyword = [], [], []
        for prompt, text in zip(prompts, texts, strict=True):
            words = split_words(text)
            present = set(words)
            offsets.append(len(ids))
            ids.extend(
                sorted({self.tokenizer.id_of(w) for w in present if w not in SPECIAL_TOKENS})
            )
            n_words = sum(1 for w in words if any(c.isalnum() for c in w))
            lengths.append(min(n_words, MAX_LENGTH_WORDS + 1))
            keys = [w for w in split_words(prompt) if any(c.isalnum() for c in w)]
            share = sum(k in present for k in keys) / len(keys) if keys else 1.0
            keyword.append([share, 1.0 if share == 1.0 else 0.0])
        return Features(
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(offsets, dtype=torch.long),
            torch.tensor(lengths, dtype=torch.long),
            torch.tensor(keyword, dtype=torch.float32),
        )

    def forward(self, f: Features) -> torch.Tensor:
        words = self.words(f.word_ids, f.offsets).squeeze(-1)
        return words + self.length(f.length_index).squeeze(-1) + self.keyword(f.keyword).squeeze(-1)

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0)
        return self(self.features(prompts, texts))


@dataclass(frozen=True)
class Calibration:
    """reward = clamp(scale * score + shift, -1, 1)."""

    scale: float
    shift: float
    fitted_on: int  # rated generations it was fitted on (0: the fallback tanh mapping)

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        if self.fitted_on == 0:
            return torch.tanh(scores - self.shift)
        return (self.scale * scores + self.shift).clamp(-1.0, 1.0)


def calibrate(scores: torch.Tensor, rated_rewards: torch.Tensor) -> Calibration:
    """Least squares of ratings on scores; too few ratings: tanh of the centred score."""
    n = int(rated_rewards.numel())
    if n >= MIN_CALIBRATION_RATINGS and float(scores.var()) > 1e-8:
        s, r = scores.double(), rated_rewards.double()
        cov = float(((s - s.mean()) * (r - r.mean())).mean())
        scale = max(cov / float(s.var(unbiased=False)), 0.0)
        return Calibration(scale, float(r.mean()) - scale * float(s.mean()), n)
    return Calibration(1.0, float(scores.mean()) if scores.numel() else 0.0, 0)


@dataclass(frozen=True)
class FittedRewardModel:
    model: RewardModel
    calibration: Calibration
    train_pairs: int
    heldout_pairs: int
    heldout_accuracy: float  # NaN without held-out pairs
    train_loss: float
    pairs_by_source: dict[str, int]

    def rewards(self, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """Calibrated rewards in [-1, 1]."""
        return self.calibration.apply(self.model.scores(prompts, texts))

    def figures(self) -> dict[str, float | int | dict[str, int]]:
        return {
            "rm_train_pairs": self.train_pairs,
            "rm_heldout_pairs": self.heldout_pairs,
            "rm_heldout_accuracy": self.heldout_accuracy,
            "rm_train_loss": self.train_loss,
            "rm_calibrated_on": self.calibration.fitted_on,
            "rm_pairs_by_source": self.pairs_by_source,
        }


def pairwise_accuracy(model: RewardModel, pairs: Sequence[PreferencePair]) -> float:
    if not pairs:
        return float("nan")
    preferred = model.scores([p.prompt for p in pairs], [p.preferred_text for p in pairs])
    rejected = model.scores([p.prompt for p in pairs], [p.rejected_text for p in pairs])
    weights = torch.tensor([p.weight for p in pairs])
    # Ties count half: a model that cannot tell two phrases apart is right half the time.
    correct = (preferred > rejected).float() + 0.5 * (preferred == rejected).float()
    return float((correct * weights).sum() / weights.sum())


def fit_reward_model(
    tokenizer: Tokenizer,
    pairs: Sequence[PreferencePair],
    *,
    steps: int,
    learning_rate: float,
    l2: float,
    heldout_share: float,
    gate_heldout: Collection[str] = frozenset(),
    seed: int = 0,
) -> FittedRewardModel:
    """Fit a Bradley-Terry model on the pairs not held out; report held-out accuracy."""
    torch.manual_seed(seed)
    heldout = [p for p in pairs if pair_is_heldout(p, heldout_share, gate_heldout)]
    train = [p for p in pairs if not pair_is_heldout(p, heldout_share, gate_heldout)]
    model = RewardModel(tokenizer)
    loss_value = float("nan")
    if train:
        prompts = [p.prompt for p in train]
        preferred = model.features(prompts, [p.preferred_text for p in train])
        rejected = model.features(prompts, [p.rejected_text for p in train])
        weights = torch.tensor([p.weight for p in train])
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = bradley_terry_loss(model(preferred), model(rejected), weights)
            penalty = l2 * sum((p**2).sum() for p in model.parameters())
            (loss + penalty).backward()
            optimizer.step()
            loss_value = float(loss.detach())
    by_source: dict[str, int] = {}
    for p in pairs:
        by_source[p.source] = by_source.get(p.source, 0) + 1
    return FittedRewardModel(
        model=model.eval(),
        calibration=Calibration(1.0, 0.0, 0),
        train_pairs=len(train),
        heldout_pairs=len(heldout),
        heldout_accuracy=pairwise_accuracy(model, heldout),
        train_loss=loss_value if math.isfinite(loss_value) else float("nan"),
        pairs_by_source=by_source,
    )


def with_calibration(
    fitted: FittedRewardModel,
    prompts: Sequence[str],
    texts: Sequence[str],
    ratings: Sequence[float | None],
) -> FittedRewardModel:
    """The same model, calibrated to the normalised ratings among the given generations.

    ratings: the explicit reward of each generation, None where unrated. Without enough ratings
    the fallback centres scores on the mean over all the given generations.
    """
    scores = fitted.model.scores(prompts, texts)
    rated = [i for i, r in enumerate(ratings) if r is not None]
    calibration = calibrate(
        scores[rated], torch.tensor([ratings[i] for i in rated], dtype=torch.float32)
    )
    if calibration.fitted_on == 0:
        calibration = Calibration(1.0, float(scores.mean()) if len(texts) else 0.0, 0)
    return FittedRewardModel(**{**fitted.__dict__, "calibration": calibration})

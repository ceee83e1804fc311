"""The one minibatch update loop that every RL algorithm runs, and the interface it runs through.

An algorithm supplies two things (trainer.algorithms holds them):
- `prepare`: once per round, before any step and without gradients, what its loss needs per
  sequence or token (advantages and returns, baselines, importance weights...), plus the
  figures measured then (e.g. explained_variance);
- `loss`: for one minibatch of the round, its differentiable loss, its approx_kl (the loop's
  early stop) and its named per-step figures (policy_loss, value_loss, entropy, clipfrac...).
The loop owns the rest, the same for every algorithm: shuffled minibatches over several epochs
up to a step cap, the users' corrections as a teacher-forced loss term, the finiteness checks,
gradient-norm clipping, Adam, stopping once approx_kl passes target_approx_kl, and averaging
each figure over the steps taken.

The loop runs the same on one process or on several data-parallel ranks (trainer.distributed):
there the losses see the policy through `Ranks.sharded`, whose teacher-forced pass each rank
computes for its slice of the rows only, and the ranks' gradients are summed before each step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar, final

import torch

from feedloop.core.errors import FeedloopError
from feedloop.core.policy import Policy, TokenBatch, token_logprobs
from feedloop.trainer import rl_math
from feedloop.trainer.config import TrainConfig


class TrainingDiverged(FeedloopError):
    """A loss or gradient went non-finite or past the bound: the round is abandoned."""


@dataclass(frozen=True)
class Experience:
    """One round's training data as tensors.

    batch: prompts and logged outputs; behaviour_logprobs (B, T): log mu of each logged token
    (the distribution sampled from); rewards (B,): one per sequence in [-1, 1]; weights (B,):
    per-sequence weights (client caps). corrections: teacher-forced targets, if any.
    """

    batch: TokenBatch
    behaviour_logprobs: torch.Tensor
    rewards: torch.Tensor
    weights: torch.Tensor
    corrections: TokenBatch | None = None
    correction_weights: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.rewards.shape[0])


@dataclass
class UpdateResult:
    steps: int
    figures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LoggedScores:
    """The logged outputs scored before the round's first step: pi_old, its critic, the reference.

    All (B, T): log pi_old and log ref of each logged token, and the value head's estimate of
    the return from the state before it.
    """

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    ref_logprobs: torch.Tensor

    def kl_to_reference(self, mask: torch.Tensor) -> torch.Tensor:
        """KL(pi_old || ref) per sequence, (B,): the k1 estimate summed over its tokens."""
        return (rl_math.kl_k1(self.old_logprobs, self.ref_logprobs) * mask).sum(dim=1)


@torch.no_grad()
def score_logged(policy: Policy, reference: Policy, batch: TokenBatch) -> LoggedScores:
    out = policy.teacher_forced(batch)
    old_logprobs = token_logprobs(out.logits, batch.output_ids)
    ref_logprobs = token_logprobs(reference.teacher_forced(batch).logits, batch.output_ids)
    return LoggedScores(old_logprobs, out.values, ref_logprobs)


@dataclass(frozen=True)
class StepLoss:
    """An algorithm's loss on one minibatch.

    loss: differentiable (the loop adds the corrections' term); approx_kl: KL(pi_old || pi) per
    token on the minibatch, which ends the round's steps once past target_approx_kl; figures:
    what else the step measured, by name, each averaged over the round's steps.
    """

    loss: torch.Tensor
    approx_kl: float
    figures: dict[str, float]


class Prepared(Protocol):
    """What an algorithm's `prepare` returns: its own data, and the figures measured then."""

    @property
    def figures(self) -> dict[str, float]: ...


PreparedT = TypeVar("PreparedT", bound=Prepared)


class Ranks(Protocol):
    """The processes one update runs on: this one alone, or data-parallel ranks."""

    def sharded(self, policy: Policy) -> Policy:
        """The policy as the losses see it: on data-parallel ranks, a view whose teacher-forced
        pass is shared out among the ranks (trainer.distributed.ShardedForward)."""

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks."""


class OneProcess:
    """The update on this process alone: the policy itself, nothing to sum."""

    def sharded(self, policy: Policy) -> Policy:
        return policy

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        return None


def select(batch: TokenBatch, index: torch.Tensor) -> TokenBatch:
    return TokenBatch(
        batch.prompt_ids[index],
        batch.prompt_lengths[index],
        batch.output_ids[index],
        batch.output_lengths[index],
    )


def minibatches(
    n: int, size: int, epochs: int, max_steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index tensors: `epochs` shuffled passes over n items in minibatches, at most max_steps."""
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, size):
            if steps >= max_steps:
                return
            yield order[start : start + size]
            steps += 1


def correction_loss(
    policy: Policy, experience: Experience, size: int, generator: torch.Generator
) -> torch.Tensor:
    """Weighted teacher-forced negative log-likelihood per token of a sample of corrections."""
    if experience.corrections is None or experience.correction_weights is None:
        return torch.zeros(())
    n = int(experience.correction_weights.shape[0])
    index = torch.randperm(n, generator=generator)[:size]
    batch = select(experience.corrections, index)
    logprobs = token_logprobs(policy.teacher_forced(batch).logits, batch.output_ids)
    mask = batch.output_mask * experience.correction_weights[index].unsqueeze(1)
    return -rl_math.masked_mean(logprobs, mask)


def check_finite(name: str, value: torch.Tensor, bound: float) -> None:
    x = float(value.detach())
    if not math.isfinite(x) or abs(x) > bound:
        raise TrainingDiverged(f"{name} = {x:.4g} (bound {bound:g}): round abandoned")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class Algorithm(ABC, Generic[PreparedT]):
    """An RL algorithm: its preparation and its loss; `update` is the loop they share."""

    name: ClassVar[str]

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    @abstractmethod
    def prepare(
        self, policy: Policy, reference: Policy, experience: Experience, kl_coef: float
    ) -> PreparedT:
        """What the loss needs from the whole round, computed once before the first step."""

    @abstractmethod
    def loss(
        self, policy: Policy, prepared: PreparedT, minibatch: TokenBatch, index: torch.Tensor
    ) -> StepLoss:
        """The loss on `minibatch`: the round's rows `index` (into prepared's tensors)."""

    @final
    def update(
        self,
        policy: Policy,
        reference: Policy,
        experience: Experience,
        kl_coef: float,
        *,
        on_step: Callable[[int], None] | None = None,
        ranks: Ranks | None = None,
    ) -> UpdateResult:
        """Update `policy` in place from the experience; raise TrainingDiverged on blow-ups.

        With data-parallel `ranks`, every rank calls this with the same policy, experience and
        config: one seeded generator gives each the same minibatches, and every rank computes
        the same losses (on the whole minibatch) and takes the same steps.
        """
        c = self.config
        ranks = ranks or OneProcess()
        policy.eval()  # dropout off: recomputed log-probs are deterministic
        prepared = self.prepare(policy, reference, experience, kl_coef)
        optimizer = torch.optim.Adam(policy.parameters(), lr=c.learning_rate)
        generator = torch.Generator().manual_seed(c.seed)
        stats: dict[str, list[float]] = {"approx_kl": [], "grad_norm": [], "correction_loss": []}
        steps = 0
        stepped = ranks.sharded(policy)
        for index in minibatches(
            experience.size, c.minibatch_size, c.epochs, c.max_updates_per_round, generator
        ):
            step = self.loss(stepped, prepared, select(experience.batch, index), index)
            corr = correction_loss(stepped, experience, max(8, c.minibatch_size // 4), generator)
            stats["grad_norm"].append(
                self._optimizer_step(
                    policy, optimizer, step.loss + c.correction_loss_weight * corr, ranks
                )
            )
            stats["approx_kl"].append(step.approx_kl)
            stats["correction_loss"].append(float(corr.detach()))
            for key, value in step.figures.items():
                stats.setdefault(key, []).append(value)
            steps += 1
            if on_step:
                on_step(steps)
            if step.approx_kl > c.target_approx_kl:
                break  # early stop: this round has moved the policy far enough
        figures = {k: _mean(v) for k, v in stats.items()}
        figures.update(prepared.figures)
        figures["mean_reward"] = float(experience.rewards.mean())
        return UpdateResult(steps, figures)

    def _optimizer_step(
        self, policy: Policy, optimizer: torch.optim.Optimizer, loss: torch.Tensor, ranks: Ranks
    ) -> float:
        check_finite("loss", loss, self.config.max_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ranks.sum_gradients(list(policy.parameters()))  # before clipping: the whole gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), self.config.max_grad_norm)
        check_finite("grad norm", grad_norm, float("inf"))
        optimizer.step()
        return float(grad_norm)

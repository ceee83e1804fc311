"""RL algorithms behind one interface: a round's experience in, an updated policy out.

- `actor-critic` (default): the policy is the actor, its value head the critic. Logged data come
  from older behaviour policies mu, so each token's term carries a truncated importance weight
  min(rho_bar, pi_old / mu) (as V-trace does), and the step from pi_old to pi is bounded by PPO's
  clipped ratio. Rewards are shaped per token with a KL penalty to the reference policy
  (Ziegler et al. 2019); advantages come from GAE on the critic's values and are whitened; the
  value loss is clipped; an entropy bonus keeps sampling diverse; gradients are norm-clipped;
  several epochs of minibatches run per round.
- `reinforce`: REINFORCE with the value head's first-state value as a learned baseline, the
  sequence's truncated importance weight pi / mu, and the same KL-shaped return.

Both add the users' corrections as a teacher-forced loss. A Q-learning algorithm (a token-level
Q head trained by Bellman backups on logged data) would be a third `Algorithm` here.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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


class Algorithm(ABC):
    name: str = ""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    @abstractmethod
    def update(
        self,
        policy: Policy,
        reference: Policy,
        experience: Experience,
        kl_coef: float,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> UpdateResult:
        """Update `policy` in place from the experience; raise TrainingDiverged on blow-ups."""

    def _step(self, policy: Policy, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
        check_finite("loss", loss, self.config.max_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), self.config.max_grad_norm)
        check_finite("grad norm", grad_norm, float("inf"))
        optimizer.step()
        return float(grad_norm)


@torch.no_grad()
def _old_pass(policy: Policy, reference: Policy, batch: TokenBatch) -> tuple[torch.Tensor, ...]:
    out = policy.teacher_forced(batch)
    old_logprobs = token_logprobs(out.logits, batch.output_ids)
    ref_logprobs = token_logprobs(reference.teacher_forced(batch).logits, batch.output_ids)
    return old_logprobs, out.values, ref_logprobs


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class ActorCritic(Algorithm):
    name = "actor-critic"

    def update(
        self,
        policy: Policy,
        reference: Policy,
        experience: Experience,
        kl_coef: float,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> UpdateResult:
        c = self.config
        policy.eval()  # dropout off: recomputed log-probs are deterministic
        batch = experience.batch
        mask = batch.output_mask
        weighted_mask = mask * experience.weights.unsqueeze(1)
        old_logprobs, old_values, ref_logprobs = _old_pass(policy, reference, batch)
        behaviour = experience.behaviour_logprobs * mask
        importance = (
            rl_math.truncated_importance_weights(old_logprobs, behaviour, c.importance_weight_max)
            * mask
        )
        token_rewards = rl_math.kl_penalty_rewards(
            experience.rewards, old_logprobs, ref_logprobs, mask, kl_coef
        )
        advantages, returns = rl_math.gae(token_rewards, old_values, mask, c.gamma, c.gae_lambda)
        advantages = rl_math.whiten(advantages, weighted_mask)

        optimizer = torch.optim.Adam(policy.parameters(), lr=c.learning_rate)
        generator = torch.Generator().manual_seed(c.seed)
        stats: dict[str, list[float]] = {
            k: []
            for k in (
                "policy_loss",
                "value_loss",
                "entropy",
                "clipfrac",
                "approx_kl",
                "grad_norm",
                "correction_loss",
            )
        }
        steps = 0
        for index in minibatches(
            experience.size, c.minibatch_size, c.epochs, c.max_updates_per_round, generator
        ):
            mb = select(batch, index)
            out = policy.teacher_forced(mb)
            logprobs = token_logprobs(out.logits, mb.output_ids)
            mb_mask = weighted_mask[index]
            pg = rl_math.ppo_policy_loss(
                logprobs,
                old_logprobs[index],
                advantages[index],
                mb_mask,
                c.clip_eps,
                importance[index],
            )
            value_loss = rl_math.clipped_value_loss(
                out.values, old_values[index], returns[index], mb_mask, c.value_clip
            )
            entropy = rl_math.entropy_from_logits(out.logits, mb_mask)
            corr = correction_loss(policy, experience, max(8, c.minibatch_size // 4), generator)
            loss = (
                pg.loss
                + c.value_coef * value_loss
                - c.entropy_coef * entropy
                + c.correction_loss_weight * corr
            )
            stats["grad_norm"].append(self._step(policy, optimizer, loss))
            for key, value in (
                ("policy_loss", float(pg.loss.detach())),
                ("value_loss", float(value_loss.detach())),
                ("entropy", float(entropy.detach())),
                ("clipfrac", pg.clipfrac),
                ("approx_kl", pg.approx_kl),
                ("correction_loss", float(corr.detach())),
            ):
                stats[key].append(value)
            steps += 1
            if on_step:
                on_step(steps)
            if pg.approx_kl > c.target_approx_kl:
                break  # early stop: this round has moved the policy far enough
        seq_kl = (rl_math.kl_k1(old_logprobs, ref_logprobs) * mask).sum(dim=1)
        figures = {k: _mean(v) for k, v in stats.items()}
        figures.update(
            {
                "explained_variance": rl_math.explained_variance(old_values, returns, mask),
                "logged_kl_to_reference": float(seq_kl.mean()),
                "mean_importance_weight": float(rl_math.masked_mean(importance, mask)),
                "mean_reward": float(experience.rewards.mean()),
            }
        )
        return UpdateResult(steps, figures)


class Reinforce(Algorithm):
    name = "reinforce"

    def update(
        self,
        policy: Policy,
        reference: Policy,
        experience: Experience,
        kl_coef: float,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> UpdateResult:
        c = self.config
        policy.eval()
        batch = experience.batch
        mask = batch.output_mask
        old_logprobs, _, ref_logprobs = _old_pass(policy, reference, batch)
        seq_kl = (rl_math.kl_k1(old_logprobs, ref_logprobs) * mask).sum(dim=1)
        returns = experience.rewards - kl_coef * seq_kl  # the KL-shaped return of the sequence
        behaviour = (experience.behaviour_logprobs * mask).sum(dim=1)

        optimizer = torch.optim.Adam(policy.parameters(), lr=c.learning_rate)
        generator = torch.Generator().manual_seed(c.seed)
        stats: dict[str, list[float]] = {
            k: []
            for k in (
                "policy_loss",
                "value_loss",
                "entropy",
                "grad_norm",
                "correction_loss",
                "mean_importance_weight",
                "approx_kl",
            )
        }
        steps = 0
        return_scale = float(returns.std()) + 1e-6 if returns.numel() > 1 else 1.0
        for index in minibatches(
            experience.size, c.minibatch_size, c.epochs, c.max_updates_per_round, generator
        ):
            mb = select(batch, index)
            out = policy.teacher_forced(mb)
            mb_mask = mask[index]
            logprobs = (token_logprobs(out.logits, mb.output_ids) * mb_mask).sum(dim=1)
            weights = (
                rl_math.truncated_importance_weights(
                    logprobs.detach(), behaviour[index], c.importance_weight_max
                )
                * experience.weights[index]
            )
            baseline = out.values[:, 0]
            policy_loss = rl_math.reinforce_loss(
                logprobs, returns[index] / return_scale, baseline.detach() / return_scale, weights
            )
            value_loss = 0.5 * ((baseline - returns[index]) ** 2).mean()
            token_logprobs_now = token_logprobs(out.logits, mb.output_ids).detach()
            log_ratio = token_logprobs_now - old_logprobs[index]
            approx_kl = float(rl_math.masked_mean(torch.expm1(log_ratio) - log_ratio, mb_mask))
            entropy = rl_math.entropy_from_logits(out.logits, mb_mask)
            corr = correction_loss(policy, experience, max(8, c.minibatch_size // 4), generator)
            loss = (
                policy_loss
                + c.value_coef * value_loss
                - c.entropy_coef * entropy
                + c.correction_loss_weight * corr
            )
            stats["grad_norm"].append(self._step(policy, optimizer, loss))
            for key, value in (
                ("policy_loss", float(policy_loss.detach())),
                ("value_loss", float(value_loss.detach())),
                ("entropy", float(entropy.detach())),
                ("correction_loss", float(corr.detach())),
                ("mean_importance_weight", float(weights.mean())),
            ):
                stats[key].append(value)
            stats["approx_kl"].append(approx_kl)
            steps += 1
            if on_step:
                on_step(steps)
            if approx_kl > c.target_approx_kl:
                break  # the same bound on one round's move as actor-critic's
        figures = {k: _mean(v) for k, v in stats.items()}
        figures.update(
            {
                "logged_kl_to_reference": float(seq_kl.mean()),
                "mean_reward": float(experience.rewards.mean()),
            }
        )
        return UpdateResult(steps, figures)


ALGORITHMS: dict[str, type[Algorithm]] = {ActorCritic.name: ActorCritic, Reinforce.name: Reinforce}


def make_algorithm(config: TrainConfig) -> Algorithm:
    try:
        return ALGORITHMS[config.algorithm](config)
    except KeyError:
        raise ValueError(
            f"unknown algorithm {config.algorithm!r} (one of {', '.join(ALGORITHMS)})"
        ) from None

"""RL algorithms: each one its preparation and its loss; trainer.update runs the loop they share.

- `actor-critic` (default): the policy is the actor, its value head the critic. Logged data come
  from older behaviour policies mu, so each token's term carries a truncated importance weight
  min(rho_bar, pi_old / mu) (as V-trace does), and the step from pi_old to pi is bounded by PPO's
  clipped ratio. Rewards are shaped per token with a KL penalty to the reference policy
  (Ziegler et al. 2019); advantages come from GAE on the critic's values and are whitened; the
  value loss is clipped; an entropy bonus keeps sampling diverse.
- `reinforce`: REINFORCE with the value head's first-state value as a learned baseline, the
  sequence's truncated importance weight pi / mu, and the same KL-shaped return.

- `q-learning`: soft Q-learning for text (Guo et al. 2022) with the policy's log-ratio to the
  reference as the advantage, Q(s, a) = V(s) + beta * log(pi / ref) (Rafailov et al. 2024),
  beta being the KL coefficient: the soft Bellman backup against a Polyak-averaged target
  network's V, plus the multi-step path consistency (Nachum et al. 2017) that carries the
  phrase's reward to every token. Off-policy by construction: no importance weights
  (trainer.q_math explains why; docs/learning.md why this method and not ILQL).

The loop adds the users' corrections as a teacher-forced loss, clips gradient norms and runs
several epochs of minibatches per round, the same for all three.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from feedloop.core.policy import Policy, TokenBatch, token_logprobs
from feedloop.trainer import q_math, rl_math
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.update import Algorithm, Experience, StepLoss, score_logged


@dataclass(frozen=True)
class ActorCriticTargets:
    """Per token (B, T): pi_old and the critic before the round, GAE's advantages (whitened)
    and returns, the truncated importance weights pi_old / mu, and the client-weighted mask."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    importance: torch.Tensor
    weighted_mask: torch.Tensor
    figures: dict[str, float]


class ActorCritic(Algorithm[ActorCriticTargets]):
    name = "actor-critic"

    def prepare(
        self, policy: Policy, reference: Policy, experience: Experience, kl_coef: float
    ) -> ActorCriticTargets:
        c = self.config
        mask = experience.batch.output_mask
        weighted_mask = mask * experience.weights.unsqueeze(1)
        logged = score_logged(policy, reference, experience.batch)
        behaviour = experience.behaviour_logprobs * mask
        importance = (
            rl_math.truncated_importance_weights(
                logged.old_logprobs, behaviour, c.importance_weight_max
            )
            * mask
        )
        token_rewards = rl_math.kl_penalty_rewards(
            experience.rewards, logged.old_logprobs, logged.ref_logprobs, mask, kl_coef
        )
        advantages, returns = rl_math.gae(
            token_rewards, logged.old_values, mask, c.gamma, c.gae_lambda
        )
        figures = {
            "explained_variance": rl_math.explained_variance(logged.old_values, returns, mask),
            "logged_kl_to_reference": float(logged.kl_to_reference(mask).mean()),
            "mean_importance_weight": float(rl_math.masked_mean(importance, mask)),
        }
        return ActorCriticTargets(
            logged.old_logprobs,
            logged.old_values,
            rl_math.whiten(advantages, weighted_mask),
            returns,
            importance,
            weighted_mask,
            figures,
        )

    def loss(
        self,
        policy: Policy,
        prepared: ActorCriticTargets,
        minibatch: TokenBatch,
        index: torch.Tensor,
    ) -> StepLoss:
        c = self.config
        out = policy.teacher_forced(minibatch)
        logprobs = token_logprobs(out.logits, minibatch.output_ids)
        mask = prepared.weighted_mask[index]
        pg = rl_math.ppo_policy_loss(
            logprobs,
            prepared.old_logprobs[index],
            prepared.advantages[index],
            mask,
            c.clip_eps,
            prepared.importance[index],
        )
        value_loss = rl_math.clipped_value_loss(
            out.values, prepared.old_values[index], prepared.returns[index], mask, c.value_clip
        )
        entropy = rl_math.entropy_from_logits(out.logits, mask)
        return StepLoss(
            pg.loss + c.value_coef * value_loss - c.entropy_coef * entropy,
            pg.approx_kl,
            {
                "policy_loss": float(pg.loss.detach()),
                "value_loss": float(value_loss.detach()),
                "entropy": float(entropy.detach()),
                "clipfrac": pg.clipfrac,
            },
        )


@dataclass(frozen=True)
class ReinforceTargets:
    """Per sequence (B,): the KL-shaped return, its scale, log mu, the client weights; per
    token (B, T): pi_old and the output mask."""

    returns: torch.Tensor
    return_scale: float
    behaviour_logprobs: torch.Tensor
    weights: torch.Tensor
    old_logprobs: torch.Tensor
    mask: torch.Tensor
    figures: dict[str, float]


class Reinforce(Algorithm[ReinforceTargets]):
    name = "reinforce"

    def prepare(
        self, policy: Policy, reference: Policy, experience: Experience, kl_coef: float
    ) -> ReinforceTargets:
        mask = experience.batch.output_mask
        logged = score_logged(policy, reference, experience.batch)
        seq_kl = logged.kl_to_reference(mask)
        returns = experience.rewards - kl_coef * seq_kl  # the KL-shaped return of the sequence
        return ReinforceTargets(
            returns,
            float(returns.std()) + 1e-6 if returns.numel() > 1 else 1.0,
            (experience.behaviour_logprobs * mask).sum(dim=1),
            experience.weights,
            logged.old_logprobs,
            mask,
            {"logged_kl_to_reference": float(seq_kl.mean())},
        )

    def loss(
        self,
        policy: Policy,
        prepared: ReinforceTargets,
        minibatch: TokenBatch,
        index: torch.Tensor,
    ) -> StepLoss:
        c = self.config
        out = policy.teacher_forced(minibatch)
        mask = prepared.mask[index]
        token_logprobs_now = token_logprobs(out.logits, minibatch.output_ids)
        logprobs = (token_logprobs_now * mask).sum(dim=1)
        weights = (
            rl_math.truncated_importance_weights(
                logprobs.detach(), prepared.behaviour_logprobs[index], c.importance_weight_max
            )
            * prepared.weights[index]
        )
        returns, scale = prepared.returns[index], prepared.return_scale
        baseline = out.values[:, 0]
        policy_loss = rl_math.reinforce_loss(
            logprobs, returns / scale, baseline.detach() / scale, weights
        )
        value_loss = 0.5 * ((baseline - returns) ** 2).mean()
        log_ratio = token_logprobs_now.detach() - prepared.old_logprobs[index]
        entropy = rl_math.entropy_from_logits(out.logits, mask)
        return StepLoss(
            policy_loss + c.value_coef * value_loss - c.entropy_coef * entropy,
            # the same bound on one round's move as actor-critic's
            float(rl_math.masked_mean(torch.expm1(log_ratio) - log_ratio, mask)),
            {
                "policy_loss": float(policy_loss.detach()),
                "value_loss": float(value_loss.detach()),
                "entropy": float(entropy.detach()),
                "mean_importance_weight": float(weights.mean()),
            },
        )


@dataclass(frozen=True)
class SoftQTargets:
    """Per token (B, T): the sequence's reward at its last token, log ref, log pi_old and the
    client-weighted mask; beta (the round's KL coefficient); the target network, which trails
    the policy by Polyak averaging after every step."""

    token_rewards: torch.Tensor
    ref_logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    weighted_mask: torch.Tensor
    beta: float
    target: Policy
    figures: dict[str, float]


class SoftQLearning(Algorithm[SoftQTargets]):
    name = "q-learning"

    def prepare(
        self, policy: Policy, reference: Policy, experience: Experience, kl_coef: float
    ) -> SoftQTargets:
        mask = experience.batch.output_mask
        logged = score_logged(policy, reference, experience.batch)
        # The KL leash is inside Q (beta * log pi/ref), not in the reward: kl_coef 0 here.
        token_rewards = rl_math.kl_penalty_rewards(
            experience.rewards, logged.old_logprobs, logged.ref_logprobs, mask, 0.0
        )
        weighted_mask = mask * experience.weights.unsqueeze(1)
        q_old = q_math.soft_q_values(
            logged.old_values, logged.old_logprobs, logged.ref_logprobs, kl_coef
        )
        return SoftQTargets(
            token_rewards,
            logged.ref_logprobs,
            logged.old_logprobs,
            weighted_mask,
            kl_coef,
            copy.deepcopy(policy).requires_grad_(False),
            {
                "logged_kl_to_reference": float(logged.kl_to_reference(mask).mean()),
                "mean_q_logged": float(rl_math.masked_mean(q_old, weighted_mask)),
            },
        )

    def loss(
        self,
        policy: Policy,
        prepared: SoftQTargets,
        minibatch: TokenBatch,
        index: torch.Tensor,
    ) -> StepLoss:
        c, p = self.config, prepared
        # The target trails every step taken so far (none before the first).
        q_math.polyak_update(
            list(p.target.parameters()), list(policy.parameters()), c.q_target_polyak
        )
        out = policy.teacher_forced(minibatch)
        logprobs = token_logprobs(out.logits, minibatch.output_ids)
        mask = p.weighted_mask[index]
        real = minibatch.output_mask
        rewards, ref = p.token_rewards[index], p.ref_logprobs[index]
        with torch.no_grad():
            target_values = p.target.teacher_forced(minibatch).values
        q = q_math.soft_q_values(out.values, logprobs, ref, p.beta)
        targets = q_math.soft_bellman_targets(
            rewards, q_math.next_state_values(target_values, real), real, c.gamma
        )
        bellman = q_math.soft_bellman_loss(q, targets, mask)
        residuals = q_math.path_consistency_residuals(
            rewards, logprobs, ref, out.values, real, c.gamma, p.beta
        )
        path = q_math.path_consistency_loss(residuals, mask)
        entropy = rl_math.entropy_from_logits(out.logits, mask)
        log_ratio = logprobs.detach() - p.old_logprobs[index]
        return StepLoss(
            bellman + c.q_path_consistency_coef * path - c.entropy_coef * entropy,
            float(rl_math.masked_mean(torch.expm1(log_ratio) - log_ratio, real)),
            {
                "bellman_loss": float(bellman.detach()),
                "path_consistency_loss": float(path.detach()),
                "entropy": float(entropy.detach()),
                "mean_q": float(rl_math.masked_mean(q.detach(), mask)),
            },
        )


ALGORITHMS: dict[str, type[Algorithm[Any]]] = {
    ActorCritic.name: ActorCritic,
    Reinforce.name: Reinforce,
    SoftQLearning.name: SoftQLearning,
}


def make_algorithm(config: TrainConfig) -> Algorithm[Any]:
    try:
        return ALGORITHMS[config.algorithm](config)
    except KeyError:
        raise ValueError(
            f"unknown algorithm {config.algorithm!r} (one of {', '.join(ALGORITHMS)})"
        ) from None

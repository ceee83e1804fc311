"""The RL math: pure functions on tensors, named as in the literature, tested against hand values.

Shapes: B sequences of T output tokens. `mask` (B, T) is 1.0 on real tokens and 0.0 on
padding; it may carry per-sequence weights (any non-negative values), which every masked
reduction here honours. Rewards arrive at the last real token of a sequence (a phrase is rated
as a whole); per-token KL penalties spread the leash to the reference policy over every token.

References: Schulman et al. 2016 (GAE), 2017 (PPO); Ziegler et al. 2019 (per-token KL penalty,
adaptive KL controller); Schulman 2020, "Approximating KL divergence" (k1, k3); Williams 1992
(REINFORCE); Bradley & Terry 1952; Swaminathan & Joachims 2015 (self-normalised IS); Dudik et
al. 2011 and Jiang & Li 2016 (doubly robust); Espeholt et al. 2018 (truncated importance weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


# -- masked reductions ---------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantage whitening: zero mean, unit variance over the masked entries."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * (mask > 0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each sequence, (B,). Empty rows give 0."""
    return ((mask > 0).long().sum(dim=1) - 1).clamp(min=0)


# -- returns and advantages ----------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: (advantages, returns = advantages + values).

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t), with V = 0 after the last token (the episode
    ends there); A_t = delta_t + gamma * lam * A_{t+1}.
    """
    valid = (mask > 0).float()
    values = values * valid
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * valid[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * valid


# -- KL to the reference policy ------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(pi || ref) on samples of pi: log pi - log ref (unbiased)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate: (r - 1) - log r with r = ref/pi; unbiased, never negative."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_penalty_rewards(
    sequence_rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * k1 at every token, plus the sequence's reward at its last.

    This is the KL-shaped reward of Ziegler et al. (2019): maximising it maximises reward minus
    kl_coef * KL(pi || ref).
    """
    valid = (mask > 0).float()
    rewards = -kl_coef * kl_k1(logprobs, ref_logprobs) * valid
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0])
    rewards[rows, last] += sequence_rewards * valid[rows, last]
    return rewards


# -- losses --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossStats:
    loss: torch.Tensor
    clipfrac: float
    approx_kl: float


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    importance_weights: torch.Tensor | None = None,
) -> PolicyLossStats:
    """PPO's clipped surrogate: -E[min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)].

    ratio = pi / pi_old per token. importance_weights (detached, e.g. truncated pi_old / mu for
    data logged by an older behaviour policy) multiply each token's term. approx_kl is the k3
    estimate of KL(pi_old || pi); clipfrac the share of tokens where clipping was active.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if importance_weights is not None:
        per_token = per_token * importance_weights
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clipfrac = float(masked_mean(((ratio - 1.0).abs() > clip_eps).float(), mask))
        approx_kl = float(masked_mean(torch.expm1(log_ratio) - log_ratio, mask))
    return PolicyLossStats(loss, clipfrac, approx_kl)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """0.5 * E[max((V - R)^2, (V_clipped - R)^2)], V_clipped = V_old + clip(V - V_old, +-c)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(per_token, mask)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the categorical distributions given by logits (B, T, V)."""
    logp = torch.log_softmax(logits, dim=-1)
    per_token = -(logp.exp() * logp).sum(dim=-1)
    return masked_mean(per_token, mask)


def reinforce_loss(
    sequence_logprobs: torch.Tensor,
    returns: torch.Tensor,
    baselines: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """REINFORCE with a baseline: -E_w[(G - b) * log pi(y|x)]; b and w are not differentiated."""
    advantages = (returns - baselines).detach()
    return -(weights.detach() * advantages * sequence_logprobs).sum() / weights.sum().clamp(
        min=1e-8
    )


def bradley_terry_loss(
    preferred_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """-log sigmoid(s_preferred - s_rejected): the Bradley-Terry negative log-likelihood."""
    nll = -F.logsigmoid(preferred_scores - rejected_scores)
    if weights is None:
        return nll.mean()
    return (nll * weights).sum() / weights.sum().clamp(min=1e-8)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[target - predicted] / Var[target]: 1 is perfect, 0 no better than the mean."""
    var_target = float(masked_var(target, mask))
    if var_target < 1e-12:
        return float("nan")
    return 1.0 - float(masked_var(target - predicted, mask)) / var_target


# -- importance weights and off-policy estimators ------------------------------------------------


def truncated_importance_weights(
    target_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, max_weight: float
) -> torch.Tensor:
    """min(max_weight, pi / mu) from log-probabilities (any shape; sum tokens first for sequences).

    Truncation bounds the variance that stale behaviour data would bring (V-trace's rho-bar).
    """
    log_w = (target_logprobs - behaviour_logprobs).clamp(max=math.log(max_weight))
    return torch.exp(log_w)


def effective_sample_size(weights: torch.Tensor) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2."""
    total = float(weights.sum())
    squares = float((weights**2).sum())
    return total * total / squares if squares > 0 else 0.0


@dataclass(frozen=True)
class Estimate:
    """An off-policy value estimate with a 95% normal confidence interval."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


def _interval(value: float, stderr: float, n: int) -> Estimate:
    return Estimate(value, value - Z_95 * stderr, value + Z_95 * stderr, n)


def snips(weights: torch.Tensor, rewards: torch.Tensor) -> Estimate:
    """Self-normalised importance sampling: sum(w r) / sum(w), with a delta-method interval."""
    n = int(weights.numel())
    if n == 0 or float(weights.sum()) <= 0:
        return Estimate(float("nan"), float("nan"), float("nan"), n)
    w = weights.double()
    r = rewards.double()
    value = float((w * r).sum() / w.sum())
    # Var of a ratio estimator: sum(w^2 (r - V)^2) / (sum w)^2.
    stderr = math.sqrt(float((w**2 * (r - value) ** 2).sum())) / float(w.sum())
    return _interval(value, stderr, n)


def doubly_robust(
    weights: torch.Tensor,
    rewards: torch.Tensor,
    predicted_logged: torch.Tensor,
    predicted_target: torch.Tensor,
) -> Estimate:
    """Doubly robust value: mean(DM(x) + w (r - r_hat(x, y))), with a normal interval.

    predicted_logged: the reward model on the logged output; predicted_target: the reward model's
    expectation under the target policy for the same prompt (the direct method). Unbiased if
    either the weights or the reward model are right.
    """
    n = int(weights.numel())
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    terms = predicted_target.double() + weights.double() * (
        rewards.double() - predicted_logged.double()
    )
    value = float(terms.mean())
    stderr = float(terms.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("inf")
    return _interval(value, stderr, n)


# -- the adaptive KL coefficient -----------------------------------------------------------------


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon).

    A proportional controller: the coefficient grows while the measured KL to the reference is
    above target and shrinks while below, by at most 20% per update, so it never changes sign,
    and it never grows past max_value. Without that bound a KL held above target round after
    round (each candidate refused, the next round starting again from the same live policy)
    compounds the coefficient by 1.2 a round until the penalty outweighs any reward by orders of
    magnitude and every round's loss passes the divergence bound: the loop stops learning for good.
    """

    value: float
    target: float
    horizon: float
    max_value: float = math.inf

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move towards target after one measurement; n_steps: sequences trained on since the last.

        Ziegler et al. and TRL pass one step's batch, far below the horizon. A round may hold more
        sequences than the horizon, but its KL is measured once: the gain n / horizon is capped
        at 1, else a large round below target would turn the penalty into a bonus.
        """
        if math.isfinite(current_kl) and self.target > 0:
            error = min(0.2, max(-0.2, current_kl / self.target - 1.0))
            self.value *= 1.0 + error * min(1.0, n_steps / self.horizon)
            self.value = min(self.value, self.max_value)
        return self.value

"""Soft Q-learning's math for token-level text generation: pure functions, tested by hand.

The KL-regularised objective E[r] - beta * KL(pi || ref) has a soft-optimal policy
pi*(a|s) = ref(a|s) * exp((Q*(s, a) - V*(s)) / beta), with the soft Bellman equation
Q*(s_t, a_t) = r_t + gamma * V*(s_{t+1}) (Haarnoja et al. 2017; for tokens, Rafailov et al. 2024,
"From r to Q*", eqs. 3-7). Read backwards, a policy's log-ratio to the reference IS its advantage:
Q(s, a) = V(s) + beta * log(pi(a|s) / ref(a|s)). We parametrise Q that way (the logits give the
advantage, the value head V), which is Guo et al. 2022's "logits as Q" measured against the
reference: the served policy stays softmax(logits), and V(s) = beta * log sum_a ref(a|s) *
exp(Q(s, a) / beta) holds by construction, whatever the value head says.

Two consistencies are trained, as in Guo et al. 2022 (after Nachum et al. 2017, PCL):
- single-step: the soft Bellman backup against a Polyak-averaged target network's V
  (Lillicrap et al. 2016), the Q-learning term proper;
- multi-step: the path consistency to the end of the phrase, which carries the sparse
  end-of-phrase reward back to every token at once. It holds along ANY path for the optimal
  pair (Nachum et al. 2017, theorem 1), so logged data from older or tempered behaviour
  policies need no importance weights.

Shapes as in rl_math: B sequences of T output tokens, `mask` (B, T) 1.0 on real tokens; V(s_t)
is the value of the state before token t, and the state after the last real token is terminal.
"""

from __future__ import annotations

import torch

from feedloop.trainer.rl_math import masked_mean


def soft_q_values(
    values: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, beta: float
) -> torch.Tensor:
    """Q(s_t, a_t) = V(s_t) + beta * (log pi(a_t|s_t) - log ref(a_t|s_t)), per token (B, T)."""
    return values + beta * (logprobs - ref_logprobs)


def next_state_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """V(s_{t+1}) per token (B, T): the next token's value, 0 after the last real token."""
    valid = (mask > 0).float()
    shifted = torch.zeros_like(values)
    shifted[:, :-1] = values[:, 1:] * valid[:, 1:]
    return shifted * valid


def soft_bellman_targets(
    token_rewards: torch.Tensor, next_values: torch.Tensor, mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """The single-step backup y_t = r_t + gamma * V_target(s_{t+1}) (B, T), 0 on padding."""
    return (token_rewards + gamma * next_values) * (mask > 0).float()


def soft_bellman_loss(
    q_values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """0.5 * E_mask[(y_t - Q(s_t, a_t))^2], the targets not differentiated."""
    return 0.5 * masked_mean((targets.detach() - q_values) ** 2, mask)


def path_consistency_residuals(
    token_rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    beta: float,
) -> torch.Tensor:
    """Multi-step path consistency to the episode's end, per token (B, T):

    C_t = sum_{k >= t} gamma^(k-t) * (r_k - beta * log(pi(a_k|s_k) / ref(a_k|s_k))) - V(s_t),

    zero for the optimal policy and its soft value on any path (Nachum et al. 2017).
    """
    valid = (mask > 0).float()
    to_go = (token_rewards - beta * (logprobs - ref_logprobs)) * valid
    for t in range(to_go.shape[1] - 2, -1, -1):  # backwards: each adds the discounted rest
        to_go[:, t] += gamma * to_go[:, t + 1]
    return (to_go - values) * valid


def path_consistency_loss(residuals: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0.5 * E_mask[C_t^2]: every term of the path is differentiated, as in PCL."""
    return 0.5 * masked_mean(residuals**2, mask)


@torch.no_grad()
def polyak_update(target: list[torch.Tensor], online: list[torch.Tensor], tau: float) -> None:
    """target <- (1 - tau) * target + tau * online, in place (Lillicrap et al. 2016)."""
    for t, o in zip(target, online, strict=True):
        t.mul_(1.0 - tau).add_(o.detach(), alpha=tau)

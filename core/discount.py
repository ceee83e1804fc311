"""Evidence that ages: an exponential discount of users' feedback by its age, declared by a
half-life, and how much of the decision's alpha each look may spend.

After users' taste moves, a version's ratings from before the change say little about how it
serves now. Non-stationary bandits answer with a discount (discounted UCB) or a sliding window
(Garivier & Moulines, "On upper-confidence bound policies for switching bandit problems", ALT
2011); the discount is chosen here because its weights at two looks differ by one common factor
(below), which keeps a confidence sequence valid across looks at a small, declared cost, where
a sliding window drops each observation abruptly and gives no such property.

At a look at time t, the observation received at t_i weighs

    w_i = 0.5 ** ((t - t_i) / H)       (<= 1; H: the half-life, 0: off, every weight 1)

The discounted mean sum w x / sum w estimates the discounted target sum w mu / sum w, mu_i the
mean of observation i when it arrived (users' taste may move: mu_i need not be constant).

Why the confidence sequence stays valid (feedloop.core.online_eval applies it). Fix an anchor
tau and let u_i = 0.5 ** ((tau - t_i) / H): known as soon as the observation arrives (it depends
on its arrival time, which does not depend on the rating). S_k = sum_{i<=k} u_i (x_i - mu_i)
is then a martingale with sigma u_i-sub-Gaussian increments (x_i within an interval of width
2 sigma, Hoeffding's lemma), so for every lambda exp(lambda S_k - lambda^2 V_k / 2), V_k =
sigma^2 sum u_i^2, is a nonnegative supermartingale, and so is its mixture over lambda ~
N(0, 1/rho): by Ville's inequality, with probability at least 1 - alpha, for every k at once,

    |S_k| < B(V_k, rho, alpha) = sqrt((V_k + rho) log((V_k + rho) / (rho alpha^2))).

At a look t >= tau every weight is the same multiple of its anchored one, w_i = c u_i with
c = 0.5 ** ((t - tau) / H); multiplying the inequality by c gives

    |sum w_i (x_i - mu_i)| < B(sigma^2 sum w_i^2, c^2 rho, alpha),

the undiscounted boundary with V = sigma^2 sum w^2 and rho scaled by c^2. So ONE event covers
every look after tau and every arrival. The price: rho shrinks with c^2, which widens the
boundary by about 2 log(2) (t - tau) / H inside the logarithm. Looks are therefore cut into
blocks of one half-life from the start of the comparison (`start_s`: when the live version began
to be watched); block j re-anchors at its own start (c stays in (1/2, 1]) and spends
alpha_j = alpha / ((j + 1)(j + 2)), which sums to alpha over all blocks. Every look of every
block is then covered at once with probability at least 1 - alpha, however long the comparison
runs; later blocks pay a slowly growing log((j + 1)(j + 2)) for it. Observations are read back
to a cutoff fixed within a block (its start less `horizon_half_lives` half-lives, where a weight
is below 0.1%, or the decision's lookback if shorter), so no weight jumps to zero between two
looks of a block.

With the discount off (H = 0) every weight is 1, there is one block, c = 1 and alpha_0 = alpha:
exactly the undiscounted sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Observations older than this many half-lives before a block's start are not read: they would
# weigh below 0.5 ** 10 < 0.1%.
HORIZON_HALF_LIVES = 10.0


@dataclass(frozen=True)
class Discount:
    """The discount at one look: half_life_s (0: off), now_s (the look's time), start_s (when
    this comparison's looks began; data-independent, e.g. a promotion), all Unix seconds."""

    half_life_s: float
    now_s: float
    start_s: float

    def __post_init__(self) -> None:
        if not self.half_life_s >= 0:  # NaN fails this too
            raise ValueError(f"half_life_s must be >= 0, got {self.half_life_s}")
        if not self.now_s >= self.start_s:
            raise ValueError(f"now_s ({self.now_s}) must not precede start_s ({self.start_s})")

    @property
    def on(self) -> bool:
        return self.half_life_s > 0

    @property
    def block(self) -> int:
        """The index j of the look's block (0 with the discount off)."""
        if not self.on:
            return 0
        return math.floor((self.now_s - self.start_s) / self.half_life_s)

    @property
    def block_start_s(self) -> float:
        return self.start_s + self.block * self.half_life_s if self.on else self.start_s

    def weight(self, at_s: float) -> float:
        """0.5 ** ((now - at) / H) of an observation received at at_s (1 with the discount off)."""
        if not self.on:
            return 1.0
        return 0.5 ** ((self.now_s - at_s) / self.half_life_s)

    @property
    def rho_scale(self) -> float:
        """c^2, c = 0.5 ** ((now - block start) / H): the mixture's rho at this look over its
        value at the block's anchor."""
        if not self.on:
            return 1.0
        return 0.25 ** ((self.now_s - self.block_start_s) / self.half_life_s)

    def alpha(self, alpha: float) -> float:
        """The share of alpha this look's block may spend: alpha / ((j + 1)(j + 2)) (all of it
        with the discount off)."""
        if not self.on:
            return alpha
        j = self.block
        return alpha / ((j + 1) * (j + 2))

    def cutoff_s(self, lookback_s: float) -> float:
        """The earliest receipt time read at this look: with the discount on, fixed within a
        block (its start less HORIZON_HALF_LIVES half-lives or lookback_s, the shorter); off,
        lookback_s before now."""
        if not self.on:
            return self.now_s - lookback_s
        return self.block_start_s - min(HORIZON_HALF_LIVES * self.half_life_s, lookback_s)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "half_life_s": self.half_life_s,
            "block": self.block,
            "block_start_s": self.block_start_s,
            "rho_scale": self.rho_scale,
        }

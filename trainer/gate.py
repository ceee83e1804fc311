"""The evaluation gate: a candidate goes live only if it is no worse than the live policy.

Every candidate's report also carries its automatic evaluation beside live's, the figures
pretraining reports (core.evaluation): held-out perplexity and keyword inclusion, the share of
phrases sampled (temperature 1, seeded) for held-out prompts that contain every keyword of
their prompt. Inclusion is reported, not gated: a preference may rightly trade it away.

Three checks, every figure reported whatever the outcome:
1. Fluency: per-token perplexity on the corpus's test split may not exceed
   `gate_max_perplexity_ratio_live` x the live policy's, nor
   `gate_max_perplexity_ratio_reference` x the reference's (so drift cannot pile up round by
   round).
2. The KL leash: KL(candidate || reference) per phrase, measured on the candidate's own samples
   for held-out prompts (k1 and k3 estimates), at most `gate_max_kl` nats.
3. Expected reward, off-policy, on held-out logged generations with explicit ratings: the
   values of the candidate, the live policy and the recent earlier live versions by
   self-normalised importance sampling and doubly robust with the reward model, each with a 95%
   interval. The candidate is refused if its doubly robust interval lies wholly below the best
   of those estimates (clearly worse than the best so far): against live alone, a chain of
   candidates each a little worse than its parent would pass every gate while reward drifts
   down. Importance weights are those of the distribution the server sampled from (each
   record's temperature/top-k/top-p applied to the target policy) over the logged behaviour
   log-probs; for a record served for exploration the target serves with the defaults the
   request left to the server, the behaviour with the exploration parameters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from feedloop.core import sampling
from feedloop.core.corpus import prompt_for
from feedloop.core.diversity import Diversity, diversity
from feedloop.core.evaluation import keyword_inclusion, perplexity
from feedloop.core.policy import Policy, SampleRequest, TokenBatch, token_logprobs
from feedloop.core.sampling import SamplingParams
from feedloop.core.store.base import SERVED_EXPLORATION, GenerationRecord
from feedloop.trainer import rl_math
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.reward_model import FittedRewardModel

DR_TARGET_SAMPLES = 2  # samples per held-out prompt for the direct-method term
# Samples per prompt for the diversity figures: a collapse shows as one phrase for a prompt.
DIVERSITY_CANDIDATES = 4


@dataclass
class GateReport:
    passed: bool
    reasons: list[str]
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons)


def heldout_pairs(test_phrases: Sequence[str], seed: int) -> list[tuple[str, str]]:
    """(prompt, phrase) pairs of the test split, prompts fixed by the seed."""
    rng = random.Random(seed)
    pairs = []
    for phrase in test_phrases:
        prompt = prompt_for(phrase, rng)
        if prompt is not None:
            pairs.append((prompt, phrase))
    return pairs


@torch.no_grad()
def kl_to_reference(
    policy: Policy, reference: Policy, prompts: Sequence[str], seed: int, max_tokens: int = 16
) -> dict[str, float]:
    """KL(policy || reference) per phrase on the policy's own samples (temperature 1)."""
    requests = [
        SampleRequest(policy.encode_prompt(p), SamplingParams(max_tokens=max_tokens, seed=seed + i))
        for i, p in enumerate(prompts)
    ]
    samples = [outs[0] for outs in policy.sample(requests)]
    prompt_ids = [r.prompt_ids for r in requests]
    outputs = [s.token_ids for s in samples]
    batch = TokenBatch.from_lists(prompt_ids, outputs)
    logprobs = token_logprobs(policy.teacher_forced(batch).logits, batch.output_ids)
    ref = token_logprobs(reference.teacher_forced(batch).logits, batch.output_ids)
    mask = batch.output_mask
    k1 = (rl_math.kl_k1(logprobs, ref) * mask).sum(dim=1)
    k3 = (rl_math.kl_k3(logprobs, ref) * mask).sum(dim=1)
    return {
        "kl_k1": float(k1.mean()),
        "kl_k3": float(k3.mean()),
        "mean_length_tokens": float(mask.sum(dim=1).mean()),
    }


@torch.no_grad()
def sampled_diversity(
    policy: Policy, prompts: Sequence[str], seed: int, max_tokens: int = 16
) -> Diversity:
    """Diversity of `policy`'s own samples (temperature 1): DIVERSITY_CANDIDATES per prompt."""
    requests = [
        SampleRequest(
            policy.encode_prompt(p),
            SamplingParams(max_tokens=max_tokens, seed=seed + i),
            num_candidates=DIVERSITY_CANDIDATES,
        )
        for i, p in enumerate(prompts)
    ]
    samples = [s for outs in policy.sample(requests) for s in outs]
    return diversity(
        [policy.decode(s.token_ids) for s in samples], [sum(s.behaviour_logprobs) for s in samples]
    )


def diversity_refusal(figures: Diversity, config: TrainConfig) -> str | None:
    """Why a candidate whose samples are below the declared diversity floor is refused (a
    collapse onto a few phrases), or None."""
    problems = []
    if not figures.sampled_entropy_nats >= config.gate_min_sampled_entropy_nats:
        problems.append(
            f"sampled entropy {figures.sampled_entropy_nats:.3f} nats per phrase (floor "
            f"{config.gate_min_sampled_entropy_nats})"
        )
    if not figures.distinct_phrase_share >= config.gate_min_distinct_share:
        problems.append(
            f"distinct-phrase share {figures.distinct_phrase_share:.3f} (floor "
            f"{config.gate_min_distinct_share})"
        )
    if not problems:
        return None
    return "collapsing: " + " and ".join(problems) + " on its own samples"


def target_params(record: GenerationRecord) -> SamplingParams:
    """How a target policy would serve the record's request: with its logged parameters, except
    that an explored request left sampling to the server, whose own parameters are the defaults
    (the exploration parameters are the behaviour's, not the policy's)."""
    params = SamplingParams.from_dict(record.sampling)
    if record.served_as == SERVED_EXPLORATION:
        default = SamplingParams()
        return replace(
            params, temperature=default.temperature, top_k=default.top_k, top_p=default.top_p
        )
    return params


@torch.no_grad()
def served_logprobs(policy: Policy, records: Sequence[GenerationRecord]) -> torch.Tensor:
    """Sequence log-probs of logged outputs under `policy` as served with each record's params."""
    batch = TokenBatch.from_lists([r.prompt_ids for r in records], [r.output_ids for r in records])
    logits = policy.teacher_forced(batch).logits
    b, t, v = logits.shape

    params = [target_params(r) for r in records]

    def per_token(values: list[float] | list[int]) -> torch.Tensor:
        return torch.tensor(values).repeat_interleave(t)

    temperature = per_token([p.temperature for p in params])
    top_k = per_token([p.top_k for p in params])
    top_p = per_token([p.top_p for p in params])
    logprobs = sampling.filtered_logprobs(logits.reshape(b * t, v), temperature, top_k, top_p)
    token = logprobs.gather(1, batch.output_ids.reshape(-1, 1)).reshape(b, t)
    token = torch.where(batch.output_mask > 0, token, torch.zeros_like(token))
    return token.sum(dim=1)


def sequence_behaviour_logprobs(records: Sequence[GenerationRecord]) -> torch.Tensor:
    return torch.tensor([sum(r.behaviour_logprobs) for r in records], dtype=torch.float64)


@torch.no_grad()
def direct_method(
    policy: Policy, records: Sequence[GenerationRecord], reward_model: FittedRewardModel, seed: int
) -> torch.Tensor:
    """Reward model's expected reward of `policy`'s samples for each record's prompt."""
    requests = [
        SampleRequest(
            r.prompt_ids,
            replace(target_params(r), seed=seed + i),
            num_candidates=DR_TARGET_SAMPLES,
        )
        for i, r in enumerate(records)
    ]
    outs = policy.sample(requests)
    prompts = [r.prompt for r, o in zip(records, outs, strict=True) for _ in o]
    texts = [policy.decode(s.token_ids) for o in outs for s in o]
    return reward_model.rewards(prompts, texts).reshape(len(records), DR_TARGET_SAMPLES).mean(dim=1)


def off_policy_values(
    policy: Policy,
    records: Sequence[GenerationRecord],
    rewards: torch.Tensor,
    reward_model: FittedRewardModel | None,
    *,
    weight_max: float,
    seed: int,
) -> dict[str, Any]:
    """SNIPS and (with a reward model) doubly robust value of `policy` on logged rewards."""
    log_w = served_logprobs(policy, records).double() - sequence_behaviour_logprobs(records)
    weights = torch.exp(log_w.clamp(max=math.log(weight_max)))
    out: dict[str, Any] = {
        "snips": rl_math.snips(weights, rewards).as_dict(),
        "ess": rl_math.effective_sample_size(weights),
    }
    if reward_model is not None:
        logged = reward_model.rewards([r.prompt for r in records], [r.text for r in records])
        target = direct_method(policy, records, reward_model, seed)
        out["dr"] = rl_math.doubly_robust(weights, rewards, logged, target).as_dict()
        out["dm"] = float(target.mean())
    return out


class Gate:
    """Holds what does not change between rounds: the held-out pairs and the reference."""

    def __init__(self, config: TrainConfig, reference: Policy, test_phrases: Sequence[str]) -> None:
        self.config = config
        self.reference = reference
        self.pairs = heldout_pairs(test_phrases, config.corpus_seed)
        if not self.pairs:
            raise ValueError("the corpus test split has no phrase with a keyword")
        prompts = [p for p, _ in self.pairs]
        self.kl_prompts = [prompts[i % len(prompts)] for i in range(config.gate_kl_prompts)]
        self.diversity_prompts = self.kl_prompts[: config.gate_diversity_prompts]
        self.reference_perplexity = perplexity(reference, self.pairs)
        self._live_cache: tuple[int, float, float] | None = None

    def keyword_inclusion(self, policy: Policy) -> float:
        """Keyword inclusion on the KL's held-out prompts, one seed for every policy (common
        random numbers: two versions' figures differ by the policies, not by the draws)."""
        return keyword_inclusion(policy, self.kl_prompts, seed=self.config.corpus_seed)

    def _live_figures(self, live: Policy) -> tuple[float, float]:
        """Live's perplexity and keyword inclusion, measured once per live policy."""
        if self._live_cache is None or self._live_cache[0] != id(live):
            self._live_cache = (
                id(live),
                perplexity(live, self.pairs),
                self.keyword_inclusion(live),
            )
        return self._live_cache[1], self._live_cache[2]

    def evaluate(
        self,
        candidate: Policy,
        live: Policy,
        heldout: Sequence[tuple[GenerationRecord, float]],
        reward_model: FittedRewardModel | None,
        *,
        seed: int,
        live_version: str,
        recent: Iterable[tuple[str, Policy]] = (),
    ) -> GateReport:
        """Every check on `candidate`; `recent` holds earlier live versions' policies, newest
        first, read only for the off-policy check (so they may be loaded as it goes)."""
        c = self.config
        reasons: list[str] = []
        passed = True
        ppl_candidate = perplexity(candidate, self.pairs)
        ppl_live, inclusion_live = self._live_figures(live)
        ratio_live = ppl_candidate / ppl_live
        ratio_ref = ppl_candidate / self.reference_perplexity
        figures: dict[str, Any] = {
            "perplexity_candidate": ppl_candidate,
            "perplexity_live": ppl_live,
            "perplexity_reference": self.reference_perplexity,
            "perplexity_ratio_live": ratio_live,
            "perplexity_ratio_reference": ratio_ref,
            "keyword_inclusion_candidate": self.keyword_inclusion(candidate),
            "keyword_inclusion_live": inclusion_live,
        }
        if not math.isfinite(ratio_live) or ratio_live > c.gate_max_perplexity_ratio_live:
            passed = False
            reasons.append(
                f"perplexity {ratio_live:.3f}x live's (bound {c.gate_max_perplexity_ratio_live})"
            )
        if not math.isfinite(ratio_ref) or ratio_ref > c.gate_max_perplexity_ratio_reference:
            passed = False
            reasons.append(
                f"perplexity {ratio_ref:.3f}x the reference's (bound "
                f"{c.gate_max_perplexity_ratio_reference})"
            )
        kl = kl_to_reference(candidate, self.reference, self.kl_prompts, seed)
        figures.update({f"candidate_{k}": v for k, v in kl.items()})
        figures["kl_to_reference"] = kl["kl_k3"]
        if not kl["kl_k3"] <= c.gate_max_kl:
            passed = False
            reasons.append(f"KL to reference {kl['kl_k3']:.3f} nats (limit {c.gate_max_kl})")

        spread = sampled_diversity(candidate, self.diversity_prompts, seed)
        figures["candidate_sampled_entropy_nats"] = spread.sampled_entropy_nats
        figures["candidate_distinct_phrase_share"] = spread.distinct_phrase_share
        collapse = diversity_refusal(spread, c)
        if collapse is not None:
            passed = False
            reasons.append(collapse)

        figures["ope_heldout"] = len(heldout)
        if len(heldout) >= c.gate_min_ope_samples:
            refusal = self._off_policy_check(
                candidate, live_version, live, recent, heldout, reward_model, seed, figures
            )
            if refusal is not None:
                passed = False
                reasons.append(refusal)
        else:
            reasons.append(
                f"no off-policy check: {len(heldout)} held-out rated generations "
                f"(< {c.gate_min_ope_samples})"
            )
        if passed:
            reasons.insert(
                0,
                f"passed: perplexity {ratio_live:.3f}x live, {ratio_ref:.3f}x "
                f"reference; KL {kl['kl_k3']:.3f} nats",
            )
        return GateReport(passed, reasons, figures)

    def _off_policy_check(
        self,
        candidate: Policy,
        live_version: str,
        live: Policy,
        recent: Iterable[tuple[str, Policy]],
        heldout: Sequence[tuple[GenerationRecord, float]],
        reward_model: FittedRewardModel | None,
        seed: int,
        figures: dict[str, Any],
    ) -> str | None:
        """The candidate's off-policy value against the best of live's and the recent versions'
        on the same records; returns why it is refused, or None. Adds the figures."""
        records = [g for g, _ in heldout]
        rewards = torch.tensor([r for _, r in heldout], dtype=torch.float64)

        def value_of(policy: Policy) -> dict[str, Any]:
            return off_policy_values(
                policy,
                records,
                rewards,
                reward_model,
                weight_max=self.config.gate_ope_weight_max,
                seed=seed,
            )

        cand, live_value = value_of(candidate), value_of(live)
        # One earlier policy at a time: each can be dropped once its value is known.
        earlier = {version: value_of(policy) for version, policy in recent}
        key = "dr" if "dr" in cand else "snips"
        values = {live_version: live_value, **earlier}
        best = best_so_far(values, key)
        figures.update(
            ope_candidate=cand,
            ope_live=live_value,
            ope_recent=earlier,
            ope_estimator=key,
            ope_best_version=best,
        )
        if best is None:
            return None
        best_value = values[best][key]["value"]
        figures["ope_best_value"] = best_value
        if not cand[key]["ci_high"] < best_value:
            return None
        below = f"live {best}'s {best_value:.3f}"
        if best != live_version:
            plural = "s" if len(earlier) != 1 else ""
            below = (
                f"{best}'s {best_value:.3f}, the best of live {live_version} and "
                f"{len(earlier)} earlier live version{plural}"
            )
        return (
            f"off-policy reward ({key}) {cand[key]['value']:.3f} "
            f"[{cand[key]['ci_low']:.3f}, {cand[key]['ci_high']:.3f}] is clearly below {below}"
        )


def best_so_far(values: dict[str, dict[str, Any]], estimator: str) -> str | None:
    """The version whose `estimator` value is highest (the first of equals, so live wins a tie
    when it comes first); None when no value is finite (SNIPS with every weight 0)."""
    finite = {
        version: ope[estimator]["value"]
        for version, ope in values.items()
        if math.isfinite(ope[estimator]["value"])
    }
    return max(finite, key=finite.__getitem__) if finite else None

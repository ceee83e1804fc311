"""Off-policy correction proven on traffic that is not the policy being trained.

The simulated users here are served by an OLDER version than live (the one being trained), with
tempered, top-k and top-p sampling: the behaviour distribution mu is then neither the live
policy nor the older version's raw softmax. Through the real data path (store, window,
signals, experience) and a real round, actor-critic's importance weights must be
min(rho_bar, pi_old / mu) with mu that served distribution, worked out here independently from
the older version's logits: inverting the ratio, or taking the logged raw log-probs for mu,
fails these tests (each was checked by mutating the code once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_support import Env, env, fast_config, one_torch_thread, simulation

from feedloop.core import sampling
from feedloop.core.checkpoint import load_checkpoint, save_checkpoint
from feedloop.core.policy import Policy, TokenBatch, token_logprobs
from feedloop.core.sampling import SamplingParams
from feedloop.demo.simusers import IncludeWord
from feedloop.trainer.algorithms import ActorCritic
from feedloop.trainer.gate import sequence_behaviour_logprobs, served_logprobs
from feedloop.trainer.loop import Trainer
from feedloop.trainer.update import Experience

__all__ = ["env", "one_torch_thread"]
TEMPERED = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=16)
PREF = IncludeWord("little")


def publish_moved_live(env: Env, tmp_path: Path) -> tuple[Policy, Policy]:
    """v0002, a perturbed child of v0001, made live: (older v0001, live v0002)."""
    older, _ = load_checkpoint(env.registry.checkpoint_dir("v0001"))
    live, _ = load_checkpoint(env.registry.checkpoint_dir("v0001"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bias = live.output.bias  # type: ignore[union-attr]
        bias += 0.7 * torch.randn(bias.shape, generator=generator)
    save_checkpoint(live, tmp_path / "moved", parent_version="v0001")
    assert env.registry.publish(tmp_path / "moved", reason="moved", make_live=True) == "v0002"
    return older, live


def capture_prepare(trainer: Trainer) -> list[tuple[Experience, Any]]:
    """Record what the round's algorithm was given and what it prepared (the real code runs)."""
    seen: list[tuple[Experience, Any]] = []
    real = trainer.algorithm.prepare

    def spy(policy: Policy, reference: Policy, experience: Experience, kl_coef: float) -> Any:
        prepared = real(policy, reference, experience, kl_coef)
        seen.append((experience, prepared))
        return prepared

    trainer.algorithm.prepare = spy  # type: ignore[method-assign]
    return seen


@torch.no_grad()
def served_token_logprobs(
    policy: Policy, batch: TokenBatch, params: SamplingParams
) -> torch.Tensor:
    """log mu per token: the policy's logits through the sampler's temperature/top-k/top-p."""
    logits = policy.teacher_forced(batch).logits
    b, t, v = logits.shape
    n = b * t
    logprobs = sampling.filtered_logprobs(
        logits.reshape(n, v),
        torch.full((n,), params.temperature),
        torch.full((n,), params.top_k),
        torch.full((n,), params.top_p),
    )
    token = logprobs.gather(1, batch.output_ids.reshape(-1, 1)).reshape(b, t)
    return torch.where(batch.output_mask > 0, token, torch.zeros_like(token))


def test_actor_critic_weights_tempered_filtered_traffic_from_an_older_version_by_pi_over_mu(
    env: Env, tmp_path: Path
) -> None:
    older, live = publish_moved_live(env, tmp_path)
    sim = simulation(env, PREF)
    sim.sampling, sim.version_lag = TEMPERED, 1
    sim.serve_events(40)
    assert {g.model_version for g in env.store.generations_after(0, 10_000)} == {"v0001"}

    config = fast_config(env.root, importance_weight_max=2.0)
    trainer = Trainer(config, env.store, env.registry, log=lambda _: None)
    assert isinstance(trainer.algorithm, ActorCritic)
    seen = capture_prepare(trainer)
    result = trainer.run_round()
    assert result.outcome in ("published", "refused"), result.reason
    ((experience, prepared),) = seen

    batch, mask = experience.batch, experience.batch.output_mask
    mu = served_token_logprobs(older, batch, TEMPERED)
    with torch.no_grad():
        pi_old = token_logprobs(live.teacher_forced(batch).logits, batch.output_ids) * mask
        raw_older = token_logprobs(older.teacher_forced(batch).logits, batch.output_ids) * mask
    # The data path hands the algorithm the served distribution's log-probs...
    torch.testing.assert_close(experience.behaviour_logprobs * mask, mu, atol=1e-5, rtol=1e-5)
    # ...and actor-critic weights each token by pi_old / mu, truncated at rho-bar.
    expected = torch.exp(pi_old - mu).clamp(max=2.0) * mask
    torch.testing.assert_close(prepared.importance, expected, atol=1e-5, rtol=1e-4)
    assert prepared.figures["mean_importance_weight"] == pytest.approx(
        float((expected * mask).sum() / mask.sum()), abs=1e-5
    )

    # The test has teeth: the wrong behaviour or the inverted ratio give clearly other weights.
    def mean(w: torch.Tensor) -> float:
        return float((w * mask).sum() / mask.sum())

    right = mean(expected)
    assert abs(mean(torch.exp(pi_old - raw_older).clamp(max=2.0)) - right) > 0.05
    assert abs(mean(torch.exp(mu - pi_old).clamp(max=2.0)) - right) > 0.05


def test_a_q_learning_candidate_is_served_with_the_exact_behaviour_logprobs_it_sampled_from(
    env: Env,
) -> None:
    """The soft-Q policy is softmax(logits) like the others: it goes through the same sampler,
    and what is logged for it is the tempered and filtered distribution it sampled from."""
    simulation(env, PREF).serve_events(40)
    config = fast_config(env.root, algorithm="q-learning")
    result = Trainer(config, env.store, env.registry, log=lambda _: None).run_round()
    assert result.outcome == "published", result.reason
    assert env.registry.manifest("v0002").training_summary["algorithm"] == "q-learning"
    for figure in ("bellman_loss", "path_consistency_loss", "mean_q", "approx_kl"):
        assert result.figures[figure] is not None, figure

    sim = simulation(env, PREF, seed=4)
    sim.sampling_mix = [TEMPERED, SamplingParams(top_p=0.8, max_tokens=16)]
    sim.serve_events(20)
    records = [g for g in env.store.generations_after(0, 10_000) if g.model_version == "v0002"]
    assert records and {r.sampling["temperature"] for r in records} == {0.7, 1.0}
    served, _ = load_checkpoint(env.registry.checkpoint_dir("v0002"))
    torch.testing.assert_close(
        served_logprobs(served, records).double(),
        sequence_behaviour_logprobs(records),
        atol=1e-4,
        rtol=1e-5,
    )

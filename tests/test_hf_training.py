"""Training rounds on the tiny Hugging Face policy: every RL algorithm, and the exact-log-prob
figure (the logged behaviour log-probs against the trainer's recompute) as a round's metric."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest
from trainer_support import Env, fast_config, hf_env, one_torch_thread, simulation

pytest.importorskip("transformers")

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.hf_policy import HFCausalPolicy
from feedloop.demo.simusers import IncludeWord
from feedloop.trainer.algorithms import ALGORITHMS
from feedloop.trainer.loop import Trainer
from feedloop.trainer.metrics import TrainerMetrics
from feedloop.trainer.mismatch import summarise, token_gaps

__all__ = ["hf_env", "one_torch_thread"]


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_trains_and_publishes_the_hf_policy(hf_env: Env, algorithm: str) -> None:
    simulation(hf_env, IncludeWord("little"), requests_per_batch=8).serve_events(24)
    metrics = TrainerMetrics()
    config = fast_config(hf_env.root, algorithm=algorithm, gate_max_perplexity_ratio_live=10.0)
    trainer = Trainer(config, hf_env.store, hf_env.registry, log=lambda _: None, metrics=metrics)
    result = trainer.run_round()

    assert result.outcome == "published", result.reason
    summary = hf_env.registry.manifest(result.version).training_summary
    assert summary["update_steps"] > 0
    # the served (here: simulated-served) log-probs are the trainer's, token for token
    assert summary["logprob_mismatch_tokens"] > 0
    assert summary["logprob_mismatch_max"] < 1e-5
    text = generate_latest(metrics.registry).decode()
    assert 'feedloop_trainer_behaviour_logprob_mismatch_nats{stat="max"}' in text
    candidate, manifest = load_checkpoint(hf_env.registry.checkpoint_dir(result.version))
    assert isinstance(candidate, HFCausalPolicy)
    assert manifest.parent_version == "v0001"
    live, _ = load_checkpoint(hf_env.registry.checkpoint_dir("v0001"))
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(candidate.state_dict().values(), live.state_dict().values(), strict=True)
    ]
    assert max(moved) > 0  # the update changed the weights


def test_the_mismatch_figure_is_the_max_and_mean_absolute_token_gap() -> None:
    gaps = token_gaps([[-1.0, -2.0], [-0.5]], [[-1.0, -2.5], [-0.25]])
    assert gaps == [0.0, 0.5, 0.25]
    result = summarise(gaps)
    assert result is not None
    assert (result.tokens, result.max_abs, result.mean_abs) == (3, 0.5, 0.25)
    assert summarise([]) is None


def test_a_correction_is_learned_under_the_checkpoints_prompt_template(hf_checkpoint: Path) -> None:
    from feedloop.core.checkpoint import load_checkpoint
    from feedloop.core.tokenizer import EOS_ID
    from feedloop.trainer.data import build_experience
    from feedloop.trainer.rewards import CorrectionTarget

    policy, _ = load_checkpoint(hf_checkpoint)
    tokenizer = policy.tokenizer
    experience, skipped = build_experience(
        tokenizer, [], [CorrectionTarget("ocean", "a calm sea", 1.0)]
    )
    assert experience is not None and experience.corrections is not None and skipped == 0
    prompt = tokenizer.encode_prompt("ocean")
    assert experience.corrections.prompt_ids[0, : len(prompt)].tolist() == prompt
    assert prompt != tokenizer.encode("ocean")  # the template, not the bare keyword
    target = [*tokenizer.encode("a calm sea"), EOS_ID]
    assert experience.corrections.output_ids[0].tolist() == target

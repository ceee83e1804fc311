"""The server's exploration share: which requests are explored, with what, and what is logged.

An explored request is served by the live version with the explore_* sampling parameters; its
logged behaviour log-probabilities are those of exactly that distribution (the trainer divides
by them), its record and reply say served_as=exploration, and the feedloop_explore_* metrics
count it. A declared part of the explored requests is served instead by an older version held
beside live, with the request's own parameters, its version and exact log-probabilities logged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from server_harness import running_server, seeded_registry, test_config, wait_until

from feedloop.core import sampling
from feedloop.core.checkpoint import load_checkpoint, save_checkpoint
from feedloop.core.errors import ConfigError
from feedloop.core.exploration import Exploration, exploration_versions
from feedloop.core.policy import Policy, TokenBatch
from feedloop.core.sampling import SamplingParams
from feedloop.core.store.base import GenerationRecord
from feedloop.server.config import ServeConfig
from feedloop.v1 import feedloop_pb2 as pb


def token_logprobs_under(
    policy: Policy, record: GenerationRecord, p: SamplingParams
) -> list[float]:
    """Per-token log-probs of the record's output under `policy` sampled with `p`."""
    batch = TokenBatch.from_lists([record.prompt_ids], [record.output_ids])
    with torch.no_grad():
        logits = policy.teacher_forced(batch).logits[0, : len(record.output_ids)]
    n = logits.shape[0]
    logprobs = sampling.filtered_logprobs(
        logits,
        torch.full((n,), p.temperature),
        torch.full((n,), p.top_k),
        torch.full((n,), p.top_p),
    )
    ids = torch.tensor(record.output_ids).unsqueeze(1)
    return logprobs.gather(1, ids).squeeze(1).tolist()


def explore_count(running, arm: str) -> float:
    return running.server.metrics.explore_requests.labels(arm)._value.get()


async def explore_three(running) -> tuple[pb.GenerateResponse, dict[str, GenerationRecord]]:
    """One eligible request for three candidates of 7 tokens, explored by v0001; its reply and
    its logged generations."""
    reply = await running.generation.Generate(
        pb.GenerateRequest(
            prompt="ocean sunrise", num_candidates=3, sampling=pb.SamplingParams(max_tokens=7)
        ),
        timeout=10,
    )
    assert (reply.model_version, reply.served_as) == ("v0001", "exploration")
    await wait_until(lambda: running.server.generation_log.depth == 0)
    return reply, running.store.get_generations([c.generation_id for c in reply.candidates])


async def test_an_explored_request_is_logged_with_the_exploration_distributions_logprobs(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(
        tmp_path, explore_share=1.0, explore_temperature=1.7, explore_top_k=9, explore_top_p=0.9
    )
    async with running_server(config, registry=registry) as running:
        reply, stored = await explore_three(running)
        assert explore_count(running, "exploration") == 1
        assert explore_count(running, "policy") == explore_count(running, "ineligible") == 0
        # Exploration is not what the policy serves: the diversity gauges leave it out.
        assert running.server.metrics.served_diversity.figures().samples == 0
    policy, _ = load_checkpoint(tiny_checkpoint)
    explored = SamplingParams(temperature=1.7, top_k=9, top_p=0.9, max_tokens=7, seed=reply.seed)
    for candidate in reply.candidates:
        record = stored[candidate.generation_id]
        assert record.served_as == "exploration"
        assert SamplingParams.from_dict(record.sampling) == explored
        assert record.behaviour_logprobs == pytest.approx(
            token_logprobs_under(policy, record, explored), abs=1e-4
        )
        # ... which are not the raw policy's (the trainer must never divide by those).
        assert record.behaviour_logprobs != pytest.approx(record.policy_logprobs, abs=1e-3)
        assert record.policy_logprobs == pytest.approx(
            token_logprobs_under(policy, record, SamplingParams()), abs=1e-4
        )


async def test_requests_that_choose_their_sampling_or_version_are_never_explored(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(
        test_config(tmp_path, explore_share=1.0), registry=registry
    ) as running:
        chosen = [
            pb.SamplingParams(temperature=1.0),
            pb.SamplingParams(temperature=0.0),
            pb.SamplingParams(top_k=5),
            pb.SamplingParams(top_p=0.5),
            pb.SamplingParams(seed=42, max_tokens=4),
        ]
        for s in chosen:
            reply = await running.generation.Generate(
                pb.GenerateRequest(prompt="ocean", sampling=s), timeout=10
            )
            assert reply.served_as == "live"
        pinned = await running.generation.Generate(
            pb.GenerateRequest(prompt="ocean", model_version="v0001"), timeout=10
        )
        assert pinned.served_as == "pinned"
        await wait_until(lambda: running.server.generation_log.depth == 0)
        record = running.store.get_generations([pinned.candidates[0].generation_id])
        assert next(iter(record.values())).sampling["temperature"] == 1.0
        assert explore_count(running, "ineligible") == len(chosen) + 1
        assert explore_count(running, "exploration") == 0


async def test_with_no_exploration_share_default_requests_are_served_as_asked(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(
        test_config(tmp_path, explore_share=0.0), registry=registry
    ) as running:
        for _ in range(5):
            reply = await running.generation.Generate(
                pb.GenerateRequest(prompt="ocean"), timeout=10
            )
            assert reply.served_as == "live"
        assert explore_count(running, "policy") == 5
        assert explore_count(running, "exploration") == 0
        # The diversity gauges read what the policy served.
        served = running.server.metrics.served_diversity.figures()
        assert served.samples == 5
        metrics = running.server.metrics.registry
        assert metrics.get_sample_value("feedloop_served_distinct_phrase_share") == (
            served.distinct_phrase_share
        )
        assert metrics.get_sample_value("feedloop_served_sampled_entropy_nats") == pytest.approx(
            served.sampled_entropy_nats
        )


def test_exploration_explores_exactly_the_declared_share_of_uniform_draws() -> None:
    exploration = Exploration(share=0.25, temperature=2.0, top_k=3, top_p=0.5)
    assert [exploration.explores(u) for u in (0.0, 0.2499, 0.25, 0.9)] == [
        True,
        True,
        False,
        False,
    ]
    assert not Exploration(share=0.0).explores(0.0)
    asked = SamplingParams(temperature=0.7, max_tokens=5, seed=9)
    assert exploration.params(asked) == SamplingParams(
        temperature=2.0, top_k=3, top_p=0.5, max_tokens=5, seed=9
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"explore_share": 1.5}, "explore_share"),
        ({"explore_share": -0.1}, "explore_share"),
        ({"explore_temperature": 0.0}, "explore_temperature"),
        ({"explore_top_k": -1}, "explore_top_k"),
        ({"explore_top_p": 0.0}, "explore_top_p"),
        ({"explore_version_share": 1.5}, "explore_version_share"),
        ({"explore_versions": -1}, "explore_versions"),
    ],
)
def test_bad_exploration_settings_are_refused_naming_the_knob(
    overrides: dict[str, float], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        ServeConfig(**overrides)  # type: ignore[arg-type]


def altered(tiny_checkpoint: Path, directory: Path) -> Path:
    """The tiny policy with every weight scaled by 1.25: another version with other log-probs."""
    policy, _ = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.mul_(1.25)
    save_checkpoint(policy, directory)
    return directory


async def test_an_older_version_explores_with_the_requests_own_parameters_and_is_logged(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    # v0001 (the altered policy) is the older version, v0002 (the tiny one) live.
    older = altered(tiny_checkpoint, tmp_path / "older")
    registry = seeded_registry(tmp_path / "registry", older)
    registry.set_live(registry.publish(tiny_checkpoint, reason="newer"), reason="test")
    config = test_config(tmp_path, explore_share=1.0, explore_version_share=1.0, explore_versions=2)
    async with running_server(config, registry=registry) as running:
        live_model = running.server.live_model
        await wait_until(lambda: [m.version for m in live_model.explorers] == ["v0001"])
        reply, stored = await explore_three(running)
        assert explore_count(running, "older_version") == 1
        assert explore_count(running, "exploration") == 0
        assert running.server.metrics.served_diversity.figures().samples == 0
        assert "v0001" in live_model.loaded_versions() and live_model.live.version == "v0002"
    older_policy, _ = load_checkpoint(older)
    live_policy, _ = load_checkpoint(tiny_checkpoint)
    asked = SamplingParams(max_tokens=7, seed=reply.seed)  # the request's own, not explore_*
    for candidate in reply.candidates:
        record = stored[candidate.generation_id]
        assert (record.model_version, record.served_as) == ("v0001", "exploration")
        assert SamplingParams.from_dict(record.sampling) == asked
        assert record.behaviour_logprobs == pytest.approx(
            token_logprobs_under(older_policy, record, asked), abs=1e-4
        )
        assert record.behaviour_logprobs != pytest.approx(
            token_logprobs_under(live_policy, record, asked), abs=1e-3
        )


async def test_without_an_older_version_the_version_part_explores_with_live(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, explore_share=1.0, explore_version_share=1.0)
    async with running_server(config, registry=registry) as running:
        reply = await running.generation.Generate(pb.GenerateRequest(prompt="ocean"), timeout=10)
        assert (reply.model_version, reply.served_as) == ("v0001", "exploration")
        assert explore_count(running, "exploration") == 1
        assert running.server.live_model.explorers == ()


def test_the_older_versions_are_the_root_then_the_latest_earlier_live_ones() -> None:
    available = ["v1", "v2", "v3", "v5", "v6"]
    previous = ("v1", "v2", "v3", "v4", "v3", "v5")
    assert exploration_versions("v6", previous, "v1", available, 2) == ["v1", "v5"]
    assert exploration_versions("v6", previous, "v1", available, 4) == ["v1", "v5", "v3", "v2"]
    # the trial's version, live itself and pruned versions (v4) never explore
    assert exploration_versions("v6", previous, "v6", available, 3, exclude=["v5"]) == [
        "v3",
        "v2",
        "v1",
    ]
    assert exploration_versions("v6", previous, "v1", available, 0) == []
    exploration = Exploration(share=0.1, version_share=0.5)
    assert [exploration.by_version(u) for u in (0.0, 0.4999, 0.5)] == [True, True, False]

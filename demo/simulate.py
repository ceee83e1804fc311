"""An in-process stand-in for the server and its users, for the trainer's tests and benches.

It plays the server's part exactly where the trainer can see it: it samples from the registry's
live version with the real sampling code, logs GenerationRecords as the server does (behaviour
log-probs of the distribution actually sampled from, raw policy log-probs beside them, the
sampling parameters, the version, the client), writes them to a real replay store, and lets a
simulated user answer each request with feedback that is stored as events.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.corpus import prompt_for
from feedloop.core.exploration import Exploration
from feedloop.core.policy import Policy, SampledOutput, SampleRequest
from feedloop.core.registry import ModelRegistry
from feedloop.core.sampling import SamplingParams
from feedloop.core.store.base import (
    SERVED_EXPLORATION,
    SERVED_LIVE,
    FeedbackRecord,
    GenerationRecord,
    ReplayStore,
)
from feedloop.demo.simusers import Candidate, Preference, SimulatedUser


def corpus_prompts(phrases: Sequence[str], seed: int) -> list[str]:
    """One prompt (one or two keywords) per phrase that has a keyword."""
    rng = random.Random(seed)
    return [p for p in (prompt_for(phrase, rng) for phrase in phrases) if p is not None]


def generation_records(
    policy: Policy,
    version: str,
    prompt: str,
    outputs: Sequence[SampledOutput],
    params: SamplingParams,
    client_id: str,
    rng: random.Random,
    served_as: str = SERVED_LIVE,
) -> list[GenerationRecord]:
    """Records for one request's candidates, as the server logs them (ids drawn from rng)."""
    request_id = new_id(rng)
    return GenerationRecord.from_samples(
        outputs,
        generation_ids=[new_id(rng) for _ in outputs],
        texts=[policy.decode(out.token_ids) for out in outputs],
        request_id=request_id,
        prompt=prompt,
        prompt_ids=policy.encode_prompt(prompt),
        params=params,
        model_version=version,
        client_id=client_id,
        created_at=time.time(),
        served_as=served_as,
    )


def new_id(rng: random.Random) -> str:
    """A random id as the server makes them, but reproducible from a seeded rng."""
    return uuid.UUID(int=rng.getrandbits(128), version=4).hex


def feedback_records(
    user: SimulatedUser, prompt: str, records: Sequence[GenerationRecord], rng: random.Random
) -> list[FeedbackRecord]:
    answers = user.respond(prompt, [Candidate(r.generation_id, r.text) for r in records])
    now = time.time()
    return [
        FeedbackRecord(
            event_id=new_id(rng),
            kind=a.kind,  # type: ignore[arg-type]
            generation_ids=list(a.generation_ids),
            client_id=user.client_id,
            received_at=now,
            score=a.score,
            scale=a.scale,  # type: ignore[arg-type]
            text=a.text,
        )
        for a in answers
    ]


@dataclass
class Simulation:
    """Serves the live version to one simulated user and logs everything to the store.

    Off-policy traffic on request: `sampling_mix` (each request draws one of these parameter
    sets, e.g. tempered, top-k and top-p ones, instead of `sampling`) and `version_lag` (serve
    the live version's ancestor that many parents back, as replicas that have not yet swapped
    do): the behaviour policy then differs from the one being trained, as in production.
    """

    store: ReplayStore
    registry: ModelRegistry
    user: SimulatedUser
    prompts: Sequence[str]
    candidates_per_request: int = 4
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=16))
    seed: int = 0
    requests_per_batch: int = 32
    sampling_mix: Sequence[SamplingParams] = ()
    version_lag: int = 0
    # The server's exploration share, played alike: a share of requests sampled with the
    # exploration parameters and logged as served_as=exploration.
    exploration: Exploration = field(default_factory=Exploration)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._policy: tuple[str, Policy] | None = None
        self.events_stored = 0

    def served_version(self) -> str:
        """Live, or its ancestor `version_lag` parents back (the oldest there is, if fewer)."""
        version = self.registry.live()
        if version is None:
            raise RuntimeError("no live version to serve")
        for _ in range(self.version_lag):
            parent = self.registry.manifest(version).parent_version
            if parent is None:
                break
            version = parent
        return version

    def live_policy(self) -> tuple[str, Policy]:
        """The version served (live unless version_lag says otherwise) and its policy."""
        served = self.served_version()
        if self._policy is None or self._policy[0] != served:
            policy, _ = load_checkpoint(self.registry.checkpoint_dir(served))
            self._policy = (served, policy)
        return self._policy

    def _draw_params(self) -> SamplingParams:
        base = self.rng.choice(list(self.sampling_mix)) if self.sampling_mix else self.sampling
        return replace(base, seed=self.rng.getrandbits(63) or 1)

    def serve_batch(self) -> int:
        """Serve one batch of requests and store their feedback; returns events stored."""
        version, policy = self.live_policy()
        prompts = [self.rng.choice(self.prompts) for _ in range(self.requests_per_batch)]
        params = [self._draw_params() for _ in prompts]
        # No draw at all without exploration: the seeded stream stays what it was before it.
        explored = [
            self.exploration.share > 0 and self.exploration.explores(self.rng.random())
            for _ in prompts
        ]
        params = [
            self.exploration.params(sp) if explore else sp
            for sp, explore in zip(params, explored, strict=True)
        ]
        requests = [
            SampleRequest(policy.encode_prompt(p), sp, self.candidates_per_request)
            for p, sp in zip(prompts, params, strict=True)
        ]
        generations: list[GenerationRecord] = []
        events: list[FeedbackRecord] = []
        outputs = policy.sample(requests)
        for prompt, sp, outs, explore in zip(prompts, params, outputs, explored, strict=True):
            served_as = SERVED_EXPLORATION if explore else SERVED_LIVE
            records = generation_records(
                policy, version, prompt, outs, sp, self.user.client_id, self.rng, served_as
            )
            generations.extend(records)
            events.extend(feedback_records(self.user, prompt, records, self.rng))
        self.store.append_generations(generations)
        self.store.insert_feedback(events)
        self.events_stored += len(events)
        return len(events)

    def serve_events(self, n_events: int) -> int:
        """Serve batches until at least n_events more feedback events are stored."""
        stored = 0
        while stored < n_events:
            stored += self.serve_batch()
        return stored


@torch.no_grad()
def mean_true_reward(
    policy: Policy,
    preference: Preference,
    prompts: Sequence[str],
    *,
    seed: int,
    sampling: SamplingParams | None = None,
) -> float:
    """The preference's mean true reward of one sample per prompt (seeded, batched)."""
    base = sampling or SamplingParams(max_tokens=16)
    requests = [
        SampleRequest(policy.encode_prompt(p), replace(base, seed=seed + i))
        for i, p in enumerate(prompts)
    ]
    outs = policy.sample(requests)
    rewards = [
        preference.reward(policy.decode(o[0].token_ids), p)
        for p, o in zip(prompts, outs, strict=True)
    ]
    return sum(rewards) / max(len(rewards), 1)

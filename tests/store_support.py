"""Hand-built replay store records for the store tests (fake token ids and log-probs suffice)."""

from __future__ import annotations

import dataclasses

from feedloop.core.store import FeedbackRecord, GenerationRecord, ReplayStore
from feedloop.core.store.base import SERVED_LIVE


def generation(gid: str, *, version: str = "v0001", t: float = 1000.0) -> GenerationRecord:
    return GenerationRecord(
        generation_id=gid,
        request_id=f"req-{gid}",
        prompt=f"prompt of {gid}",
        prompt_ids=[2, 17, 33],
        output_ids=[5, 9, 3],
        behaviour_logprobs=[-0.25, -1.125, -0.1],
        policy_logprobs=[-0.5, -1.0, -0.2],
        finished=True,
        text=f"text of {gid}",
        sampling={"temperature": 0.8, "top_k": 20, "top_p": 0.95, "max_tokens": 16, "seed": 7},
        model_version=version,
        client_id="app-1",
        created_at=t,
        candidate_index=0,
        num_candidates=1,
    )


def rating(event_id: str, gid: str, score: float = 0.75) -> FeedbackRecord:
    return FeedbackRecord(
        event_id=event_id,
        kind="rating",
        generation_ids=[gid],
        client_id="app-1",
        received_at=2000.0,
        score=score,
        scale="unit",
        given_at=1999.5,
    )


def comparison(event_id: str, preferred: str, rejected: str) -> FeedbackRecord:
    return FeedbackRecord(
        event_id=event_id,
        kind="comparison",
        generation_ids=[preferred, rejected],
        client_id="app-2",
        received_at=2001.0,
    )


def rate_version(
    store: ReplayStore, version: str, scores: list[float], at: float, served_as: str = SERVED_LIVE
) -> None:
    """One generation of `version` (served as `served_as`) per score, each rated that score on
    the unit scale, received from `at` on, a millisecond apart (call it once per version and
    served_as: the ids repeat)."""
    prefix = version if served_as == SERVED_LIVE else f"{version}-{served_as}"
    ids = [f"{prefix}-{i}" for i in range(len(scores))]  # version-i: the shadow tests' ids
    served = [generation(g, version=version, t=at) for g in ids]
    store.append_generations([dataclasses.replace(g, served_as=served_as) for g in served])
    events: list[FeedbackRecord] = []
    for i, (gid, score) in enumerate(zip(ids, scores, strict=True)):
        event = rating(f"e-{gid}", gid, score)
        event.received_at = at + i * 1e-3
        events.append(event)
    store.insert_feedback(events)

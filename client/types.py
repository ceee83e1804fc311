"""What the client hands back and takes in: plain frozen dataclasses, converted from/to protos.

Callers never touch generated messages. Feedback events made here get their `event_id` (a uuid4)
when they are converted, once, before the first attempt, so every retry repeats the same id and
the server stores the event once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from feedloop.client.errors import FeedloopClientError
from feedloop.v1 import feedloop_pb2 as pb

Outcome = Literal["accepted", "duplicate"]

# Names accepted for a rating's scale, and what each means (see RatingScale in the proto).
RATING_SCALES: dict[str, int] = {
    "unit": pb.RATING_SCALE_UNIT,  # a value in [0, 1]
    "thumbs": pb.RATING_SCALE_THUMBS,  # 0 = down, 1 = up
    "stars5": pb.RATING_SCALE_STARS_5,  # 1 to 5
}

# Names accepted for a trial's mode (see TrialMode in the proto).
TRIAL_MODES: dict[str, int] = {
    "canary": pb.TRIAL_MODE_CANARY,  # serves its share of the traffic
    "shadow": pb.TRIAL_MODE_SHADOW,  # serves nothing, scores its share of live candidates
}


# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Candidate:
    generation_id: str
    text: str
    tokens: tuple[str, ...]
    log_prob: float  # natural log, under the distribution actually sampled from
    finished: bool  # False when max_tokens cut the phrase
    # One per token, under the same distribution, when generate(token_logprobs=True); else ().
    token_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class GenerateResult:
    request_id: str
    model_version: str  # the one version that produced every candidate
    candidates: tuple[Candidate, ...]
    seed: int
    served_as: str  # why that version served it: live, canary or pinned

    @classmethod
    def from_proto(cls, reply: pb.GenerateResponse) -> GenerateResult:
        return cls(
            request_id=reply.request_id,
            model_version=reply.model_version,
            candidates=tuple(
                Candidate(
                    c.generation_id,
                    c.text,
                    tuple(c.tokens),
                    c.log_prob,
                    c.finished,
                    tuple(c.token_logprobs),
                )
                for c in reply.candidates
            ),
            seed=reply.seed,
            served_as=reply.served_as,
        )


@dataclass(frozen=True)
class FeedbackResult:
    event_id: str
    outcome: Outcome

    @property
    def duplicate(self) -> bool:
        return self.outcome == "duplicate"

    @classmethod
    def from_proto(cls, ack: pb.FeedbackAck) -> FeedbackResult:
        if ack.outcome == pb.FEEDBACK_OUTCOME_DUPLICATE:
            return cls(ack.event_id, "duplicate")
        if ack.outcome == pb.FEEDBACK_OUTCOME_ACCEPTED:
            return cls(ack.event_id, "accepted")
        raise FeedloopClientError(
            grpc.StatusCode.INTERNAL, f"server acknowledged {ack.event_id!r} with no outcome"
        )


def time_of(ts: Timestamp, present: bool) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if present else None


def _json(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


@dataclass(frozen=True)
class TrialInfo:
    """A version on trial beside the live one."""

    version: str
    mode: str  # one of TRIAL_MODES
    share: float  # of traffic served (canary) or scored (shadow), in [0, 1]
    since: datetime | None
    parent_version: str  # the live version when the trial started

    @classmethod
    def from_proto(cls, trial: pb.Trial, present: bool) -> TrialInfo | None:
        if not present:
            return None
        modes = {number: name for name, number in TRIAL_MODES.items()}
        return cls(
            version=trial.version,
            mode=modes.get(trial.mode, "canary"),
            share=trial.share,
            since=time_of(trial.since, trial.HasField("since")),
            parent_version=trial.parent_version,
        )


@dataclass(frozen=True)
class RegistryStateResult:
    """The registry's live pointer after a trial or pause call."""

    live_version: str
    trial: TrialInfo | None
    trainer_paused: bool

    @classmethod
    def from_proto(cls, reply: pb.RegistryState) -> RegistryStateResult:
        return cls(
            reply.live_version,
            TrialInfo.from_proto(reply.trial, reply.HasField("trial")),
            reply.trainer_paused,
        )


@dataclass(frozen=True)
class PinsResult:
    """The pins after a pin or unpin call; changed is False when nothing needed to change."""

    changed: bool
    pinned_versions: tuple[str, ...]

    @classmethod
    def from_proto(cls, reply: pb.SetPinnedResponse) -> PinsResult:
        return cls(reply.changed, tuple(reply.pinned_versions))


@dataclass(frozen=True)
class ModelInfo:
    version: str
    parent_version: str
    created_at: datetime | None
    architecture: str
    parameter_count: int
    summary: dict[str, Any]
    live: bool
    pinned: bool = False


@dataclass(frozen=True)
class DecisionInfo:
    at: datetime | None
    version: str
    # published, promoted, refused, rolled_back, canary, shadow, paused, resumed, pinned,
    # unpinned, pruned
    action: str
    reason: str
    details: dict[str, Any]


@dataclass(frozen=True)
class ModelsResult:
    live_version: str
    versions: tuple[ModelInfo, ...]  # newest first
    decisions: tuple[DecisionInfo, ...]  # newest first
    trial: TrialInfo | None
    trainer_paused: bool

    @classmethod
    def from_proto(cls, reply: pb.ListModelsResponse) -> ModelsResult:
        return cls(
            live_version=reply.live_version,
            trial=TrialInfo.from_proto(reply.trial, reply.HasField("trial")),
            trainer_paused=reply.trainer_paused,
            versions=tuple(
                ModelInfo(
                    version=v.version,
                    parent_version=v.parent_version,
                    created_at=time_of(v.created_at, v.HasField("created_at")),
                    architecture=v.architecture,
                    parameter_count=v.parameter_count,
                    summary=_json(v.summary_json),
                    live=v.live,
                    pinned=v.pinned,
                )
                for v in reply.versions
            ),
            decisions=tuple(
                DecisionInfo(
                    at=time_of(d.at, d.HasField("at")),
                    version=d.version,
                    action=d.action,
                    reason=d.reason,
                    details=_json(d.details_json),
                )
                for d in reply.decisions
            ),
        )


@dataclass(frozen=True)
class StatusResult:
    live_version: str
    loaded_versions: tuple[str, ...]
    uptime_s: float
    generations_served: int
    feedback_accepted: int
    feedback_duplicates: int
    swaps_succeeded: int
    swaps_refused: int
    queue_depth: int
    server_version: str
    trial: TrialInfo | None  # as this replica last read the registry
    trainer_paused: bool

    @classmethod
    def from_proto(cls, reply: pb.ServerStatus) -> StatusResult:
        return cls(
            live_version=reply.live_version,
            loaded_versions=tuple(reply.loaded_versions),
            uptime_s=reply.uptime_s,
            generations_served=reply.generations_served,
            feedback_accepted=reply.feedback_accepted,
            feedback_duplicates=reply.feedback_duplicates,
            swaps_succeeded=reply.swaps_succeeded,
            swaps_refused=reply.swaps_refused,
            queue_depth=reply.queue_depth,
            server_version=reply.server_version,
            trial=TrialInfo.from_proto(reply.trial, reply.HasField("trial")),
            trainer_paused=reply.trainer_paused,
        )


@dataclass(frozen=True)
class SetLiveResult:
    live_version: str
    previous_version: str

    @classmethod
    def from_proto(cls, reply: pb.SetLiveResponse) -> SetLiveResult:
        return cls(reply.live_version, reply.previous_version)


# ----------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Rating:
    generation_id: str
    score: float
    scale: str = "unit"  # one of RATING_SCALES
    event_id: str | None = None
    given_at: datetime | None = None


@dataclass(frozen=True)
class Ranking:
    generation_ids: Sequence[str]  # best first
    event_id: str | None = None
    given_at: datetime | None = None


@dataclass(frozen=True)
class Comparison:
    preferred_id: str
    rejected_id: str
    event_id: str | None = None
    given_at: datetime | None = None


@dataclass(frozen=True)
class Correction:
    generation_id: str
    text: str  # what the phrase should have been
    event_id: str | None = None
    given_at: datetime | None = None


FeedbackInput: TypeAlias = Rating | Ranking | Comparison | Correction | pb.FeedbackEvent


def new_event_id() -> str:
    return uuid.uuid4().hex


def scale_number(scale: str | int) -> int:
    if isinstance(scale, int):
        return scale
    try:
        return RATING_SCALES[scale]
    except KeyError:
        raise FeedloopClientError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"rating scale {scale!r} is not one of {', '.join(RATING_SCALES)}",
        ) from None


def start_trial_request(
    version: str, share: float, mode: str, reason: str, expected_live_version: str | None
) -> pb.StartTrialRequest:
    if mode not in TRIAL_MODES:
        raise FeedloopClientError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"trial mode {mode!r} is not one of {', '.join(TRIAL_MODES)}",
        )
    return pb.StartTrialRequest(
        version=version,
        mode=TRIAL_MODES[mode],  # type: ignore[arg-type]  # enum is an int
        share=share,
        reason=reason,
        expected_live_version=expected_live_version or "",
    )


def event_to_proto(event: FeedbackInput) -> pb.FeedbackEvent:
    """The proto for one event, with its event_id fixed (made here if the caller gave none)."""
    if isinstance(event, pb.FeedbackEvent):
        if event.event_id:
            return event
        copy = pb.FeedbackEvent()
        copy.CopyFrom(event)
        copy.event_id = new_event_id()
        return copy
    message = pb.FeedbackEvent(event_id=event.event_id or new_event_id())
    match event:
        case Rating():
            message.rating.CopyFrom(
                pb.Rating(
                    generation_id=event.generation_id,
                    score=float(event.score),
                    scale=scale_number(event.scale),  # type: ignore[arg-type]  # enum is an int
                )
            )
        case Ranking():
            message.ranking.generation_ids.extend(event.generation_ids)
        case Comparison():
            message.comparison.CopyFrom(
                pb.Comparison(preferred_id=event.preferred_id, rejected_id=event.rejected_id)
            )
        case Correction():
            message.correction.CopyFrom(
                pb.Correction(generation_id=event.generation_id, text=event.text)
            )
        case _:
            raise TypeError(f"not a feedback event: {event!r}")
    if event.given_at is not None:
        message.given_at.FromDatetime(event.given_at)
    return message


@dataclass(frozen=True)
class Sampling:
    """Sampling knobs for generate; None means the server's default."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


def generate_request(
    prompt: str,
    n: int,
    sampling: Sampling,
    model_version: str | None,
    request_id: str | None,
    routing_key: str | None,
    token_logprobs: bool = False,
    end_user: str | None = None,
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt,
        num_candidates=n,
        sampling=pb.SamplingParams(
            # None leaves it unset (the server's default); a set 0 asks for greedy decoding.
            temperature=sampling.temperature,
            top_k=sampling.top_k or 0,
            top_p=sampling.top_p or 0.0,
            max_tokens=sampling.max_tokens or 0,
            seed=sampling.seed or 0,
        ),
        model_version=model_version or "",
        request_id=request_id or "",
        routing_key=routing_key or "",
        return_token_logprobs=token_logprobs,
        end_user=end_user or "",
    )


__all__ = [
    "RATING_SCALES",
    "TRIAL_MODES",
    "Candidate",
    "Comparison",
    "Correction",
    "DecisionInfo",
    "FeedbackInput",
    "FeedbackResult",
    "GenerateResult",
    "ModelInfo",
    "ModelsResult",
    "Ranking",
    "Rating",
    "RegistryStateResult",
    "Sampling",
    "SetLiveResult",
    "StatusResult",
    "TrialInfo",
    "event_to_proto",
]

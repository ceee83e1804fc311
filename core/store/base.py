"""The replay store's records and interface: where the server logs and the trainer reads.

Backends (`feedloop.core.store.factory.open_store` picks one from a path or URL):
- SQLite in WAL mode (`feedloop.core.store.sqlite`): the embedded default, no set-up;
- PostgreSQL via psycopg 3 (`feedloop.core.store.postgres`): shared by server replicas and the
  trainer.

Promises every backend keeps (one test suite runs on both):
- `insert_feedback` returns only after its events are durable (committed with fsync), and a
  repeated event_id is reported as a duplicate and stored once.
- `append_generations` writes a batch in one transaction (the server's group commit).
- Every row gets a store-assigned, strictly increasing `seq`: the trainer's cursors use it.
- A client's data can be erased (`erase_client`); the erasure is recorded without the content.
- Write failures raise StoreUnavailableError (StoreFullError when the disk is full), so the
  server can answer UNAVAILABLE/RESOURCE_EXHAUSTED; nothing half-written remains.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from feedloop.core.feedback_kinds import FeedbackKind, RatingScaleName
from feedloop.core.store.outcomes import (
    JudgedGeneration,
    ShadowEvidence,
    VersionOutcomes,
    rated_generations,
    tally_outcomes,
)

if TYPE_CHECKING:  # both import torch, which reading and writing records never needs
    from feedloop.core.policy import SampledOutput
    from feedloop.core.sampling import SamplingParams


# Why a generation's model version served it (GenerationRecord.served_as): the live version, the
# version on canary trial for its share of the traffic, the version the request named, or the live
# version sampled with the server's exploration parameters (feedloop.core.exploration). Stored
# rows from before it was recorded hold "".
SERVED_LIVE, SERVED_CANARY, SERVED_PINNED, SERVED_EXPLORATION = (
    "live",
    "canary",
    "pinned",
    "exploration",
)


@dataclass(frozen=True)
class GenerationRecord:
    """One served candidate, with everything off-policy learning needs."""

    generation_id: str
    request_id: str
    prompt: str
    prompt_ids: list[int]
    # Output token ids, including the final <eos> when `finished`.
    output_ids: list[int]
    # Per output token: log-prob under the distribution actually sampled from (behaviour
    # policy, after temperature/top-k/top-p) and under the raw policy.
    behaviour_logprobs: list[float]
    policy_logprobs: list[float]
    finished: bool
    text: str
    # The request's SamplingParams.to_dict(), its seed resolved (read back with from_dict).
    sampling: dict[str, Any]
    model_version: str
    client_id: str
    created_at: float  # Unix seconds
    candidate_index: int = 0
    num_candidates: int = 1
    served_as: str = SERVED_LIVE  # one of the SERVED_* reasons
    seq: int = 0  # assigned by the store; 0 before it is stored

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[SampledOutput],
        *,
        generation_ids: Sequence[str],
        texts: Sequence[str],
        request_id: str,
        prompt: str,
        prompt_ids: list[int],
        params: SamplingParams,
        model_version: str,
        client_id: str,
        created_at: float,
        served_as: str = SERVED_LIVE,
    ) -> list[GenerationRecord]:
        """The records of one request's candidates, one per sample, in the samples' order."""
        sampling = params.to_dict()
        return [
            cls(
                generation_id=generation_id,
                request_id=request_id,
                prompt=prompt,
                prompt_ids=prompt_ids,
                output_ids=sample.token_ids,
                behaviour_logprobs=sample.behaviour_logprobs,
                policy_logprobs=sample.policy_logprobs,
                finished=sample.finished,
                text=text,
                sampling=sampling,
                model_version=model_version,
                client_id=client_id,
                created_at=created_at,
                candidate_index=index,
                num_candidates=len(samples),
                served_as=served_as,
            )
            for index, (sample, generation_id, text) in enumerate(
                zip(samples, generation_ids, texts, strict=True)
            )
        ]


@dataclass(frozen=True)
class ShadowScore:
    """A live generation's output scored by a version on shadow trial, which never served it.

    logprobs: per output token, under the shadow version's distribution with the generation's
    own sampling parameters (as its behaviour_logprobs are under the serving version's), so
    exp(logprob - sum(behaviour_logprobs)) is the generation's exact importance ratio for the
    shadow version. -inf for a token the shadow version's top-k/top-p would have filtered.
    """

    generation_id: str
    version: str
    logprobs: list[float]
    created_at: float  # Unix seconds

    @property
    def logprob(self) -> float:
        """The whole output's log-probability under the shadow version."""
        return sum(self.logprobs)


@dataclass(slots=True)
class FeedbackRecord:
    """One feedback event as stored.

    generation_ids: rating and correction: [the id]; ranking: best first; comparison:
    [preferred, rejected].

    Not frozen, unlike GenerationRecord: the server builds one per event on its event loop, and
    a frozen dataclass's __init__ (object.__setattr__ per field) costs several times as much.
    Treat it as a value all the same: nothing changes one once built.
    """

    event_id: str
    kind: FeedbackKind
    generation_ids: list[str]
    client_id: str
    received_at: float  # Unix seconds, server clock
    score: float | None = None  # rating only, on its own scale
    scale: RatingScaleName | None = None  # rating only
    text: str | None = None  # correction only
    given_at: float | None = None  # when the user gave it, if the app said
    seq: int = 0  # assigned by the store


@dataclass(frozen=True)
class ErasureRecord:
    """What `erase_client` deleted, as recorded in the store: who asked, when, how many rows;
    never the content. Counts of zero: nothing was found and nothing changed (not recorded)."""

    client_id: str
    requested_by: str
    erased_at: float  # Unix seconds
    generations: int
    feedback: int
    shadow_scores: int

    @property
    def found(self) -> bool:
        return self.generations > 0 or self.feedback > 0


@dataclass(frozen=True)
class StoreCounts:
    generations: int
    feedback: int
    feedback_by_kind: dict[str, int] = field(default_factory=dict)


class ReplayStore(ABC):
    """Durable log of generations and feedback. Methods are blocking: call them off the loop."""

    @abstractmethod
    def append_generations(self, records: Sequence[GenerationRecord]) -> None:
        """Store a batch of generations in one transaction (ids are unique; repeats ignored)."""

    @abstractmethod
    def append_shadow_scores(self, scores: Sequence[ShadowScore]) -> None:
        """Store shadow scores in one transaction (a repeated (version, generation) is ignored)."""

    @abstractmethod
    def shadow_scores(self, version: str, generation_ids: Sequence[str]) -> dict[str, ShadowScore]:
        """This version's stored shadow scores of these generations, by generation id."""

    @abstractmethod
    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[bool]:
        """Store events durably in one transaction; True per event if new, False if duplicate.

        Returns only once the events are committed. Validation (ids exist etc.) is the caller's.
        """

    @abstractmethod
    def get_generations(self, generation_ids: Sequence[str]) -> dict[str, GenerationRecord]:
        """The stored generations among these ids."""

    @abstractmethod
    def generations_after(self, seq: int, limit: int) -> list[GenerationRecord]:
        """Generations with seq > seq, oldest first, at most limit."""

    @abstractmethod
    def sample_generations(self, before_seq: int, n: int, seed: int) -> list[GenerationRecord]:
        """A uniform random sample (seeded) of up to n generations with seq <= before_seq."""

    @abstractmethod
    def feedback_after(self, seq: int, limit: int) -> list[FeedbackRecord]:
        """Feedback events with seq > seq, oldest first, at most limit."""

    @abstractmethod
    def feedback_for(self, generation_ids: Sequence[str]) -> list[FeedbackRecord]:
        """Every event that names any of these generations, oldest first."""

    @abstractmethod
    def judged_generations(
        self, since: float, until: float | None = None
    ) -> list[JudgedGeneration]:
        """Every (rating, comparison or ranking event received in [since, until), generation it
        names) with that generation's model version, ordered by event, then position."""

    def online_outcomes(
        self, since: float, until: float | None = None, versions: Collection[str] | None = None
    ) -> dict[str, VersionOutcomes]:
        """Feedback received in [since, until) tallied by its generations' model versions.

        versions: report only these (each one, even without feedback); None: every version that
        has some. How events count: `feedloop.core.store.outcomes`.
        """
        return tally_outcomes(self.judged_generations(since, until), versions)

    def shadow_evidence(
        self, version: str, served_by: str, judged: Iterable[JudgedGeneration]
    ) -> list[ShadowEvidence]:
        """Of the generations served by `served_by` and rated in `judged` (judged_generations'
        rows, which the caller has usually tallied already), those the shadow `version` scored:
        each one's mean normalised rating and both log-probabilities."""
        rated = {
            generation_id: rating
            for generation_id, (served, rating) in rated_generations(judged).items()
            if served == served_by
        }
        scores = self.shadow_scores(version, sorted(rated))
        generations = self.get_generations(sorted(scores))
        return [
            ShadowEvidence(
                generation_id,
                rated[generation_id],
                sum(generations[generation_id].behaviour_logprobs),
                scores[generation_id].logprob,
            )
            for generation_id in sorted(generations)
        ]

    @abstractmethod
    def erase_client(self, client_id: str, *, requested_by: str, now: float) -> ErasureRecord:
        """Delete in one transaction every generation the client was served, every feedback
        event it sent or that names one of those generations, and their shadow scores; record
        the erasure (counts, not content). Seqs are never reused, so the trainer's cursors stay
        valid and it never reads the erased rows again. Nothing found: nothing changes and
        nothing is recorded (the returned counts are zero)."""

    @abstractmethod
    def erasures(self) -> list[ErasureRecord]:
        """Every recorded erasure, oldest first."""

    @abstractmethod
    def size_bytes(self) -> int:
        """Bytes the store takes on its disk: the SQLite files (WAL included), or the PostgreSQL
        schema's tables with their indexes and TOAST."""

    @abstractmethod
    def max_seq(self) -> tuple[int, int]:
        """(highest generation seq, highest feedback seq); 0 when empty."""

    @abstractmethod
    def counts(self) -> StoreCounts: ...

    @abstractmethod
    def get_cursor(self, name: str) -> dict[str, Any] | None:
        """A named cursor (the trainer's progress), or None."""

    @abstractmethod
    def set_cursor(self, name: str, value: dict[str, Any]) -> None:
        """Durably set a named cursor."""

    @abstractmethod
    def iter_export(self) -> Iterator[dict[str, Any]]:
        """Every generation with its feedback events, oldest first, as JSON-ready dicts."""

    @abstractmethod
    def schema_version(self) -> int: ...

    def close(self) -> None:  # noqa: B027 - backends without resources need nothing
        pass

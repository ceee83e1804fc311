"""The replay store's records and interface: where the server logs and the trainer reads.

Backends (`feedloop.core.store.factory.open_store` picks one from a path or URL):
- SQLite in WAL mode (`feedloop.core.store.sqlite`): the embedded default, no set-up;
- PostgreSQL via psycopg 3 (`feedloop.core.store.postgres`): shared by server replicas and the
  trainer.

Promises every backend keeps (one test suite runs on both):
- `insert_feedback` returns only after its events are durable (committed with fsync), and a
  repeated (client_id, event_id) is reported as a duplicate and stored once.
- `append_generations` writes a batch in one transaction (the server's group commit).
- Every row gets a store-assigned, strictly increasing `seq`: the trainer's cursors use it.
- A client's or an end user's data can be erased (`erase_client`, `erase_end_user`), from the
  store and the archives it wrote; the erasure is recorded without the content.
- Old rows can be pruned in batches (`feedloop.core.store.retention` decides which, the
  backends delete them and give the space back); a pruned seq is never reused.
- Write failures raise StoreUnavailableError (StoreFullError when the disk is full), so the
  server can answer UNAVAILABLE/RESOURCE_EXHAUSTED; nothing half-written remains.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from feedloop.core.discount import Discount
from feedloop.core.errors import InvalidRecordError
from feedloop.core.feedback_kinds import FeedbackKind, RatingScaleName
from feedloop.core.human_eval import VerdictRecord
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
    # The tenant served: the API key's tenant (its name when it declares none; "anonymous"
    # with auth off). Feedback ownership, feedback idempotency, the trainer's per-client
    # weighting and erasure all go by it.
    client_id: str
    created_at: float  # Unix seconds
    candidate_index: int = 0
    num_candidates: int = 1
    served_as: str = SERVED_LIVE  # one of the SERVED_* reasons
    # The app's key of its end user (GenerateRequest.end_user, the OpenAI API's `user`), so that
    # user's data can be erased (`erase_end_user`); "" when the app sent none.
    end_user: str = ""
    # The server-issued id of the Generate reply that carried it (all candidates of a reply
    # share it; "" for rows stored before it existed). Unlike request_id, which the client
    # chooses, it cannot be shared by two replies.
    reply_id: str = ""
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
        end_user: str = "",
        reply_id: str = "",
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
                end_user=end_user,
                reply_id=reply_id,
            )
            for index, (sample, generation_id, text) in enumerate(
                zip(samples, generation_ids, texts, strict=True)
            )
        ]


def has_finite_logprobs(record: GenerationRecord) -> bool:
    """Whether every logged log-probability of a generation is a finite number.

    A sampled token always has a positive probability under the distribution it was drawn from,
    so its behaviour log-probability is finite; a NaN or infinity means the sampling itself
    broke (logits that overflowed), and as the denominator of every importance ratio it would
    poison each update that read it.
    """
    return all(map(math.isfinite, record.behaviour_logprobs)) and all(
        map(math.isfinite, record.policy_logprobs)
    )


def require_finite_logprobs(records: Iterable[GenerationRecord]) -> None:
    """InvalidRecordError naming the first generation with a non-finite log-probability."""
    for record in records:
        if not has_finite_logprobs(record):
            raise InvalidRecordError(
                f"generation {record.generation_id}: non-finite log-probability; not stored"
            )


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

    event_id: str  # the idempotency key, unique per client_id (tenant)
    kind: FeedbackKind
    generation_ids: list[str]
    client_id: str
    received_at: float  # Unix seconds, server clock
    score: float | None = None  # rating only, on its own scale
    scale: RatingScaleName | None = None  # rating only
    text: str | None = None  # correction only
    given_at: float | None = None  # when the user gave it, if the app said
    seq: int = 0  # assigned by the store

    def same_event(self, other: FeedbackRecord) -> bool:
        """Whether other says the same thing (a retry of this event), whatever its receipt."""
        return (
            self.kind == other.kind
            and list(self.generation_ids) == list(other.generation_ids)
            and self.score == other.score
            and (self.scale or None) == (other.scale or None)
            and self.text == other.text
            and self.given_at == other.given_at
        )


@dataclass(frozen=True)
class ErasureRecord:
    """What an erasure deleted, as recorded in the store: whose data (a client id, or an end-user
    key with client_id ""), who asked, when, how many rows; never the content. Counts of zero:
    nothing was found and nothing changed (not recorded)."""

    client_id: str
    requested_by: str
    erased_at: float  # Unix seconds
    generations: int
    feedback: int
    shadow_scores: int
    end_user: str = ""
    # Rows removed from the archive files retention wrote (feedloop.core.store.archive).
    archive_rows: int = 0
    # Human-evaluation verdicts the client gave or that name one of its generations.
    verdicts: int = 0

    @property
    def found(self) -> bool:
        return (
            self.generations > 0 or self.feedback > 0 or self.archive_rows > 0 or self.verdicts > 0
        )

    @property
    def identity(self) -> str:
        return f"end user {self.end_user!r}" if self.end_user else f"client {self.client_id!r}"


@dataclass(frozen=True)
class PrunedRows:
    """Rows one retention batch deleted (`ReplayStore.delete_pruned`)."""

    generations: int = 0
    feedback: int = 0
    shadow_scores: int = 0

    def __add__(self, other: PrunedRows) -> PrunedRows:
        return PrunedRows(
            self.generations + other.generations,
            self.feedback + other.feedback,
            self.shadow_scores + other.shadow_scores,
        )


@dataclass(frozen=True)
class ErasureTarget:
    """Whose data an erasure deletes: a client id or an end-user key (exactly one is set)."""

    client_id: str = ""
    end_user: str = ""

    def __post_init__(self) -> None:
        if bool(self.client_id) == bool(self.end_user):
            raise ValueError("an erasure names exactly one of client_id and end_user")


@dataclass(frozen=True)
class StoreCounts:
    generations: int
    feedback: int
    feedback_by_kind: dict[str, int] = field(default_factory=dict)


class ReplayStore(ABC):
    """Durable log of generations and feedback. Methods are blocking: call them off the loop."""

    @abstractmethod
    def append_generations(self, records: Sequence[GenerationRecord]) -> None:
        """Store a batch of generations in one transaction (ids are unique; repeats ignored).

        A batch holding a non-finite log-probability is refused whole (InvalidRecordError)."""

    @abstractmethod
    def append_shadow_scores(self, scores: Sequence[ShadowScore]) -> None:
        """Store shadow scores in one transaction (a repeated (version, generation) is ignored)."""

    @abstractmethod
    def shadow_scores(self, version: str, generation_ids: Sequence[str]) -> dict[str, ShadowScore]:
        """This version's stored shadow scores of these generations, by generation id."""

    @abstractmethod
    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[bool]:
        """Store events durably in one transaction; True per event if new, False if its
        (client_id, event_id) is stored already (or repeats an earlier event of the batch).

        Returns only once the events are committed. Validation (ids exist etc.) is the caller's.
        """

    @abstractmethod
    def get_feedback(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], FeedbackRecord]:
        """The stored events among these (client_id, event_id) keys, by key."""

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
        self,
        since: float,
        until: float | None = None,
        versions: Collection[str] | None = None,
        *,
        discount: Discount | None = None,
        explored: Collection[str] = (),
    ) -> dict[str, VersionOutcomes]:
        """Feedback received in [since, until) tallied by its generations' model versions.

        versions: report only these (each one, even without feedback); None: every version that
        has some. discount: also tally the ratings discounted by age; explored: versions whose
        exploration traffic counts as their own (older versions the server explores with). How
        events count: `feedloop.core.store.outcomes`.
        """
        rows = self.judged_generations(since, until)
        return tally_outcomes(rows, versions, discount=discount, explored=explored)

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
    def insert_verdict(self, record: VerdictRecord) -> bool:
        """Store a human evaluation's verdict durably; True if new, False for a repeated
        verdict_id (stored once). Returns only once it is committed."""

    @abstractmethod
    def verdicts_between(self, version_a: str, version_b: str) -> list[VerdictRecord]:
        """Every stored verdict on these two versions, in either order, oldest first."""

    def erase_client(self, client_id: str, *, requested_by: str, now: float) -> ErasureRecord:
        """Delete in one transaction every generation the client was served, every feedback
        event it sent or that names one of those generations, their shadow scores, and every
        human-evaluation verdict it gave or that names one of those generations, after
        removing the same rows from every archive file the store wrote; record the erasure
        (counts, not content). Seqs are never reused, so the trainer's cursors stay valid and it
        never reads the erased rows again. Nothing found: nothing changes and nothing is
        recorded (the returned counts are zero)."""
        return erase_identity(self, ErasureTarget(client_id=client_id), requested_by, now)

    def erase_end_user(self, end_user: str, *, requested_by: str, now: float) -> ErasureRecord:
        """As erase_client, for the generations logged with this end-user key, the events that
        name them and their shadow scores (events carry no end-user key of their own)."""
        return erase_identity(self, ErasureTarget(end_user=end_user), requested_by, now)

    @abstractmethod
    def erase_rows(
        self, target: ErasureTarget, *, requested_by: str, now: float, archive_rows: int
    ) -> ErasureRecord:
        """The store's part of an erasure (see erase_client), in one transaction; recorded when
        it or the archives (archive_rows, already removed by the caller) found something."""

    # -- retention (feedloop.core.store.retention decides; the backends delete) -----------------

    @abstractmethod
    def generation_ages(
        self, after_seq: int, upto_seq: int, limit: int
    ) -> list[tuple[int, str, float]]:
        """(seq, generation id, created_at) of the generations with after_seq < seq <= upto_seq,
        oldest first, at most limit."""

    @abstractmethod
    def delete_pruned(
        self, generation_ids: Sequence[str], events: Sequence[FeedbackRecord], archive: str | None
    ) -> PrunedRows:
        """Delete these generations, their shadow scores and these events in one transaction;
        archive: the file their rows were written to, whose recorded counts grow by as many."""

    @abstractmethod
    def register_archive(self, path: str, now: float) -> None:
        """Record an archive file before retention writes to it (so an erasure always knows it)."""

    @abstractmethod
    def maintenance_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held by each retention batch and by each erasure, across processes: an erasure never
        runs between a batch's read of rows and their archiving."""

    @abstractmethod
    def archives(self) -> list[str]:
        """The paths of every archive file retention wrote, oldest first."""

    @abstractmethod
    def cursors(self) -> dict[str, dict[str, Any]]:
        """Every named cursor."""

    def used_bytes(self) -> int | None:
        """Bytes of live data, what size-based retention compares with its limit; None where
        the backend cannot tell it apart from free space (PostgreSQL: a DELETE's space stays
        in the table for reuse)."""
        return None

    def reclaim_space(self) -> int:
        """Give the space of deleted rows back to the file system where the backend can do it
        online; the bytes given back."""
        return 0

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


def erase_identity(
    store: ReplayStore, target: ErasureTarget, requested_by: str, now: float
) -> ErasureRecord:
    """Archives first, then the store, under the store's maintenance lock (retention holds it
    over each batch's read, archive and delete, so it cannot archive the identity's rows between
    the two): a crash between them leaves rows in the store only, and the erasure run again
    finds and removes them."""
    from feedloop.core.store.archive import erase_from_archives

    with store.maintenance_lock():
        archive_rows = erase_from_archives(
            store.archives(), client_id=target.client_id, end_user=target.end_user
        )
        return store.erase_rows(
            target, requested_by=requested_by, now=now, archive_rows=archive_rows
        )

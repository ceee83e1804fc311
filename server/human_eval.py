"""Human evaluation on the server: store raters' blind verdicts, report win rates.

A verdict names two candidates, one from each version, for the same prompt. It is checked
against the stored generations (each candidate served by the version it is named for, one
prompt), then a verdict for one side is stored as comparison feedback through the feedback
writer (so it is validated, deduplicated and durable like any event, and the trainer learns from
it), and then the verdict itself. That order makes a retry after a crash between the two writes
complete both: the comparison's event id derives from the verdict id, so it comes back
DUPLICATE, and the verdict is stored. The acknowledgement follows both commits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from feedloop.core.human_eval import (
    A_BETTER,
    B_BETTER,
    BOTH_BAD,
    TIE,
    HumanEvaluation,
    Tally,
    VerdictRecord,
    tally_verdicts,
)
from feedloop.core.store.base import FeedbackRecord, ReplayStore
from feedloop.server.errors import GENERATION, InvalidArgument, NotFound, require_text
from feedloop.server.feedback_writer import ACCEPTED, DUPLICATE, FeedbackWriter
from feedloop.server.generation_log import GenerationLog
from feedloop.server.metrics import ServerMetrics
from feedloop.v1 import feedloop_pb2 as pb

MAX_VERDICT_ID_CHARS = 100  # leaves room for the comparison's "/comparison" suffix (128 max)
MAX_SESSION_ID_CHARS = 128
MAX_VERSION_CHARS = 128
COMPARISON_SUFFIX = "/comparison"
# How long a verdict waits for its candidates to leave the generation log's buffer.
GENERATION_COMMIT_WAIT_S = 10.0
DEFAULT_ALPHA = 0.05

CHOICES = {
    pb.VERDICT_CHOICE_A: A_BETTER,
    pb.VERDICT_CHOICE_B: B_BETTER,
    pb.VERDICT_CHOICE_TIE: TIE,
    pb.VERDICT_CHOICE_BOTH_BAD: BOTH_BAD,
}


@dataclass(frozen=True)
class VerdictDraft:
    """A verdict whose fields are checked, before its candidates are looked up."""

    verdict: pb.EvaluationVerdict
    choice: str
    rater: str
    given_at: float | None
    # The rater's key may judge other tenants' generations (a labeller, or auth off); else a
    # verdict names only generations served to the rater's own tenant, as feedback does.
    any_tenant: bool = False


def _required(value: str, field: str, max_chars: int) -> str:
    if not value:
        raise InvalidArgument(field, "required")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"at most {max_chars} characters")
    return require_text(value, field)


def parse_verdict(verdict: pb.EvaluationVerdict, rater: str) -> VerdictDraft:
    """Check every field that needs no lookup; InvalidArgument names the first one at fault."""
    _required(verdict.verdict_id, "verdict_id", MAX_VERDICT_ID_CHARS)
    _required(verdict.session_id, "session_id", MAX_SESSION_ID_CHARS)
    _required(verdict.version_a, "version_a", MAX_VERSION_CHARS)
    _required(verdict.version_b, "version_b", MAX_VERSION_CHARS)
    if verdict.version_a == verdict.version_b:
        raise InvalidArgument("version_b", "must differ from version_a")
    _required(verdict.generation_id_a, "generation_id_a", MAX_VERDICT_ID_CHARS + 28)
    _required(verdict.generation_id_b, "generation_id_b", MAX_VERDICT_ID_CHARS + 28)
    if verdict.generation_id_a == verdict.generation_id_b:
        raise InvalidArgument("generation_id_b", "must differ from generation_id_a")
    choice = CHOICES.get(verdict.choice)
    if choice is None:
        raise InvalidArgument("choice", "one of A, B, TIE, BOTH_BAD is required")
    given_at = None
    if verdict.HasField("given_at"):
        given_at = verdict.given_at.seconds + verdict.given_at.nanos / 1e9
    return VerdictDraft(verdict, choice, rater, given_at)


class VerdictRecorder:
    """Checks verdicts against the stored generations and stores them (see the module doc)."""

    def __init__(
        self,
        store: ReplayStore,
        generation_log: GenerationLog,
        writer: FeedbackWriter,
        metrics: ServerMetrics,
        loaded_versions: Callable[[], list[str]],
    ) -> None:
        self.loaded_versions = loaded_versions
        self.store = store
        self.generation_log = generation_log
        self.writer = writer
        self.metrics = metrics

    def _prompt_of(self, draft: VerdictDraft) -> str:
        """The prompt both candidates answer (blocking: waits for their commit, reads them)."""
        v = draft.verdict
        ids = {"generation_id_a": v.generation_id_a, "generation_id_b": v.generation_id_b}
        self.generation_log.wait_committed(ids.values(), GENERATION_COMMIT_WAIT_S)
        found = self.store.get_generations(list(ids.values()))
        for field, generation_id in ids.items():
            record = found.get(generation_id)
            if record is None or not (draft.any_tenant or record.client_id == draft.rater):
                # another tenant's generation reads as an unknown one, as for feedback
                raise NotFound(
                    f"{field}: unknown generation {generation_id!r}",
                    field=field,
                    resource=(GENERATION, generation_id),
                )
        a, b = found[v.generation_id_a], found[v.generation_id_b]
        if a.model_version != v.version_a:
            raise InvalidArgument(
                "generation_id_a", f"served by {a.model_version!r}, not version_a {v.version_a!r}"
            )
        if b.model_version != v.version_b:
            raise InvalidArgument(
                "generation_id_b", f"served by {b.model_version!r}, not version_b {v.version_b!r}"
            )
        if a.prompt != b.prompt:
            raise InvalidArgument("generation_id_b", "answers another prompt than generation_id_a")
        return a.prompt

    async def record(self, draft: VerdictDraft) -> str:
        """Store the verdict (and its comparison) durably; ACCEPTED or DUPLICATE."""
        v = draft.verdict
        prompt = await asyncio.to_thread(self._prompt_of, draft)
        now = time.time()
        if draft.choice in (A_BETTER, B_BETTER):
            preferred, rejected = (v.generation_id_a, v.generation_id_b)
            if draft.choice == B_BETTER:
                preferred, rejected = rejected, preferred
            comparison = FeedbackRecord(
                event_id=v.verdict_id + COMPARISON_SUFFIX,
                kind="comparison",
                generation_ids=[preferred, rejected],
                client_id=draft.rater,
                received_at=now,
                given_at=draft.given_at,
            )
            # the writer counts it
            await self.writer.submit(comparison, any_tenant=draft.any_tenant)
        record = VerdictRecord(
            verdict_id=v.verdict_id,
            session_id=v.session_id,
            rater=draft.rater,
            version_a=v.version_a,
            generation_id_a=v.generation_id_a,
            version_b=v.version_b,
            generation_id_b=v.generation_id_b,
            choice=draft.choice,
            a_shown_left=v.a_shown_left,
            prompt=prompt,
            received_at=now,
            given_at=draft.given_at,
        )
        new = await asyncio.to_thread(self.store.insert_verdict, record)
        outcome = ACCEPTED if new else DUPLICATE
        self.metrics.human_eval_verdicts.labels(draft.choice, outcome).inc()
        loaded = self.loaded_versions()
        if v.version_a in loaded and v.version_b in loaded:
            evaluation = await asyncio.to_thread(
                human_evaluation, self.store, v.version_a, v.version_b
            )
            publish_human_evaluation(self.metrics, evaluation, DEFAULT_ALPHA, loaded)
        return outcome


def evaluation_request(request: pb.GetHumanEvaluationRequest) -> float:
    """The alpha of a valid request; InvalidArgument names the field at fault."""
    _required(request.version_a, "version_a", MAX_VERSION_CHARS)
    _required(request.version_b, "version_b", MAX_VERSION_CHARS)
    if request.version_a == request.version_b:
        raise InvalidArgument("version_b", "must differ from version_a")
    alpha = request.alpha or DEFAULT_ALPHA
    if not 0 < alpha < 1:
        raise InvalidArgument("alpha", f"must be in (0, 1), got {request.alpha!r}")
    return alpha


def human_evaluation(store: ReplayStore, version_a: str, version_b: str) -> HumanEvaluation:
    """Every stored verdict on the two versions, tallied with version_a as A (blocking)."""
    return tally_verdicts(store.verdicts_between(version_a, version_b), version_a, version_b)


def publish_human_evaluation(
    metrics: ServerMetrics, evaluation: HumanEvaluation, alpha: float, loaded: list[str]
) -> None:
    """Set the pair's gauges, if both versions are loaded here (bounded label values)."""
    if evaluation.version_a not in loaded or evaluation.version_b not in loaded:
        return
    overall = evaluation.overall
    low, high = overall.interval(alpha)
    metrics.human_evaluation(
        evaluation.version_a, evaluation.version_b, overall.verdicts, overall.a_win_rate, low, high
    )


def tally_pb(tally: Tally, alpha: float) -> pb.HumanEvaluationTally:
    low, high = tally.interval(alpha)
    return pb.HumanEvaluationTally(
        rater=tally.rater,
        verdicts=tally.verdicts,
        a_wins=tally.a_wins,
        b_wins=tally.b_wins,
        ties=tally.ties,
        both_bad=tally.both_bad,
        a_win_rate=tally.a_win_rate,
        low=low,
        high=high,
        a_shown_left=tally.a_shown_left,
    )


def report_pb(evaluation: HumanEvaluation, alpha: float) -> pb.HumanEvaluationReport:
    return pb.HumanEvaluationReport(
        version_a=evaluation.version_a,
        version_b=evaluation.version_b,
        alpha=alpha,
        overall=tally_pb(evaluation.overall, alpha),
        raters=[tally_pb(t, alpha) for t in evaluation.raters],
        sessions=evaluation.sessions,
    )

"""Bad input, fuzzed: arbitrary requests over a real channel to one real `feedloop serve`.

Promise 7 of the architecture: bad input changes nothing. Whatever a client sends, the answer
is OK or a documented client-error code (never INTERNAL/UNKNOWN), the server stays up, and the
replay store holds nothing from a rejected event. Strings include control characters, huge and
negative numbers, NaN and infinities, empty and repeated ids, oversize repeated fields; bytes that
are not protobuf at all (or strings that are not UTF-8) are sent raw through a bytes twin of the
contract (tests/faults_wire.py).

One server process per store backend serves the whole module; each test records what it sent
and what came back, then checks the store file/URL itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from faults_procs import is_serving, seeded_data_dir, server_process, wait_for
from faults_strategies import (
    BAD_TIMESTAMPS,
    INT32,
    feedback_events,
    generate_requests,
    texts,
)
from faults_wire import METHOD_PATHS, TWIN, parses, raw_stub
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg_support import fresh_schema, schema_url

from feedloop.core.store import open_store
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

# The codes that mean "you, the client, sent something wrong / too much": documented, expected.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,  # an event id reused for a different event
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
}
CALL_TIMEOUT_S = 30.0
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,  # every run explores afresh; failures print their reproducing example
)


# -- the server under fuzz -------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the server said about each event_id."""

    accepted: dict[str, pb.FeedbackEvent] = field(default_factory=dict)  # first accepted form
    rejected: set[str] = field(default_factory=set)
    # Sent in a stream after an event that ended the stream: neither acked nor refused.
    unanswered: set[str] = field(default_factory=set)

    def record_ack(self, event: pb.FeedbackEvent, outcome: int) -> None:
        if event.event_id in self.accepted:
            assert outcome == pb.FEEDBACK_OUTCOME_DUPLICATE, event
        else:
            assert outcome in (pb.FEEDBACK_OUTCOME_ACCEPTED, pb.FEEDBACK_OUTCOME_DUPLICATE)
            if outcome == pb.FEEDBACK_OUTCOME_DUPLICATE:
                # Only legitimate when an earlier stream stored it without an ack reaching us.
                assert event.event_id in self.unanswered, event
            self.accepted[event.event_id] = event


@dataclass
class FuzzServer:
    address: str
    store_location: str
    real_ids: list[str]
    allow_nul: bool
    channel: grpc.Channel
    ledger: Ledger = field(default_factory=Ledger)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def fuzz_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_checkpoint: Path,
) -> Iterator[FuzzServer]:
    data_dir = seeded_data_dir(tmp_path_factory.mktemp(f"fuzz-{request.param}"), tiny_checkpoint)
    with fresh_schema("fuzz") if request.param == "postgres" else nullcontext() as schema:
        store = schema_url(schema) if schema else str(data_dir / "replay.sqlite3")
        # NUL is fuzzed on both backends: PostgreSQL text cannot hold it, so the server must
        # refuse it up front (tests/test_faults_store.py has the focused case).
        allow_nul = True
        with (
            # Most fuzzed ids name nothing, and no other replica commits late here: answer
            # NOT_FOUND at once instead of waiting for each.
            server_process(
                data_dir, "--store", store, "--unknown-generation-wait-ms", "0"
            ) as child,
            grpc.insecure_channel(child.banner["grpc"]) as channel,
        ):
            generation = pb_grpc.GenerationStub(channel)
            real_ids = [
                c.generation_id
                for prompt in ("green hills", "quiet river")
                for c in generation.Generate(
                    pb.GenerateRequest(prompt=prompt, num_candidates=4), timeout=CALL_TIMEOUT_S
                ).candidates
            ]
            yield FuzzServer(child.banner["grpc"], store, real_ids, allow_nul, channel)
            assert child.alive(), "the server died under fuzzing"


def code_of(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def assert_client_error_or_ok(code: grpc.StatusCode, what: Any) -> None:
    assert code == grpc.StatusCode.OK or code in CLIENT_ERRORS, f"{code} for {what!r}"


# -- the properties ----------------------------------------------------------------------------


def test_any_generate_request_gets_ok_or_a_client_error(fuzz_server: FuzzServer) -> None:
    generation = pb_grpc.GenerationStub(fuzz_server.channel)
    served: list[str] = []

    @FUZZ
    @given(request=generate_requests(fuzz_server.allow_nul))
    def prop(request: pb.GenerateRequest) -> None:
        try:
            reply = generation.Generate(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            assert_client_error_or_ok(exc.code(), request)
            return
        assert reply.model_version == "v0001"
        assert 1 <= len(reply.candidates) <= 8
        if request.request_id:
            assert reply.request_id == request.request_id
        ids = [c.generation_id for c in reply.candidates]
        assert len(set(ids)) == len(ids)
        served.extend(ids)

    prop()
    assert served, "no fuzzed request was valid: the strategy explores nothing useful"
    assert is_serving(fuzz_server.address)
    # Every served generation reaches the store (the server's group commit: await it).
    store = open_store(fuzz_server.store_location)
    try:
        wait_for(lambda: len(store.get_generations(served)) == len(served))
    finally:
        store.close()


def test_any_feedback_event_gets_ok_or_a_client_error_and_rejected_ones_write_nothing(
    fuzz_server: FuzzServer,
) -> None:
    feedback = pb_grpc.FeedbackStub(fuzz_server.channel)
    ledger = fuzz_server.ledger
    events = feedback_events(fuzz_server.real_ids, fuzz_server.allow_nul)

    @FUZZ
    @given(sent=events)
    def unary(sent: tuple[pb.FeedbackEvent, str]) -> None:
        event, _ = sent
        try:
            ack = feedback.Submit(event, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            assert_client_error_or_ok(exc.code(), event)
            if event.event_id not in ledger.accepted:
                ledger.rejected.add(event.event_id)
            return
        assert ack.event_id == event.event_id
        ledger.record_ack(event, ack.outcome)

    @FUZZ
    @given(batch=st.lists(events, min_size=1, max_size=12))
    def stream(batch: list[tuple[pb.FeedbackEvent, str]]) -> None:
        sent = [event for event, _ in batch]
        acks: list[pb.FeedbackAck] = []
        code = grpc.StatusCode.OK
        try:
            for ack in feedback.SubmitStream(iter(sent), timeout=CALL_TIMEOUT_S):
                acks.append(ack)
        except grpc.RpcError as exc:
            code = exc.code()
            assert_client_error_or_ok(code, sent)
        # Acks come in order, one per event, for a prefix of what was sent.
        assert [a.event_id for a in acks] == [e.event_id for e in sent[: len(acks)]]
        for event, ack in zip(sent, acks, strict=False):
            ledger.record_ack(event, ack.outcome)
        if code != grpc.StatusCode.OK:
            refused = sent[len(acks)]
            if refused.event_id not in ledger.accepted:
                ledger.rejected.add(refused.event_id)
            # Events after the refused one may have been committed before the stream ended
            # (the stream is pipelined); a client retries them and sees DUPLICATE.
            ledger.unanswered.update(e.event_id for e in sent[len(acks) + 1 :])
        else:
            assert len(acks) == len(sent)

    unary()
    stream()
    assert ledger.accepted, "no fuzzed event was valid: the strategy explores nothing useful"
    assert ledger.rejected, "no fuzzed event was refused: the strategy explores nothing useful"
    assert is_serving(fuzz_server.address)

    store = open_store(fuzz_server.store_location)
    try:
        stored = store.feedback_after(0, 1_000_000)
    finally:
        store.close()
    stored_ids = [f.event_id for f in stored]
    assert len(stored_ids) == len(set(stored_ids)), "an event_id is stored twice"
    by_id = {f.event_id: f for f in stored}
    # Every acknowledged event is stored, as it was first accepted.
    for event_id, event in ledger.accepted.items():
        assert event_id in by_id, event
        record = by_id[event_id]
        kind = event.WhichOneof("kind")
        assert record.kind == kind
        if kind == "ranking":
            assert record.generation_ids == list(event.ranking.generation_ids)
        if kind == "rating":
            assert record.score == event.rating.score
    # Nothing from a refused event; nothing the server never answered for, beyond retry-safe ones.
    never_accepted = ledger.rejected - set(ledger.accepted)
    assert not (never_accepted - ledger.unanswered) & set(by_id)
    assert set(by_id) <= set(ledger.accepted) | ledger.unanswered


def test_any_admin_request_gets_ok_or_a_client_error(fuzz_server: FuzzServer) -> None:
    admin = pb_grpc.ModelAdminStub(fuzz_server.channel)
    text = texts(allow_nul=fuzz_server.allow_nul)
    requests = st.one_of(
        st.builds(pb.ListModelsRequest, max_decisions=INT32).map(lambda r: ("ListModels", r)),
        st.builds(
            pb.SetLiveRequest,
            version=st.one_of(text, st.sampled_from(["v0001", "v9999", "../v0001", "v1"])),
            reason=text,
        ).map(lambda r: ("SetLive", r)),
        st.builds(pb.RollbackRequest, reason=text).map(lambda r: ("Rollback", r)),
        st.just(("GetStatus", pb.GetStatusRequest())),
    )

    @settings(FUZZ, max_examples=40)
    @given(sent=requests)
    def prop(sent: tuple[str, Any]) -> None:
        method, request = sent
        code = code_of(lambda: getattr(admin, method)(request, timeout=CALL_TIMEOUT_S))
        assert_client_error_or_ok(code, request)

    prop()
    # Only v0001 exists: whatever was asked, it is still the live version.
    status = admin.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT_S)
    assert status.live_version == "v0001"
    assert is_serving(fuzz_server.address)


def test_bytes_that_are_not_protobuf_are_refused_on_every_method_and_the_server_stays_up(
    fuzz_server: FuzzServer,
) -> None:
    refused: list[grpc.StatusCode] = []

    @settings(FUZZ, max_examples=40)
    @given(
        method=st.sampled_from(METHOD_PATHS),
        data=st.one_of(
            st.binary(min_size=1, max_size=64),
            st.sampled_from([b"\x00", b"\x08\xff", b"\x0a\x50abc", b"\xff" * 11, b"\x07"]),
        ),
    )
    def prop(method: Any, data: bytes) -> None:
        stub = raw_stub(fuzz_server.channel, method)
        if method.client_streaming:
            code = code_of(lambda: list(stub(iter([data]), timeout=CALL_TIMEOUT_S)))
        else:
            code = code_of(lambda: stub(data, timeout=CALL_TIMEOUT_S))
        if not parses(method.request, data):
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.path, data, code)
            refused.append(code)
        else:
            assert_client_error_or_ok(code, (method.path, data))

    prop()
    assert refused
    assert is_serving(fuzz_server.address)


# -- findings of this suite, fixed since: kept as plain regressions -----------------------------

NOT_UTF8 = TWIN.SetLiveRequest(version=b"\xff\xfe").SerializeToString()
UNDECODABLE = [
    (method, data)
    for method in METHOD_PATHS
    for data in (b"\x08\xff", b"\x0a\x50abc", NOT_UTF8)
    if not parses(method.request, data)
]


def test_undecodable_request_bytes_are_invalid_argument(fuzz_server: FuzzServer) -> None:
    """Found here: these were UNKNOWN (unary) / INTERNAL (stream) with a traceback logged."""
    codes = {}
    for method, data in UNDECODABLE:
        stub = raw_stub(fuzz_server.channel, method)
        if method.client_streaming:
            codes[method.path, data] = code_of(
                lambda s=stub, d=data: list(s(iter([d]), timeout=CALL_TIMEOUT_S))
            )
        else:
            codes[method.path, data] = code_of(lambda s=stub, d=data: s(d, timeout=CALL_TIMEOUT_S))
    wrong = {key: code for key, code in codes.items() if code != grpc.StatusCode.INVALID_ARGUMENT}
    assert wrong == {}


def test_feedback_with_an_out_of_range_given_at_is_invalid_argument(
    fuzz_server: FuzzServer,
) -> None:
    """Found here: Timestamp.ToNanoseconds raised ValueError, answered INTERNAL."""
    feedback = pb_grpc.FeedbackStub(fuzz_server.channel)
    answers = {}
    for seconds, nanos in BAD_TIMESTAMPS:
        event = pb.FeedbackEvent(
            event_id=f"bad-time-{seconds}-{nanos}",
            rating=pb.Rating(generation_id=fuzz_server.real_ids[0], score=1.0),
        )
        event.given_at.seconds, event.given_at.nanos = seconds, nanos
        try:
            feedback.Submit(event, timeout=CALL_TIMEOUT_S)
            answers[seconds, nanos] = (grpc.StatusCode.OK, "")
        except grpc.RpcError as exc:
            answers[seconds, nanos] = (exc.code(), exc.details())
    wrong = {
        key: answer
        for key, answer in answers.items()
        if answer[0] != grpc.StatusCode.INVALID_ARGUMENT or "given_at" not in answer[1]
    }
    assert wrong == {}


def test_invalid_utf8_in_string_fields_is_refused_and_writes_nothing(
    fuzz_server: FuzzServer,
) -> None:
    """The twin puts bytes that are not UTF-8 where the contract has strings."""
    gid = fuzz_server.real_ids[0].encode()
    bad = b"\xc3\x28\xff"
    events = [
        TWIN.FeedbackEvent(event_id=b"utf8-" + bad, rating=TWIN.Rating(generation_id=gid, score=1)),
        TWIN.FeedbackEvent(
            event_id=b"utf8-correction", correction=TWIN.Correction(generation_id=gid, text=bad)
        ),
        TWIN.FeedbackEvent(
            event_id=b"utf8-ranking", ranking=TWIN.Ranking(generation_ids=[gid, bad])
        ),
    ]
    submit = raw_stub(fuzz_server.channel, METHOD_PATHS[1])
    submit_stream = raw_stub(fuzz_server.channel, METHOD_PATHS[2])
    for event in events:
        data = event.SerializeToString()
        assert not parses(pb.FeedbackEvent, data)
        assert code_of(lambda d=data: submit(d, timeout=CALL_TIMEOUT_S)) != grpc.StatusCode.OK
        assert (
            code_of(lambda d=data: list(submit_stream(iter([d]), timeout=CALL_TIMEOUT_S)))
            != grpc.StatusCode.OK
        )
    generate = raw_stub(fuzz_server.channel, METHOD_PATHS[0])
    request = TWIN.GenerateRequest(prompt=b"ocean " + bad, num_candidates=1)
    assert code_of(lambda: generate(request.SerializeToString(), timeout=CALL_TIMEOUT_S)) != (
        grpc.StatusCode.OK
    )
    assert is_serving(fuzz_server.address)
    store = open_store(fuzz_server.store_location)
    try:
        stored = {f.event_id for f in store.feedback_after(0, 1_000_000)}
    finally:
        store.close()
    assert not {"utf8-correction", "utf8-ranking"} & stored
    assert not any(event_id.startswith("utf8-") for event_id in stored)

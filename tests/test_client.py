"""The client library's promises, against an in-process server with scripted failures."""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path

import grpc
import pytest
from client_fake_server import FakeServer
from client_tls import make_certificates, openssl_available

from feedloop.client import (
    AsyncFeedloopClient,
    Comparison,
    Correction,
    FeedloopClient,
    FeedloopClientError,
    OnlineEstimate,
    Ranking,
    Rating,
    RetryPolicy,
)
from feedloop.client.options import ClientOptions
from feedloop.client.service_config import service_config_json
from feedloop.client.types import GenerateResult, Sampling, event_to_proto, generate_request
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, "try again")


@pytest.fixture
def fake():
    with FakeServer() as server:
        yield server


@pytest.fixture
def client(fake):
    with FeedloopClient(fake.target, retry=FAST_RETRY, timeout_s=5) as c:
        yield c


def test_generate_returns_typed_candidates_all_from_the_named_version(client, fake):
    result = client.generate("ocean sunrise", n=3, temperature=0.7, top_k=5, seed=9)
    assert result.model_version == "v0001"
    assert result.seed == 9
    assert len(result.candidates) == 3
    assert len({c.generation_id for c in result.candidates}) == 3
    first = result.candidates[0]
    assert first.text == "ocean sunrise #0" and first.tokens == ("ocean", "sunrise", "#0")
    assert first.log_prob == pytest.approx(-1.5) and first.finished is True


def test_each_feedback_call_makes_an_event_id_and_reusing_it_is_acknowledged_as_duplicate(
    client, fake
):
    ids = [c.generation_id for c in client.generate("sea", n=3).candidates]
    results = [
        client.rate(ids[0], 4, scale="stars5"),
        client.rank(ids),
        client.compare(ids[0], ids[1]),
        client.correct(ids[2], "calm sea"),
    ]
    assert [r.outcome for r in results] == ["accepted"] * 4
    assert len({r.event_id for r in results}) == 4
    stored = fake.script.stored_events
    assert stored[results[0].event_id].rating.score == 4
    assert list(stored[results[1].event_id].ranking.generation_ids) == ids
    assert stored[results[3].event_id].correction.text == "calm sea"

    again = client.rate(ids[0], 4, scale="stars5", event_id=results[0].event_id)
    assert again.duplicate and again.event_id == results[0].event_id
    assert len(stored) == 4


def test_unavailable_is_retried_with_the_same_event_id_until_it_succeeds(client, fake):
    fake.script.fail_next.extend([UNAVAILABLE, UNAVAILABLE])
    result = client.rate("g1", 1.0, scale="thumbs")
    assert result.outcome == "accepted"
    assert fake.script.calls == ["Submit"] * 3
    assert list(fake.script.stored_events) == [result.event_id]


def test_retries_stop_after_max_attempts_and_raise_unavailable(client, fake):
    fake.script.fail_next.extend([UNAVAILABLE] * 10)
    with pytest.raises(FeedloopClientError) as raised:
        client.status()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert raised.value.message == "try again"
    assert fake.script.calls == ["GetStatus"] * FAST_RETRY.max_attempts


@pytest.mark.parametrize(
    "failure",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "no"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "no"),
        (grpc.StatusCode.INTERNAL, "no"),
        # a full disk: the server says "do not retry" in A6's pushback
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "no", (("grpc-retry-pushback-ms", "-1"),)),
    ],
)
def test_answers_and_refusals_without_a_retry_invited_are_raised_at_once(client, fake, failure):
    fake.script.fail_next.append(failure)
    with pytest.raises(FeedloopClientError) as raised:
        client.generate("x")
    assert raised.value.code == failure[0]
    assert fake.script.calls == ["Generate"]


def test_a_refusal_is_retried_after_the_wait_the_server_pushes_back(client, fake):
    pushback = (("grpc-retry-pushback-ms", "300"),)
    fake.script.fail_next.append((grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", pushback))
    started = time.monotonic()
    result = client.generate("x")
    waited_s = time.monotonic() - started
    assert result.candidates and fake.script.calls == ["Generate", "Generate"]
    assert waited_s >= 0.3  # not FAST_RETRY's 10 ms backoff


def test_a_rollback_is_never_retried_since_a_repeat_would_roll_back_twice(client, fake):
    fake.script.fail_next.append(UNAVAILABLE)
    with pytest.raises(FeedloopClientError) as raised:
        client.rollback()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert fake.script.calls == ["Rollback"]


def test_the_retries_are_grpcs_own_from_the_service_config_not_a_python_loop(fake):
    """The channel options ClientOptions makes retry a raw stub's call; without the service
    config the same channel fails at the first UNAVAILABLE."""
    request = pb.GetStatusRequest()
    with_config = ClientOptions(target=fake.target, retry=FAST_RETRY).channel_args()
    assert any(name == "grpc.service_config" for name, _ in with_config)
    fake.script.fail_next.extend([UNAVAILABLE, UNAVAILABLE])
    with grpc.insecure_channel(fake.target, options=with_config) as channel:
        reply = pb_grpc.ModelAdminStub(channel).GetStatus(request, timeout=5)
    assert reply.live_version == "v0001"
    assert fake.script.calls == ["GetStatus"] * 3

    without = [(k, v) for k, v in with_config if k != "grpc.service_config"]
    fake.script.calls.clear()
    fake.script.fail_next.append(UNAVAILABLE)
    with (
        grpc.insecure_channel(fake.target, options=without) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        pb_grpc.ModelAdminStub(channel).GetStatus(request, timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fake.script.calls == ["GetStatus"]


def test_the_service_config_names_only_methods_a_repeat_cannot_harm():
    config = json.loads(service_config_json(RetryPolicy(max_attempts=9, initial_backoff_s=0.25)))
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert ("feedloop.v1.Feedback", "Submit") in names
    assert ("feedloop.v1.Generation", "Generate") in names
    for unsafe in ("Rollback", "StartTrial", "EndTrial", "SubmitStream"):
        assert all(method != unsafe for _, method in names)
    retry = method_config["retryPolicy"]
    assert retry["maxAttempts"] == 5  # gRPC's cap
    assert retry["initialBackoff"] == "0.25s" and retry["maxBackoff"] == "2s"
    assert retry["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert service_config_json(RetryPolicy(max_attempts=1)) == "{}"  # no retries at all


def test_server_errors_carry_the_grpc_code_and_the_servers_message(client):
    with pytest.raises(FeedloopClientError) as raised:
        client.generate("   ")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in raised.value.message
    with pytest.raises(FeedloopClientError) as raised:
        client.set_live("v0099")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND


def test_an_unreachable_server_is_unavailable_after_the_retries():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = FeedloopClient(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout_s=3)
    with client, pytest.raises(FeedloopClientError) as raised:
        client.generate("x")
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_api_key_is_sent_as_a_bearer_token_and_a_wrong_key_is_unauthenticated(fake):
    fake.script.required_api_key = "s3cret"
    with FeedloopClient(fake.target, api_key="s3cret", retry=FAST_RETRY) as client:
        client.status()
    assert fake.script.metadata_seen[-1]["authorization"] == "Bearer s3cret"
    client = FeedloopClient(fake.target, api_key="wrong", retry=FAST_RETRY)
    with client, pytest.raises(FeedloopClientError) as raised:
        client.status()
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_submit_many_resends_only_unacknowledged_events_after_a_broken_stream(client, fake):
    events = [Rating(f"g{i}", 0.5) for i in range(5)] + [
        Ranking(("g1", "g2")),
        Comparison("g1", "g2"),
        Correction("g3", "better"),
    ]
    fake.script.break_stream_after_acks = 3
    results = client.submit_many(events)
    assert len(results) == len(events)
    assert [r.outcome for r in results] == ["accepted"] * len(events)
    assert fake.script.calls == ["SubmitStream", "SubmitStream"]
    assert len(fake.script.stored_events) == len(events)
    assert [r.event_id for r in results] == list(fake.script.stored_events)


def test_an_invalid_event_ends_the_stream_with_its_code_and_earlier_acks_stay(client, fake):
    events = [Rating(f"g{i}", 0.5, event_id=f"e{i}") for i in range(4)]
    fake.script.invalid_event_ids = {"e2"}
    with pytest.raises(FeedloopClientError) as raised:
        client.submit_many(events)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "e2" in raised.value.message
    assert list(fake.script.stored_events) == ["e0", "e1"]
    assert fake.script.calls == ["SubmitStream"]  # answers are not retried


def test_admin_calls_return_typed_results(client, fake):
    models = client.list_models()
    assert models.live_version == "v0001"
    assert models.versions[0].summary == {"perplexity": 12.5}
    assert models.decisions[0].action == "promoted"
    assert models.decisions[0].details == {"kl": 0.01} and models.decisions[0].at is not None
    swapped = client.set_live("v0002", reason="test")
    assert (swapped.live_version, swapped.previous_version) == ("v0002", "v0001")
    assert client.status().live_version == "v0002"
    back = client.rollback(reason="undo")
    assert (back.live_version, back.previous_version) == ("v0001", "v0002")


def test_trial_and_pause_calls_return_the_registry_state(client, fake):
    state = client.start_trial("v0002", share=0.2, mode="shadow", reason="try")
    assert state.live_version == "v0001" and state.trainer_paused is False
    assert state.trial is not None
    assert (state.trial.version, state.trial.mode, state.trial.share) == ("v0002", "shadow", 0.2)
    assert state.trial.parent_version == "v0001" and state.trial.since is not None
    assert client.status().trial == state.trial and client.list_models().trial == state.trial
    with pytest.raises(FeedloopClientError) as raised:
        client.start_trial("v0002", share=0.2)
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    promoted = client.end_trial(promote=True)
    assert (promoted.live_version, promoted.trial) == ("v0002", None)
    assert client.set_trainer_paused(True).trainer_paused is True
    assert client.list_models().trainer_paused is True
    with pytest.raises(FeedloopClientError) as raised:
        client.start_trial("v0002", share=0.2, mode="split")  # refused before any call
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.script.calls.count("StartTrial") == 2


def test_online_report_reads_each_version_with_its_interval_and_the_trial_comparison(client, fake):
    report = client.online_report()
    sent = fake.script.online_requests[-1]
    assert (sent.window_s, sent.alpha, list(sent.versions)) == (0.0, 0.0, [])  # server defaults
    assert report.alpha == 0.05 and report.live_version == "v0001"
    assert report.since is not None and report.until is not None
    assert (report.until - report.since).total_seconds() == 3600
    live, other = report.versions
    assert (live.version, live.role) == ("v0001", "live")
    assert (live.rating.count, live.rating.mean) == (40, 0.25)
    assert (live.rating.low, live.rating.high) == (-0.125, 0.625)
    assert live.win_rates["v0002"] == OnlineEstimate(8, 0.75, 0.25, 1.0)
    assert (other.version, other.role) == ("v0002", "")
    assert other.rating == OnlineEstimate(0, None, -1.0, 1.0)  # no ratings: no mean, not NaN
    assert report.trial is None and report.trial_comparison is None
    assert live.recent_rating is None and sent.half_life_s == 0  # not asked for

    recent = client.online_report(half_life_s=300)
    assert fake.script.online_requests[-1].half_life_s == 300
    assert recent.versions[0].recent_rating == OnlineEstimate(40, 0.5, -0.25, 1.0)
    assert recent.versions[1].recent_rating is None

    client.start_trial("v0002", share=0.1)
    report = client.online_report(window_s=600, alpha=0.1, versions=["v0001", "v0002"])
    sent = fake.script.online_requests[-1]
    assert (sent.window_s, sent.alpha, list(sent.versions)) == (600, 0.1, ["v0001", "v0002"])
    assert report.versions[1].role == "canary"
    comparison = report.trial_comparison
    assert comparison is not None
    assert (comparison.trial_version, comparison.live_version) == ("v0002", "v0001")
    assert comparison.difference == OnlineEstimate(12, 0.25, -0.5, 1.0)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"window_s": -1.0}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"alpha": 1.5}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"versions": ["v0099"]}, grpc.StatusCode.NOT_FOUND),
        ({"half_life_s": -5.0}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_online_report_refusals_carry_the_servers_code(client, fields, code):
    with pytest.raises(FeedloopClientError) as raised:
        client.online_report(**fields)
    assert raised.value.code == code


def test_set_live_with_an_expected_live_version_is_aborted_when_it_changed(client, fake):
    with pytest.raises(FeedloopClientError) as raised:
        client.set_live("v0002", expected_live_version="v0002")
    assert raised.value.code == grpc.StatusCode.ABORTED
    assert client.set_live("v0002", expected_live_version="v0001").live_version == "v0002"


def test_generate_sends_the_routing_key_and_reads_served_as(client, fake):
    result = client.generate("sea", routing_key="user-7", end_user="person-7")
    assert fake.script.routing_keys == ["user-7"]
    assert fake.script.end_users == ["person-7"]
    assert result.served_as == "live"


def test_health_check_speaks_grpc_health_v1(client, fake):
    assert client.health() == "SERVING"
    fake.health.set("feedloop.v1.Generation", 2)  # NOT_SERVING
    assert client.health("feedloop.v1.Generation") == "NOT_SERVING"
    client.wait_until_serving(timeout_s=5)


def test_a_health_status_the_client_does_not_know_is_named_by_its_number(client, fake):
    fake.health.set("feedloop.v1.Generation", 9)  # from a newer grpc.health.v1
    assert client.health("feedloop.v1.Generation") == "UNKNOWN(9)"


def test_backoff_grows_exponentially_under_its_cap_with_jitter():
    policy = RetryPolicy(max_attempts=6, initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2)
    rng = random.Random(1)
    for retry_number, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (5, 0.5)]:
        delays = [policy.backoff_s(retry_number, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # jitter spreads over the whole range


def test_events_without_an_id_get_a_fresh_uuid_and_given_ids_are_kept():
    first, second = event_to_proto(Rating("g", 1.0)), event_to_proto(Rating("g", 1.0))
    assert first.event_id != second.event_id and len(first.event_id) == 32
    assert event_to_proto(Comparison("a", "b", event_id="mine")).event_id == "mine"
    with pytest.raises(FeedloopClientError) as raised:
        event_to_proto(Rating("g", 1.0, scale="percent"))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.skipif(not openssl_available(), reason="the openssl command is not installed")
def test_mutual_tls_connects_with_the_ca_and_client_certificate(tmp_path):
    certs = make_certificates(tmp_path)
    credentials = grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=certs.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    with FakeServer(credentials) as fake:
        with FeedloopClient(
            fake.target,
            root_ca_path=certs.ca_cert,
            client_cert_path=certs.client_cert,
            client_key_path=certs.client_key,
            retry=FAST_RETRY,
        ) as client:
            assert client.status().live_version == "v0001"
        # Without the client certificate the handshake fails: the call never reaches a servicer.
        with (
            FeedloopClient(
                fake.target,
                root_ca_path=certs.ca_cert,
                retry=RetryPolicy(max_attempts=1),
                timeout_s=3,
            ) as client,
            pytest.raises(FeedloopClientError) as raised,
        ):
            client.status()
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        assert fake.script.calls == ["GetStatus"]


# ------------------------------------------------------------------------------ asyncio


async def test_async_client_generates_and_retries_feedback_with_one_event_id(fake):
    async with AsyncFeedloopClient(fake.target, retry=FAST_RETRY) as client:
        result = await client.generate("ocean", n=2)
        assert len(result.candidates) == 2
        fake.script.fail_next.append(UNAVAILABLE)
        ack = await client.compare(
            result.candidates[0].generation_id, result.candidates[1].generation_id
        )
        assert ack.outcome == "accepted"
        assert fake.script.calls == ["Generate", "Submit", "Submit"]
        assert list(fake.script.stored_events) == [ack.event_id]


async def test_async_client_raises_codes_and_admin_calls_work(fake):
    async with AsyncFeedloopClient(fake.target, retry=FAST_RETRY) as client:
        with pytest.raises(FeedloopClientError) as raised:
            await client.generate("x", model_version="v0042")
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
        assert (await client.list_models()).live_version == "v0001"
        assert (await client.set_live("v0002")).previous_version == "v0001"
        assert (await client.status()).live_version == "v0002"
        assert (await client.rollback()).live_version == "v0001"
        assert await client.health() == "SERVING"
        started = await client.start_trial("v0002", share=0.5, expected_live_version="v0001")
        assert started.trial is not None and started.trial.mode == "canary"
        assert (await client.end_trial(promote=False)).trial is None
        assert (await client.set_trainer_paused(True)).trainer_paused is True
        report = await client.online_report(window_s=60, alpha=0.2)
        assert report.alpha == 0.2 and report.versions[0].rating.count == 40


async def test_async_submit_many_survives_a_broken_stream(fake):
    fake.script.break_stream_after_acks = 2
    async with AsyncFeedloopClient(fake.target, retry=FAST_RETRY) as client:
        results = await client.submit_many([Rating(f"g{i}", 1.0) for i in range(4)])
    assert [r.outcome for r in results] == ["accepted"] * 4
    assert len(fake.script.stored_events) == 4


async def test_async_submit_many_reports_the_invalid_event_and_keeps_earlier_acks(fake):
    fake.script.invalid_event_ids = {"e1"}
    async with AsyncFeedloopClient(fake.target, retry=FAST_RETRY) as client:
        with pytest.raises(FeedloopClientError) as raised:
            await client.submit_many([Rating(f"g{i}", 1.0, event_id=f"e{i}") for i in range(3)])
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "e1" in raised.value.message
    assert list(fake.script.stored_events) == ["e0"]


def test_a_temperature_of_zero_is_sent_as_set_and_none_as_unset() -> None:
    greedy = generate_request("sea", 1, Sampling(temperature=0.0), None, None, None)
    assert greedy.sampling.HasField("temperature") and greedy.sampling.temperature == 0.0
    default = generate_request("sea", 1, Sampling(), None, None, None)
    assert not default.sampling.HasField("temperature")
    assert not default.return_token_logprobs
    assert generate_request("sea", 1, Sampling(), None, None, None, True).return_token_logprobs


def test_token_logprobs_are_read_from_the_reply() -> None:
    reply = pb.GenerateResponse(
        candidates=[
            pb.Candidate(tokens=["a", "b"], token_logprobs=[-0.5, -0.25], log_prob=-1.0),
            pb.Candidate(tokens=["c"]),
        ]
    )
    first, second = GenerateResult.from_proto(reply).candidates
    assert first.token_logprobs == (-0.5, -0.25)
    assert second.token_logprobs == ()


def test_the_service_config_documented_for_other_languages_is_the_clients():
    page = (Path(__file__).resolve().parents[1] / "docs" / "client.md").read_text()
    documented = page.split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(documented) == json.loads(service_config_json(RetryPolicy()))

"""The client spreads calls over several server replicas with gRPC's client-side round_robin."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import pytest
from client_fake_server import FakeServer

from feedloop.client import AsyncFeedloopClient, FeedloopClient, FeedloopClientError
from feedloop.client.options import ClientOptions, RetryPolicy, fleet_target, normalise_target

NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture
def fleet() -> Iterator[list[FakeServer]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(FakeServer()) for _ in range(3)]


def generate_calls(server: FakeServer) -> int:
    return server.script.calls.count("Generate")


def test_a_list_of_addresses_becomes_one_static_ipv4_target() -> None:
    assert fleet_target(["127.0.0.1:1", "10.0.0.2:2"]) == "ipv4:127.0.0.1:1,10.0.0.2:2"
    assert fleet_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert normalise_target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert normalise_target(["127.0.0.1:7"]) == "127.0.0.1:7"
    for kept in ("127.0.0.1:7", "dns:///feedloop.internal:50051", "ipv4:1.2.3.4:5,1.2.3.4:6"):
        assert normalise_target(kept) == kept


@pytest.mark.parametrize(
    ("addresses", "named"),
    [
        (["feedloop-a:1", "feedloop-b:1"], "feedloop-a:1"),  # names go through one DNS name
        (["127.0.0.1", "127.0.0.1:2"], "'127.0.0.1'"),  # no port
        (["127.0.0.1:1", "[::1]:2"], "cannot be mixed"),
        ([], "no server address"),
    ],
)
def test_addresses_that_cannot_form_a_static_list_are_refused_naming_the_target(
    addresses: list[str], named: str
) -> None:
    with pytest.raises(ValueError, match="target") as err:
        fleet_target(addresses)
    assert named in str(err.value)


def lb_policy(options: ClientOptions) -> str | None:
    for key, value in options.channel_args():
        if key == "grpc.service_config":
            # one service config per channel: the balancing policy rides with the retries
            configs = json.loads(str(value)).get("loadBalancingConfig")
            if configs is None:
                return None
            (config,) = configs
            (name,) = config
            return str(name)
    return None


def test_round_robin_is_chosen_where_the_target_names_several_servers() -> None:
    assert lb_policy(ClientOptions(target=["127.0.0.1:1", "127.0.0.1:2"])) == "round_robin"
    assert lb_policy(ClientOptions(target="dns:///feedloop.internal:50051")) == "round_robin"
    assert lb_policy(ClientOptions(target="127.0.0.1:1")) is None  # gRPC's default
    assert lb_policy(ClientOptions(target="127.0.0.1:1", load_balancing="round_robin")) == (
        "round_robin"
    )
    chosen = ClientOptions(target="127.0.0.1:1,127.0.0.1:2", load_balancing="pick_first")
    assert lb_policy(chosen) == "pick_first"
    with pytest.raises(ValueError, match="load_balancing"):
        ClientOptions(load_balancing="random")


def test_calls_are_spread_evenly_over_every_replica(fleet: list[FakeServer]) -> None:
    with FeedloopClient([s.target for s in fleet], timeout_s=5) as client:
        client.wait_until_serving(timeout_s=5)
        for _ in range(30):
            client.generate("ocean")
    # round_robin takes the ready replicas in turn: each gets a third, once all are connected
    assert sorted(generate_calls(s) for s in fleet)[0] >= 8
    assert sum(generate_calls(s) for s in fleet) == 30


async def test_the_asyncio_client_spreads_its_calls_too(fleet: list[FakeServer]) -> None:
    target = ",".join(s.target for s in fleet)
    async with AsyncFeedloopClient(target, timeout_s=5) as client:
        for _ in range(30):
            await client.generate("ocean")
    assert all(generate_calls(s) >= 8 for s in fleet)


def test_one_address_keeps_grpcs_default_and_sticks_to_its_server(
    fleet: list[FakeServer],
) -> None:
    with FeedloopClient(fleet[0].target, timeout_s=5) as client:
        for _ in range(5):
            client.generate("ocean")
    assert [generate_calls(s) for s in fleet] == [5, 0, 0]


def test_a_stopped_replica_is_skipped_and_the_calls_go_to_the_others(
    fleet: list[FakeServer],
) -> None:
    with FeedloopClient([s.target for s in fleet], timeout_s=5) as client:
        for _ in range(6):
            client.generate("ocean")
        fleet[1].__exit__(None, None, None)
        before = [generate_calls(s) for s in fleet]
        for _ in range(20):
            client.generate("ocean")  # a call caught by the stop is retried (UNAVAILABLE)
    after = [generate_calls(s) for s in fleet]
    assert after[1] == before[1]
    assert after[0] - before[0] + after[2] - before[2] == 20


def test_a_fleet_target_keeps_the_retry_policy_in_its_one_service_config() -> None:
    # gRPC takes one service config per channel: a second grpc.service_config option would
    # replace the first, so a fleet client would silently lose its retries (or its balancing).
    args = ClientOptions(target=["127.0.0.1:1", "127.0.0.1:2"]).channel_args()
    configs = [json.loads(str(value)) for key, value in args if key == "grpc.service_config"]
    assert len(configs) == 1
    (config,) = configs
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["methodConfig"][0]["retryPolicy"]["maxAttempts"] >= 2


def seconds_until_a_call_succeeds(client: FeedloopClient, limit_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        try:
            client.generate("ocean", timeout_s=0.2)
            return time.monotonic() - start
        except FeedloopClientError:
            time.sleep(0.02)
    return float("inf")


@pytest.mark.slow
def test_a_restarted_server_gets_its_calls_back_within_the_reconnect_bound() -> None:
    # gRPC's own reconnect backoff doubles to 120 s: after 6 s down, the next attempt to reach
    # the server would come 1 to 4 s after it is back. The client bounds it (0.3 s here).
    with FakeServer() as first:
        port = first.port
        with FeedloopClient(
            first.target, timeout_s=2, max_reconnect_backoff_s=0.3, retry=NO_RETRY
        ) as client:
            client.generate("ocean")
            first.__exit__(None, None, None)
            down_until = time.monotonic() + 6.0
            while time.monotonic() < down_until:  # callers keep trying while it is down
                with contextlib.suppress(FeedloopClientError):
                    client.generate("ocean", timeout_s=0.2)
                time.sleep(0.05)
            with FakeServer(port=port) as again:
                back_s = seconds_until_a_call_succeeds(client, limit_s=10)
                assert again.script.calls.count("Generate") == 1
    assert back_s < 1.5, back_s


def test_the_reconnect_bound_reaches_the_channel_and_is_checked() -> None:
    args = dict(ClientOptions(target="127.0.0.1:1").channel_args())
    assert args["grpc.max_reconnect_backoff_ms"] == 2000  # the default bound
    assert "grpc.initial_reconnect_backoff_ms" not in args  # gRPC's 1 s first wait is below it
    short = dict(ClientOptions(target="127.0.0.1:1", max_reconnect_backoff_s=0.25).channel_args())
    assert short["grpc.max_reconnect_backoff_ms"] == 250
    assert short["grpc.initial_reconnect_backoff_ms"] == 250
    with pytest.raises(ValueError, match="max_reconnect_backoff_s"):
        ClientOptions(max_reconnect_backoff_s=0)

"""The outside-in probe in CI (tests/security_probe.py): every category of attempt against a
real server with keys; none answered INTERNAL or UNKNOWN, no refused attempt changed state, no
tenant's feedback on another tenant's generation. Plus a hypothesis sweep of the admin RPCs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from security_probe import NEVER, Probe, Report, md, run_probe, write_keys
from server_harness import running_server, seeded_registry, test_config

from feedloop.v1 import feedloop_pb2 as pb


async def test_no_attempt_reaches_internal_changes_state_or_crosses_tenants(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    report = await run_probe(tmp_path, tiny_checkpoint)
    assert report.problems == []
    assert set(report.codes) == {"auth", "strings", "numbers", "tenancy", "replies", "rate limits"}
    assert sum(sum(c.values()) for c in report.codes.values()) >= 140
    assert all(code not in {c.name for c in NEVER} for c in report.codes.values() for code in c)


texts = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", "v0001", "v" + "0" * 255, "../../etc", "a\x00b", "v" * 70]),
    st.builds(lambda n: "x" * n, st.integers(0, 3000)),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0])
)


@pytest.fixture
async def probe(tmp_path: Path, tiny_checkpoint: Path):
    keys = write_keys(tmp_path / "keys.toml")
    config = test_config(tmp_path, auth_keys_file=keys, unknown_generation_wait_ms=0.0)
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(config, registry=registry) as live:
        yield Probe(live, Report())


async def test_admin_rpcs_with_any_strings_and_numbers_never_fail_inside(probe: Probe) -> None:
    a, ops = probe.a, md("ops")
    calls = [
        lambda s, x: a.SetLive(
            pb.SetLiveRequest(version=s, reason=s, expected_live_version=s), metadata=ops
        ),
        lambda s, x: a.StartTrial(pb.StartTrialRequest(version=s, share=x, reason=s), metadata=ops),
        lambda s, x: a.EndTrial(
            pb.EndTrialRequest(expected_trial_version=s, reason=s), metadata=ops
        ),
        lambda s, x: a.SetPinned(
            pb.SetPinnedRequest(version=s, pinned=True, reason=s), metadata=ops
        ),
        lambda s, x: a.GetOnlineReport(
            pb.GetOnlineReportRequest(versions=[s], window_s=x, alpha=x), metadata=ops
        ),
        lambda s, x: a.Rollback(pb.RollbackRequest(reason=s), metadata=ops),
    ]
    seen: list[tuple[str, grpc.StatusCode]] = []
    loop = asyncio.get_running_loop()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(which=st.integers(0, len(calls) - 1), text=texts, number=floats)
    def prop(which: int, text: str, number: float) -> None:
        # Each example runs on the test's loop, from hypothesis's thread.
        code = asyncio.run_coroutine_threadsafe(
            probe.attempt(
                "hypothesis", f"{which} {text[:20]!r} {number}", lambda: calls[which](text, number)
            ),
            loop,
        ).result(timeout=30)
        seen.append((text, code))

    await asyncio.to_thread(prop)
    assert probe.report.problems == []
    assert len(seen) >= 30

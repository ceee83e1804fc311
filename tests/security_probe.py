"""The outside-in security probe: what an attacker and a careless client send, by category.

A real server (in this process, on loopback, with an API key file: two tenants, a labeller, an
admin) is called through the generated stubs only. Every attempt records its status code; the
probe checks that no attempt is answered INTERNAL or UNKNOWN, that no refused attempt changed
the store or the registry, and that no tenant's feedback landed on another tenant's generation.
tests/test_security_probe.py runs it in CI; run it by hand for the table in docs/security.md:

    .venv/bin/python tests/security_probe.py
"""

from __future__ import annotations

import asyncio
import collections
import math
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from feedloop.v1 import feedloop_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_harness import Running, running_server, seeded_registry, test_config

KEYS = {
    "acme": ("k-acme", 'tenant = "acme"', ["generate", "feedback"]),
    "beta": ("k-beta", "", ["generate", "feedback"]),
    "console": ("k-console", "", ["feedback", "labeller"]),
    "ops": ("k-ops", "", ["admin"]),
}
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
OK = grpc.StatusCode.OK
HUGE = 100_000
CORE_WRITE_RACE = "Internal error from Core"


def md(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[name][0]}"),)


def write_keys(path: Path) -> Path:
    path.write_text(
        "\n".join(
            f'[[keys]]\nname = "{n}"\nkey = "{k}"\n{t}\nroles = {r!r}\n'
            for n, (k, t, r) in KEYS.items()
        ),
        encoding="utf-8",
    )
    return path


@dataclass
class Report:
    """Outcomes by category: attempts, codes, and what went wrong (empty when nothing did)."""

    codes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    problems: list[str] = field(default_factory=list)
    # Client-side INTERNALs of grpc/grpc#36066 replaced by the server's answer (see attempt).
    client_races: int = 0

    def table(self) -> str:
        lines = ["| category | attempts | outcomes |", "| --- | ---: | --- |"]
        for category, codes in self.codes.items():
            outcomes = ", ".join(f"{code} {n}" for code, n in codes.most_common())
            lines.append(f"| {category} | {sum(codes.values())} | {outcomes} |")
        return "\n".join(lines)


async def _code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        result = call
        if hasattr(result, "__aiter__"):
            async for _ in result:  # a stream: read it to its end
                pass
        else:
            await result
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


class Probe:
    def __init__(self, live: Running, report: Report) -> None:
        self.live = live
        self.report = report
        self.g, self.f, self.a = live.generation, live.feedback, live.admin

    async def state(self) -> tuple[Any, ...]:
        server = self.live.server
        await asyncio.to_thread(server.generation_log.flush, 5.0)
        counts = await asyncio.to_thread(server.store.counts)
        registry = server.registry
        history = await asyncio.to_thread(registry.history, 10_000)
        pointer = await asyncio.to_thread(registry.pointer)
        pins = await asyncio.to_thread(registry.pins)
        return counts.generations, counts.feedback, len(history), pointer, tuple(pins)

    async def attempt(
        self,
        category: str,
        what: str,
        make: Callable[[], Any],
        allowed: tuple[grpc.StatusCode, ...] = (),
        *,
        acks_stay: bool = False,
    ) -> grpc.StatusCode:
        """One call: its code is recorded; INTERNAL/UNKNOWN, a refused call that changed state,
        or a code outside `allowed` (when given) is a problem. acks_stay: a stream whose events
        acknowledged before its refusal stay stored (as promised)."""
        before = await self.state()
        answered = self.server_codes()
        code, details = await _code(make())
        sent = self.server_codes() - answered  # what the server itself answered
        if code == grpc.StatusCode.INTERNAL and details == CORE_WRITE_RACE and sent:
            # grpc/grpc#36066: an asyncio client still writing a stream the server has ended
            # may report INTERNAL in place of the server's status. The server's is the answer.
            (name,) = sent
            code = grpc.StatusCode[name]
            self.report.client_races += 1
        for name in sent:
            if name in {c.name for c in NEVER}:
                self.report.problems.append(f"{category}: {what}: the server answered {name}")
        self.report.codes[category][code.name] += 1
        if code in NEVER:
            self.report.problems.append(f"{category}: {what}: {code.name} {details[:200]!r}")
        if allowed and code not in allowed:
            self.report.problems.append(f"{category}: {what}: {code.name}, expected {allowed}")
        if code != OK and not acks_stay and await self.state() != before:
            self.report.problems.append(f"{category}: {what}: refused ({code.name}) but changed")
        return code

    def server_codes(self) -> collections.Counter[str]:
        """The server's own count of answered RPCs by status code (feedloop_requests)."""
        counts: collections.Counter[str] = collections.Counter()
        for metric in self.live.server.metrics.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["code"]] += int(sample.value)
        return counts

    async def reply(self, who: str, n: int = 2, request_id: str = "") -> pb.GenerateResponse:
        request = pb.GenerateRequest(prompt="green hills", num_candidates=n, request_id=request_id)
        return await self.g.Generate(request, metadata=md(who), timeout=10)

    # -- categories -------------------------------------------------------------------------

    async def auth(self) -> None:
        gid = (await self.reply("acme")).candidates[0].generation_id
        event = pb.FeedbackEvent(event_id="auth", rating=pb.Rating(generation_id=gid, score=1))
        calls: dict[str, tuple[str, Callable[..., Any]]] = {
            "Generate": (
                "generate",
                lambda m: self.g.Generate(pb.GenerateRequest(prompt="x"), metadata=m),
            ),
            "Submit": ("feedback", lambda m: self.f.Submit(event, metadata=m)),
            "SubmitStream": ("feedback", lambda m: self.f.SubmitStream(iter([event]), metadata=m)),
            "ListModels": (
                "admin",
                lambda m: self.a.ListModels(pb.ListModelsRequest(), metadata=m),
            ),
            "GetStatus": ("admin", lambda m: self.a.GetStatus(pb.GetStatusRequest(), metadata=m)),
            "SetLive": (
                "admin",
                lambda m: self.a.SetLive(pb.SetLiveRequest(version="v0001"), metadata=m),
            ),
            "Rollback": ("admin", lambda m: self.a.Rollback(pb.RollbackRequest(), metadata=m)),
            "StartTrial": (
                "admin",
                lambda m: self.a.StartTrial(
                    pb.StartTrialRequest(version="v0001", share=0.1), metadata=m
                ),
            ),
            "EndTrial": ("admin", lambda m: self.a.EndTrial(pb.EndTrialRequest(), metadata=m)),
            "SetTrainerPaused": (
                "admin",
                lambda m: self.a.SetTrainerPaused(
                    pb.SetTrainerPausedRequest(paused=True), metadata=m
                ),
            ),
            "SetPinned": (
                "admin",
                lambda m: self.a.SetPinned(
                    pb.SetPinnedRequest(version="v0001", pinned=True), metadata=m
                ),
            ),
            "GetOnlineReport": (
                "admin",
                lambda m: self.a.GetOnlineReport(pb.GetOnlineReportRequest(), metadata=m),
            ),
        }
        unauth, denied = (grpc.StatusCode.UNAUTHENTICATED,), (grpc.StatusCode.PERMISSION_DENIED,)
        for method, (role, call) in calls.items():
            wrong_role = "ops" if role != "admin" else "acme"
            for label, metadata, allowed in (
                ("no key", (), unauth),
                ("unknown key", (("authorization", "Bearer nope"),), unauth),
                ("not bearer", (("authorization", "Basic k-ops"),), unauth),
                ("wrong role", md(wrong_role), denied),
            ):
                await self.attempt(
                    "auth", f"{method} {label}", lambda c=call, m=metadata: c(m), allowed
                )

    async def strings(self) -> None:
        g, f, a, ops = self.g, self.f, self.a, md("ops")
        gid = (await self.reply("acme")).candidates[0].generation_id
        invalid = (grpc.StatusCode.INVALID_ARGUMENT,)
        generate = [
            pb.GenerateRequest(prompt="x" * HUGE),
            pb.GenerateRequest(prompt="a\x00b"),
            pb.GenerateRequest(prompt=""),
            pb.GenerateRequest(prompt="x", request_id="r" * 129),
            pb.GenerateRequest(prompt="x", request_id="r\x00"),
            pb.GenerateRequest(prompt="x", routing_key="k" * HUGE),
            pb.GenerateRequest(prompt="x", model_version="v" * 65),
            pb.GenerateRequest(prompt="x", model_version="v" * HUGE),
            pb.GenerateRequest(prompt="x", model_version="v\x00"),
        ]
        for i, request in enumerate(generate):
            await self.attempt(
                "strings",
                f"Generate {i}",
                lambda r=request: g.Generate(r, metadata=md("acme")),
                invalid,
            )
        events = [
            pb.FeedbackEvent(event_id="e" * 129, rating=pb.Rating(generation_id=gid, score=1)),
            pb.FeedbackEvent(event_id="e" * HUGE, rating=pb.Rating(generation_id=gid, score=1)),
            pb.FeedbackEvent(event_id="e\x00", rating=pb.Rating(generation_id=gid, score=1)),
            pb.FeedbackEvent(event_id="s1", rating=pb.Rating(generation_id="g" * HUGE, score=1)),
            pb.FeedbackEvent(event_id="s2", rating=pb.Rating(generation_id="g\x00", score=1)),
            pb.FeedbackEvent(
                event_id="s3", correction=pb.Correction(generation_id=gid, text="t" * HUGE)
            ),
            pb.FeedbackEvent(
                event_id="s4", correction=pb.Correction(generation_id=gid, text="t\x00")
            ),
            pb.FeedbackEvent(event_id="s5", ranking=pb.Ranking(generation_ids=["g" * HUGE, gid])),
        ]
        for i, event in enumerate(events):
            await self.attempt(
                "strings", f"Submit {i}", lambda e=event: f.Submit(e, metadata=md("acme")), invalid
            )
        long_name, reason = "v" + "0" * 255, "r" * 600_000
        admin = [
            lambda: a.SetLive(pb.SetLiveRequest(version=long_name), metadata=ops),
            lambda: a.SetLive(pb.SetLiveRequest(version="v" * HUGE), metadata=ops),
            lambda: a.SetLive(pb.SetLiveRequest(version="v0001\x00"), metadata=ops),
            lambda: a.SetLive(pb.SetLiveRequest(version="v0001", reason=reason), metadata=ops),
            lambda: a.SetLive(
                pb.SetLiveRequest(version="v0001", expected_live_version="v" * HUGE), metadata=ops
            ),
            lambda: a.Rollback(pb.RollbackRequest(reason=reason), metadata=ops),
            lambda: a.StartTrial(pb.StartTrialRequest(version=long_name, share=0.1), metadata=ops),
            lambda: a.StartTrial(
                pb.StartTrialRequest(version="v0001", share=0.1, reason=reason), metadata=ops
            ),
            lambda: a.EndTrial(pb.EndTrialRequest(reason=reason), metadata=ops),
            lambda: a.EndTrial(pb.EndTrialRequest(expected_trial_version=long_name), metadata=ops),
            lambda: a.SetTrainerPaused(
                pb.SetTrainerPausedRequest(paused=True, reason=reason), metadata=ops
            ),
            lambda: a.SetPinned(pb.SetPinnedRequest(version=long_name, pinned=True), metadata=ops),
            lambda: a.SetPinned(
                pb.SetPinnedRequest(version="v0001", pinned=True, reason=reason), metadata=ops
            ),
            lambda: a.GetOnlineReport(pb.GetOnlineReportRequest(versions=["v" * 65]), metadata=ops),
            lambda: a.GetOnlineReport(
                pb.GetOnlineReportRequest(versions=["v0001"] * 65), metadata=ops
            ),
            lambda: a.GetOnlineReport(pb.GetOnlineReportRequest(versions=[""]), metadata=ops),
        ]
        for i, call in enumerate(admin):
            await self.attempt("strings", f"admin {i}", call, invalid)
        # Names that reach the registry: refused or unknown, never a file outside it.
        for name in ("../../etc/passwd", "/etc/passwd", "v0001/../v0001", "CON", "v0002"):
            await self.attempt(
                "strings",
                f"SetLive {name!r}",
                lambda n=name: a.SetLive(pb.SetLiveRequest(version=n), metadata=ops),
                (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT),
            )

    async def numbers(self) -> None:
        g, f, a, ops = self.g, self.f, self.a, md("ops")
        gid = (await self.reply("acme")).candidates[0].generation_id
        sampling = [
            {"temperature": 1e-38},
            {"temperature": 0.0099},
            {"temperature": -1.0},
            {"temperature": math.nan},
            {"temperature": math.inf},
            {"temperature": 1e38},
            {"temperature": 0.0},
            {"temperature": 0.01},
            {"top_p": -1.0},
            {"top_p": 2.0},
            {"top_p": math.nan},
            {"top_k": -1},
            {"top_k": 2**31 - 1},
            {"max_tokens": -1},
            {"max_tokens": 10**6},
            {"seed": 2**64 - 1},
        ]
        for values in sampling:
            request = pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(**values))
            await self.attempt(
                "numbers",
                f"Generate {values}",
                lambda r=request: g.Generate(r, metadata=md("acme")),
            )
        for n in (-1, 9, 10**6):
            request = pb.GenerateRequest(prompt="x", num_candidates=n)
            await self.attempt(
                "numbers",
                f"num_candidates {n}",
                lambda r=request: g.Generate(r, metadata=md("acme")),
            )
        for i, (score, scale) in enumerate(
            [
                (math.nan, 0),
                (math.inf, 0),
                (-math.inf, 3),
                (1e308, 3),
                (-0.0, 0),
                (1.0, 99),
                (0.5, 2),
            ]
        ):
            event = pb.FeedbackEvent(
                event_id=f"n{i}", rating=pb.Rating(generation_id=gid, score=score, scale=scale)
            )
            await self.attempt(
                "numbers",
                f"rating {score} {scale}",
                lambda e=event: f.Submit(e, metadata=md("acme")),
            )
        admin = [
            pb.GetOnlineReportRequest(window_s=math.nan),
            pb.GetOnlineReportRequest(window_s=-1),
            pb.GetOnlineReportRequest(window_s=math.inf),
            pb.GetOnlineReportRequest(alpha=math.nan),
            pb.GetOnlineReportRequest(alpha=1.0),
            pb.GetOnlineReportRequest(alpha=-1.0),
        ]
        for request in admin:
            await self.attempt(
                "numbers", f"report {request}", lambda r=request: a.GetOnlineReport(r, metadata=ops)
            )
        for share in (math.nan, -0.1, 1.1, math.inf):
            request = pb.StartTrialRequest(version="v0001", share=share)
            await self.attempt(
                "numbers", f"share {share}", lambda r=request: a.StartTrial(r, metadata=ops)
            )
        for n in (-1, 10**9):
            request = pb.ListModelsRequest(max_decisions=n)
            await self.attempt(
                "numbers", f"max_decisions {n}", lambda r=request: a.ListModels(r, metadata=ops)
            )

    async def tenancy(self) -> None:
        f = self.f
        reply = await self.reply("acme", 2)
        a0, a1 = (c.generation_id for c in reply.candidates)
        not_found = (grpc.StatusCode.NOT_FOUND,)
        cross = [
            pb.FeedbackEvent(event_id="t1", rating=pb.Rating(generation_id=a0, score=0)),
            pb.FeedbackEvent(event_id="t2", ranking=pb.Ranking(generation_ids=[a1, a0])),
            pb.FeedbackEvent(
                event_id="t3", comparison=pb.Comparison(preferred_id=a1, rejected_id=a0)
            ),
            pb.FeedbackEvent(
                event_id="t4", correction=pb.Correction(generation_id=a0, text="mine")
            ),
        ]
        for event in cross:
            for send in ("unary", "stream"):
                call = (
                    (lambda e=event: f.Submit(e, metadata=md("beta")))
                    if send == "unary"
                    else (lambda e=event: f.SubmitStream(iter([e]), metadata=md("beta")))
                )
                await self.attempt(
                    "tenancy", f"beta {event.WhichOneof('kind')} {send}", call, not_found
                )
        # acme's event, then beta's own event under the same id: two events, acme's unchanged.
        own = pb.FeedbackEvent(event_id="order-42", rating=pb.Rating(generation_id=a0, score=1))
        await self.attempt(
            "tenancy", "acme order-42", lambda: f.Submit(own, metadata=md("acme")), (OK,)
        )
        b0 = (await self.reply("beta", 1)).candidates[0].generation_id
        theirs = pb.FeedbackEvent(event_id="order-42", rating=pb.Rating(generation_id=b0, score=0))
        await self.attempt(
            "tenancy", "beta order-42", lambda: f.Submit(theirs, metadata=md("beta")), (OK,)
        )
        changed = pb.FeedbackEvent(event_id="order-42", rating=pb.Rating(generation_id=a0, score=0))
        await self.attempt(
            "tenancy",
            "acme order-42 changed",
            lambda: f.Submit(changed, metadata=md("acme")),
            (grpc.StatusCode.ALREADY_EXISTS,),
        )
        labelled = pb.FeedbackEvent(event_id="lab", rating=pb.Rating(generation_id=a0, score=1))
        await self.attempt(
            "tenancy", "labeller", lambda: f.Submit(labelled, metadata=md("console")), (OK,)
        )
        stored = await asyncio.to_thread(self.live.server.store.feedback_for, [a0, a1])
        foreign = [e for e in stored if e.client_id not in ("acme", "console")]
        if foreign:
            self.report.problems.append(f"tenancy: another tenant's feedback stored: {foreign}")

    async def replies(self) -> None:
        f = self.f
        first, second = await self.reply("acme", 4, "same"), await self.reply("acme", 4, "same")
        beta = await self.reply("beta", 2)
        ids = [c.generation_id for c in (*first.candidates, *second.candidates)]
        invalid = (grpc.StatusCode.INVALID_ARGUMENT,)
        rankings = {
            "two replies, one request_id": (ids, invalid),
            "longer than a reply": ([f"{i:032x}" for i in range(9)], invalid),
            "repeated id": ([ids[0], ids[0]], invalid),
            "mixing tenants": (
                [ids[0], beta.candidates[0].generation_id],
                (grpc.StatusCode.NOT_FOUND,),
            ),
            "one reply": ([c.generation_id for c in first.candidates], (OK,)),
        }
        for label, (ranking, allowed) in rankings.items():
            event = pb.FeedbackEvent(
                event_id=f"r-{label}", ranking=pb.Ranking(generation_ids=ranking)
            )
            await self.attempt(
                "replies", label, lambda e=event: f.Submit(e, metadata=md("acme")), allowed
            )


async def rate_limits(live: Running, report: Report) -> None:
    """On a server with a limit of 5 tokens/s (burst 5): work beyond it is refused."""
    probe = Probe(live, report)
    exhausted = (grpc.StatusCode.RESOURCE_EXHAUSTED,)
    gid = (await probe.reply("acme", 1)).candidates[0].generation_id
    events = [
        pb.FeedbackEvent(event_id=f"f{i}", rating=pb.Rating(generation_id=gid, score=1))
        for i in range(2000)
    ]
    await probe.attempt(
        "rate limits",
        "2,000 events in one stream",
        lambda: probe.f.SubmitStream(iter(events), metadata=md("acme")),
        exhausted,
        acks_stay=True,
    )
    stored = await asyncio.to_thread(live.server.store.feedback_after, 0, 10_000)
    if len(stored) > 5:
        report.problems.append(f"rate limits: {len(stored)} events stored past a burst of 5")
    request = pb.GenerateRequest(prompt="x", num_candidates=8)
    await probe.attempt(
        "rate limits",
        "8 candidates past the budget",
        lambda: probe.g.Generate(request, metadata=md("beta")),
        exhausted,
    )

    async def silent() -> AsyncIterator[pb.FeedbackEvent]:
        await asyncio.sleep(3600)
        yield pb.FeedbackEvent()

    await probe.attempt(
        "rate limits",
        "a silent stream",
        lambda: probe.f.SubmitStream(silent(), metadata=md("console"), timeout=10),
        (grpc.StatusCode.DEADLINE_EXCEEDED,),
    )


async def run_probe(tmp: Path, checkpoint: Path) -> Report:
    report = Report()
    keys = write_keys(tmp / "keys.toml")
    registry = seeded_registry(tmp / "registry", checkpoint)
    config = test_config(tmp, auth_keys_file=keys, unknown_generation_wait_ms=0.0)
    async with running_server(config, registry=registry) as live:
        probe = Probe(live, report)
        for category in (probe.auth, probe.strings, probe.numbers, probe.tenancy, probe.replies):
            await category()
    limited = tmp / "limited"
    limited.mkdir()
    config = test_config(
        limited,
        auth_keys_file=keys,
        rate_limit_rps=5.0,
        rate_limit_burst=5,
        stream_idle_timeout_s=0.5,
        unknown_generation_wait_ms=0.0,
    )
    async with running_server(
        config, registry=seeded_registry(limited / "registry", checkpoint)
    ) as live:
        await rate_limits(live, report)
    return report


def main() -> int:
    from feedloop.core.pretrain import PretrainConfig, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        # A tiny policy of its own (seconds to train): the probe tests the edges, not the model.
        checkpoint = pretrain(
            PretrainConfig(
                data_dir=Path(tmp) / "tiny",
                epochs=1,
                embedding_dim=16,
                hidden_dim=32,
                value_hidden_dim=16,
                batch_size=256,
                eval_samples=4,
                resume=False,
                torch_threads=1,
            ),
            progress=False,
        ).checkpoint
        report = asyncio.run(run_probe(Path(tmp), checkpoint))
    print(report.table())
    total = sum(sum(c.values()) for c in report.codes.values())
    print(f"\n{total} attempts; problems: {len(report.problems)}")
    print(
        "client-side INTERNALs of grpc/grpc#36066 (the server answered otherwise): "
        f"{report.client_races}"
    )
    for problem in report.problems:
        print(f"  {problem}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

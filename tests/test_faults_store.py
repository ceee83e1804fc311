"""Fault matrix, store side: a full disk, a slow store, PostgreSQL restarted under load, and
text PostgreSQL cannot hold.

Each test breaks the store for real (a tmpfs filled to the last page, writes slowed down, the
database cluster restarted) while a real server serves, then asserts: the right code came back,
fast; generation kept working; nothing acknowledged was lost or damaged; service came back by
itself once the fault was gone.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import grpc
import pytest
from faults_procs import is_serving, seeded_data_dir, server_process, wait_for
from faults_store import QuotaDisk, SlowStore, pg_ctlcluster, postgres_cluster, small_disk
from pg_support import fresh_schema, schema_url
from server_harness import rating, running_server, seeded_registry, test_config, wait_until

from feedloop.core.store import open_store
from feedloop.core.store.sqlite import SQLiteStore
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

ACCEPTED, DUPLICATE = pb.FEEDBACK_OUTCOME_ACCEPTED, pb.FEEDBACK_OUTCOME_DUPLICATE
CODE = grpc.StatusCode


async def generate_ids(live, n: int = 4, prompt: str = "full disk") -> list[str]:
    reply = await live.generation.Generate(
        pb.GenerateRequest(prompt=prompt, num_candidates=n), timeout=10
    )
    return [c.generation_id for c in reply.candidates]


async def submit_code(live, event: pb.FeedbackEvent, timeout_s: float = 10.0):
    try:
        ack = await live.feedback.Submit(event, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return CODE.OK, ack.outcome


# -- the disk fills up -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("disk_kind", ["tmpfs", "sqlite-quota"])
async def test_full_disk_refuses_feedback_clearly_keeps_generating_damages_nothing_and_recovers(
    tmp_path: Path, tiny_checkpoint: Path, disk_kind: str
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    on_tmpfs = disk_kind == "tmpfs"
    disk_size_bytes = 4 * 1024 * 1024
    with small_disk(tmp_path / "disk", disk_size_bytes) if on_tmpfs else nullcontext() as disk:
        if on_tmpfs and disk is None:
            pytest.skip("cannot mount a tmpfs here (needs root); the sqlite-quota case runs")
        store_path = (tmp_path / "disk" if disk else tmp_path) / "replay.sqlite3"
        store = SQLiteStore(store_path)
        filler = disk or QuotaDisk(store)
        config = test_config(tmp_path, store=str(store_path))
        async with running_server(config, registry=registry, store=store) as live:
            committed = await generate_ids(live)
            await wait_until(lambda: live.server.generation_log.depth == 0)
            acked: list[str] = []
            for i, gid in enumerate(committed):
                code, outcome = await submit_code(live, rating(f"before-{i}", gid))
                assert (code, outcome) == (CODE.OK, ACCEPTED)
                acked.append(f"before-{i}")

            await asyncio.to_thread(filler.fill)
            # Writes that still fit in space SQLite already holds may succeed (and are then
            # durable); keep writing until the disk says no.
            refusal = None
            for i in range(5000):
                event_id = f"during-{i}"
                code, detail = await submit_code(live, rating(event_id, committed[i % 4]))
                if code == CODE.OK:
                    acked.append(event_id)
                    continue
                refusal = (code, detail)
                break
            assert refusal is not None, "the full disk never refused a write"
            assert refusal[0] == CODE.RESOURCE_EXHAUSTED, refusal
            assert "full" in refusal[1]

            # Generation keeps working: replies are served while the log buffers them (or
            # commits them, where the store still holds free pages of its generations table).
            during = await generate_ids(live, prompt="while full")
            assert len(during) == 4

            await asyncio.to_thread(filler.free)
            # Recovery by itself: the buffered generations are committed, feedback flows again.
            await wait_until(lambda: live.server.generation_log.depth == 0, timeout_s=30)
            for i, gid in enumerate(during):
                code, outcome = await submit_code(live, rating(f"after-{i}", gid))
                assert (code, outcome) == (CODE.OK, ACCEPTED)
                acked.append(f"after-{i}")
            code, outcome = await submit_code(live, rating(acked[0], committed[0]))
            assert (code, outcome) == (CODE.OK, DUPLICATE)

        # Nothing acknowledged was lost or damaged.
        check = sqlite3.connect(store_path)
        try:
            assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            check.close()
        reopened = open_store(str(store_path))
        try:
            stored = [f.event_id for f in reopened.feedback_after(0, 100_000)]
            assert len(reopened.get_generations(committed + during)) == 8
        finally:
            reopened.close()
        assert sorted(stored) == sorted(acked)


# -- a slow store ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_slow_store_pushes_back_with_unavailable_in_time_and_memory_stays_bounded(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    slow = SlowStore(SQLiteStore(tmp_path / "replay.sqlite3"), write_delay_s=0.0)
    config = test_config(
        tmp_path,
        feedback_queue_size=32,
        generation_buffer_size=64,
        write_batch_max=16,
        max_batch_size=8,
    )
    async with running_server(config, registry=registry, store=slow) as live:
        ids = await generate_ids(live, n=8)
        await wait_until(lambda: live.server.generation_log.depth == 0)
        slow.write_delay_s = 0.5

        # Feedback: 300 concurrent events against a queue of 32 and commits of 16 per 0.5 s.
        async def send(i: int):
            started = time.monotonic()
            code, _ = await submit_code(live, rating(f"slow-{i}", ids[i % 8]), timeout_s=5)
            return i, code, time.monotonic() - started

        results = await asyncio.gather(*(send(i) for i in range(300)))
        codes = [code for _, code, _ in results]
        assert set(codes) <= {CODE.OK, CODE.UNAVAILABLE, CODE.RESOURCE_EXHAUSTED}, set(codes)
        refused = [i for i, code, _ in results if code != CODE.OK]
        assert refused, "no back-pressure: every event was queued"
        assert slow.largest_feedback_batch <= config.write_batch_max

        # Generation: the log buffer (64 rows) fills behind 0.5 s commits of at most 16 rows.
        depths: list[int] = []

        async def gen(i: int):
            try:
                await live.generation.Generate(
                    pb.GenerateRequest(prompt=f"slow {i}", num_candidates=2), timeout=30
                )
                code = CODE.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            depths.append(live.server.generation_log.depth)
            return code

        # Two waves: the first fills the buffer (each request is admitted while there is room
        # when it arrives), the second finds it full.
        gen_codes = await asyncio.gather(*(gen(i) for i in range(100)))
        gen_codes += await asyncio.gather(*(gen(i) for i in range(100, 200)))
        assert set(gen_codes) <= {CODE.OK, CODE.UNAVAILABLE, CODE.RESOURCE_EXHAUSTED}
        assert CODE.UNAVAILABLE in gen_codes or CODE.RESOURCE_EXHAUSTED in gen_codes
        # Bounded: the buffer overshoots its capacity by at most the rows of batches already
        # admitted before it filled (one batcher queue's worth), never without limit.
        assert max(depths) <= (
            config.generation_buffer_size + config.max_queue_size * config.max_candidates
        )

        slow.write_delay_s = 0.0
        await wait_until(lambda: live.server.generation_log.depth == 0, timeout_s=30)
        stored = {f.event_id for f in slow.feedback_after(0, 100_000)}
        accepted = {f"slow-{i}" for i, code, _ in results if code == CODE.OK}
        assert stored == accepted, "refused events are not stored, accepted ones are"


# -- a store outage ----------------------------------------------------------------------------


@pytest.fixture
async def flaky(tmp_path: Path, tiny_checkpoint: Path):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    store = SlowStore(SQLiteStore(tmp_path / "replay.sqlite3"))
    async with running_server(test_config(tmp_path), registry=registry, store=store) as live:
        yield live, store


async def test_a_store_outage_answers_unavailable_keeps_generating_and_recovers_losing_nothing(
    flaky,
) -> None:
    live, store = flaky
    committed = await generate_ids(live, n=2, prompt="before the outage")
    await wait_until(lambda: live.server.generation_log.depth == 0)
    assert await submit_code(live, rating("before", committed[0])) == (CODE.OK, ACCEPTED)

    store.down = True
    code, detail = await submit_code(live, rating("during", committed[1]), timeout_s=5)
    assert code == CODE.UNAVAILABLE and "unavailable" in detail
    during = await generate_ids(live, n=2, prompt="during the outage")  # served from memory
    assert len(during) == 2

    store.down = False
    await wait_until(lambda: live.server.generation_log.depth == 0, timeout_s=30)
    assert await submit_code(live, rating("during", committed[1])) == (CODE.OK, ACCEPTED)
    assert await submit_code(live, rating("after", during[0])) == (CODE.OK, ACCEPTED)
    stored = {f.event_id for f in store.feedback_after(0, 1000)}
    assert stored == {"before", "during", "after"}
    assert set(store.get_generations(committed + during)) == set(committed + during)


async def test_feedback_on_a_not_yet_logged_generation_during_an_outage_fails_fast(
    flaky,
) -> None:
    """Found here: the feedback writer blocked 10 s in wait_committed (DEADLINE_EXCEEDED)."""
    live, store = flaky
    committed = await generate_ids(live, n=1, prompt="before the outage")
    await wait_until(lambda: live.server.generation_log.depth == 0)
    store.down = True
    buffered = await generate_ids(live, n=1, prompt="during the outage")
    results = await asyncio.gather(
        submit_code(live, rating("on-buffered", buffered[0]), timeout_s=3),
        submit_code(live, rating("on-committed", committed[0]), timeout_s=3),
    )
    assert [code for code, _ in results] == [CODE.UNAVAILABLE, CODE.UNAVAILABLE]


# -- PostgreSQL restarted under load -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restart_under_load_fails_fast_reconnects_and_loses_nothing(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    if postgres_cluster() is None:
        pytest.skip("no local PostgreSQL cluster to restart (pg_ctlcluster)")
    with fresh_schema("pgrestart") as schema:
        data_dir = seeded_data_dir(tmp_path, tiny_checkpoint)
        with server_process(data_dir, "--store", schema_url(schema)) as child:
            address = child.banner["grpc"]
            acked: list[str] = []
            outcomes: list[tuple[float, CODE, float]] = []  # (start, code, seconds)
            stop = threading.Event()

            def load(worker: int) -> None:
                with grpc.insecure_channel(address) as channel:
                    generation = pb_grpc.GenerationStub(channel)
                    feedback = pb_grpc.FeedbackStub(channel)
                    gid = None
                    i = 0
                    while not stop.is_set():
                        i += 1
                        started = time.monotonic()
                        try:
                            if gid is None or i % 5 == 0:
                                reply = generation.Generate(
                                    pb.GenerateRequest(prompt="pg restart"), timeout=15
                                )
                                gid = reply.candidates[0].generation_id
                            event_id = f"w{worker}-{i}"
                            ack = feedback.Submit(rating(event_id, gid), timeout=15)
                            assert ack.outcome == ACCEPTED
                            acked.append(event_id)
                            code = CODE.OK
                        except grpc.RpcError as exc:
                            code = exc.code()
                        outcomes.append((started, code, time.monotonic() - started))

            workers = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
            for worker in workers:
                worker.start()
            try:
                wait_for(lambda: len(acked) >= 50, timeout_s=60)
                restart_at = time.monotonic()
                result = pg_ctlcluster("restart")
                assert result.returncode == 0, result.stderr
                restarted_at = time.monotonic()
                # The server reconnects by itself: acks resume after the restart.
                wait_for(
                    lambda: any(s > restarted_at and c == CODE.OK for s, c, _ in outcomes),
                    timeout_s=30,
                )
                settle = len(acked)
                wait_for(lambda: len(acked) >= settle + 50, timeout_s=30)
            finally:
                stop.set()
                for worker in workers:
                    worker.join(timeout=60)
                if pg_ctlcluster("status").returncode != 0:
                    pg_ctlcluster("start")
            assert is_serving(address)

        codes = {c for _, c, _ in outcomes}
        assert codes <= {CODE.OK, CODE.UNAVAILABLE}, codes
        # Fast failure: during the outage nothing waited anywhere near its 15 s deadline.
        during = [s for st, c, s in outcomes if c != CODE.OK and st >= restart_at - 1]
        assert max(during, default=0.0) < 12.0
        store = open_store(schema_url(schema))
        try:
            stored = [f.event_id for f in store.feedback_after(0, 1_000_000)]
        finally:
            store.close()
        assert len(stored) == len(set(stored))
        assert set(acked) <= set(stored), f"{len(set(acked) - set(stored))} acked events lost"


# -- text PostgreSQL cannot hold ------------------------------------------------------------------


@pytest.fixture
async def pg_live(tmp_path: Path, tiny_checkpoint: Path):
    with fresh_schema("nul") as schema:
        registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
        config = test_config(tmp_path, store=schema_url(schema))
        async with running_server(config, registry=registry) as running:
            yield running


@pytest.mark.postgres
async def test_a_nul_in_a_prompt_does_not_stall_the_generation_log_on_postgresql(
    pg_live,
) -> None:
    """Found here: the NUL prompt was served, its record could never be written to
    PostgreSQL, and the generation log retried that batch forever."""
    code = CODE.OK
    try:
        await pg_live.generation.Generate(pb.GenerateRequest(prompt="sea\x00side"), timeout=10)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    assert code in (CODE.OK, CODE.INVALID_ARGUMENT)
    ids = await generate_ids(pg_live, n=1, prompt="clean prompt")
    result = await submit_code(pg_live, rating("after-nul", ids[0]), timeout_s=5)
    assert result == (CODE.OK, ACCEPTED)


@pytest.mark.postgres
async def test_a_nul_in_feedback_text_is_invalid_argument_on_postgresql(pg_live) -> None:
    """Found here: it failed its whole group commit with UNAVAILABLE."""
    (gid,) = await generate_ids(pg_live, n=1, prompt="clean prompt")
    await wait_until(lambda: pg_live.server.generation_log.depth == 0)
    event = pb.FeedbackEvent(
        event_id="nul-correction", correction=pb.Correction(generation_id=gid, text="a\x00b")
    )
    code, _ = await submit_code(pg_live, event)
    assert code == CODE.INVALID_ARGUMENT

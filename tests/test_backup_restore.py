"""Backup while the server writes, restore into a fresh directory, resume: `feedloop store backup`
copies the registry and then the SQLite store (online backup API) while Generate and Feedback
calls keep landing; a server and a trainer started on the copy serve the same live version, and
the next round carries on from the trainer's cursor with every event acknowledged before the
backup began. Also: the end-user key of a request is stored with its generations."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from server_harness import rating, running_server, seeded_registry, test_config
from trainer_support import fast_config, one_torch_thread

from feedloop.core.registry import open_registry
from feedloop.core.store import open_store
from feedloop.core.store.cli import main as store_main
from feedloop.trainer.loop import Trainer
from feedloop.v1 import feedloop_pb2 as pb

__all__ = ["one_torch_thread"]
ACCEPTED = pb.FEEDBACK_OUTCOME_ACCEPTED
_ids = itertools.count()


async def rated_traffic(live, requests: int, acked: list[str]) -> None:  # type: ignore[no-untyped-def]
    """requests Generates of 2 candidates, each candidate rated; acked event ids appended."""
    for _ in range(requests):
        reply = await live.generation.Generate(
            pb.GenerateRequest(prompt="green hills", num_candidates=2, end_user="user-1"),
            timeout=10,
        )
        events = [
            rating(f"e{next(_ids)}", c.generation_id, score=1.0 if i == 0 else 0.0)
            for i, c in enumerate(reply.candidates)
        ]
        for event in events:
            ack = await live.feedback.Submit(event, timeout=10)
            assert ack.outcome == ACCEPTED
            acked.append(event.event_id)


def train_round(root: Path, store_path: Path, registry_path: Path):  # type: ignore[no-untyped-def]
    store, registry = open_store(str(store_path)), open_registry(registry_path)
    try:
        return Trainer(fast_config(root), store, registry, log=lambda _: None).run_round()
    finally:
        store.close()
        registry.close()


async def test_a_backup_taken_while_serving_restores_and_training_resumes_from_its_cursor(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    source, copy = tmp_path / "source", tmp_path / "restored"
    registry = seeded_registry(source / "registry", tiny_checkpoint)
    config = test_config(source)
    acked: list[str] = []
    async with running_server(config, registry=registry) as live:
        await rated_traffic(live, 6, acked)
        first = await asyncio.to_thread(
            train_round, source, source / "replay.sqlite3", source / "registry"
        )
        assert first.outcome in ("published", "refused"), first.reason
        await rated_traffic(live, 5, acked)
        before_backup = list(acked)  # every one of these must be in the copy

        during: list[str] = []
        writer = asyncio.create_task(rated_traffic(live, 10_000, during))
        await asyncio.sleep(0.2)  # the server is writing when the backup starts
        code = await asyncio.to_thread(
            store_main, ["store", "backup", str(copy), "--data-dir", str(source)]
        )
        writer.cancel()
        assert code == 0 and during, "the backup ran while the server wrote"
        live_at_backup = registry.live()
        stored_gens = live.store.generations_after(0, 10)
        assert stored_gens and stored_gens[0].end_user == "user-1"

    restored = open_store(str(copy / "replay.sqlite3"))
    present = {e.event_id for e in restored.feedback_after(0, 100_000)}
    assert set(before_backup) <= present
    assert restored.cursors() != {}  # the trainer's cursor came along
    restored.close()
    assert open_registry(copy / "registry").live() == live_at_backup

    async with running_server(test_config(copy)) as again:  # no registry given: the copy's
        assert again.server.live_version == live_at_backup
        reply = await again.generation.Generate(pb.GenerateRequest(prompt="sea"), timeout=10)
        assert reply.model_version == live_at_backup
    second = await asyncio.to_thread(train_round, copy, copy / "replay.sqlite3", copy / "registry")
    assert second.figures["round"] == 2, second.reason  # the cursor carried on
    # Round 1 consumed the first 12 events; round 2 reads the 10 acknowledged after it, plus
    # those of the traffic during the backup that the snapshot caught.
    assert second.figures["new_events"] >= len(before_backup) - 12 == 10

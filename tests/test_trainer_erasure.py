"""A client's data erased between the trainer's rounds: the next round runs on its cursor and
never reads an erased row (real SQLite store, directory registry, simulated users)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from trainer_support import TRAIN_PROMPTS, Env, env, fast_config, one_torch_thread

from feedloop.demo.simulate import Simulation
from feedloop.demo.simusers import IncludeWord, SimulatedUser
from feedloop.trainer.loop import Trainer

__all__ = ["env", "one_torch_thread"]
PREF = IncludeWord("little")


def serve(env: Env, client_id: str, seed: int, events: int = 40) -> None:
    user = SimulatedUser(PREF, seed=seed, client_id=client_id)
    Simulation(env.store, env.registry, user, TRAIN_PROMPTS, seed=seed).serve_events(events)


def clients_read(env: Env, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The client ids of every generation and event the trainer's reads return from now on."""
    seen: set[str] = set()

    def spy(name: str) -> None:
        read: Callable[..., Any] = getattr(env.store, name)

        def recording(*args: Any, **kwargs: Any) -> Any:
            result = read(*args, **kwargs)
            rows = result.values() if isinstance(result, dict) else result
            seen.update(row.client_id for row in rows)
            return result

        monkeypatch.setattr(env.store, name, recording)

    for name in (
        "get_generations",
        "generations_after",
        "sample_generations",
        "feedback_after",
        "feedback_for",
    ):
        spy(name)
    return seen


def test_a_round_after_an_erasure_runs_on_its_cursor_and_never_reads_erased_rows(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(fast_config(env.root), env.store, env.registry, log=lambda _: None)
    serve(env, "keeps-data", seed=0)
    serve(env, "asks-for-erasure", seed=1)
    first = trainer.run_round()
    assert first.outcome == "published", first.reason
    # Rows behind the cursor (which replay samples from) and ahead of it are both erased.
    serve(env, "asks-for-erasure", seed=2)
    serve(env, "keeps-data", seed=3)
    record = env.store.erase_client("asks-for-erasure", requested_by="test", now=0.0)
    assert record.generations > 0 and record.feedback >= 80

    seen = clients_read(env, monkeypatch)
    second = trainer.run_round()

    assert second.outcome in ("published", "refused"), second.reason
    assert second.figures["round"] == 2  # the cursor carried on from the first round
    assert second.figures["new_events"] >= 40  # the kept client's new events were read
    assert seen == {"keeps-data"}


def test_a_round_after_an_end_user_erasure_never_reads_their_generations(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(fast_config(env.root), env.store, env.registry, log=lambda _: None)
    serve(env, "app", seed=0)
    first = trainer.run_round()
    assert first.outcome == "published", first.reason
    serve(env, "app", seed=4)
    # The app tagged half its generations with one end user's key (GenerateRequest.end_user).
    with sqlite3.connect(env.root / "replay.sqlite3") as conn:
        conn.execute("UPDATE generations SET end_user = 'user-9' WHERE seq % 2 = 0")
        erased_ids = {
            row[0]
            for row in conn.execute(
                "SELECT generation_id FROM generations WHERE end_user = 'user-9'"
            )
        }
    record = env.store.erase_end_user("user-9", requested_by="test", now=0.0)
    assert record.generations == len(erased_ids) > 0 and record.feedback > 0

    seen: set[str] = set()
    for name in ("get_generations", "generations_after", "sample_generations"):
        read: Callable[..., Any] = getattr(env.store, name)

        def recording(*args: Any, _read: Callable[..., Any] = read, **kwargs: Any) -> Any:
            result = _read(*args, **kwargs)
            rows = result.values() if isinstance(result, dict) else result
            seen.update(row.generation_id for row in rows)
            return result

        monkeypatch.setattr(env.store, name, recording)
    events: list[Any] = []
    for name in ("feedback_after", "feedback_for"):
        read_events: Callable[..., Any] = getattr(env.store, name)

        def recording_events(*args: Any, _read: Callable[..., Any] = read_events, **kw: Any) -> Any:
            result = _read(*args, **kw)
            events.extend(result)
            return result

        monkeypatch.setattr(env.store, name, recording_events)
    second = trainer.run_round()

    assert second.figures["round"] == 2, second.reason
    assert seen and not seen & erased_ids
    assert events and not {g for e in events for g in e.generation_ids} & erased_ids

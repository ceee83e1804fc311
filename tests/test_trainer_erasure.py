"""A client's data erased between the trainer's rounds: the next round runs on its cursor and
never reads an erased row (real SQLite store, directory registry, simulated users)."""

from __future__ import annotations

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

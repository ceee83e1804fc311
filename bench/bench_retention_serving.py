"""The cost of store retention while serving: Generate throughput, durable feedback throughput
and the trainer's round time with a `feedloop store prune` process deleting old rows beside the
server, against the same without it, interleaved in one run.

Set-up: a SQLite store prefilled with --old-generations generations (and 0.6 ratings each) dated
30 days back, the trainer's cursor past them, so `feedloop store prune --retain-days 7
--prune-every-s 1` (default batches of 500 and pauses of 50 ms) has old rows to delete the whole
time; a `feedloop serve` subprocess on it (bench_serve.serve), its load from serve_load.py in a
process of its own. Each repetition runs both arms, their order alternating (off-on, on-off,
...): Generate (closed loop, concurrency 16, --duration-s) then feedback (4 streams of durable
ratings, --duration-s), then one trainer round in this process (max 2,000 new events and
generations, so both arms' rounds read about as much; the tests' short-round settings). The
pruner runs through the whole arm. Reported: medians per arm, their ratios, and the rows the
pruner deleted.

    .venv/bin/python bench/bench_retention_serving.py [--repeats 3] [--duration-s 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_retention_long import generation, rating
from bench_serve import load, prepare_checkpoint, serve

from feedloop.core.registry import open_registry
from feedloop.core.store.sqlite import SQLiteStore
from feedloop.demo.processes import feedloop_command
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.loop import Trainer

DAY_S = 24 * 3600.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prefill(path: Path, count: int) -> None:
    store = SQLiteStore(path)
    start = time.time() - 30 * DAY_S
    for first in range(0, count, 2000):
        gens = [generation(i, start + i * 0.01) for i in range(first, min(count, first + 2000))]
        store.append_generations(gens)
        store.insert_feedback(
            [
                rating(first + i, g.generation_id, g.created_at + 30)
                for i, g in enumerate(gens[: int(len(gens) * 0.6)])
            ]
        )
    generation_seq, feedback_seq = store.max_seq()
    store.set_cursor(
        "trainer", {"generation_seq": generation_seq, "feedback_seq": feedback_seq, "rounds": 0}
    )
    store.reclaim_space()
    store.close()


@contextlib.contextmanager
def pruner(store: Path, workdir: Path) -> Iterator[None]:
    argv = feedloop_command(
        "store", "prune", "--store", str(store), "--retain-days", "7", "--prune-every-s", "1"
    )
    with open(workdir / "prune.log", "a") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--old-generations", type=int, default=600_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-retention-serving-") as tmp:
        workdir = Path(tmp)
        checkpoint, checkpoint_kind = prepare_checkpoint(None, workdir)
        store_path = workdir / "replay.sqlite3"
        began = time.monotonic()
        prefill(store_path, args.old_generations)
        log(
            f"prefilled {args.old_generations:,} old generations ({time.monotonic() - began:.0f} s)"
        )
        figures: dict[str, dict[str, list[float]]] = {
            arm: {"generate_per_s": [], "feedback_per_s": [], "round_s": []}
            for arm in ("off", "on")
        }
        with serve(workdir, checkpoint, store=str(store_path)) as server:
            registry_dir = next(workdir.glob("*/registry"))
            trainer_store = SQLiteStore(store_path)
            trainer_registry = open_registry(registry_dir)
            trainer = Trainer(
                TrainConfig(
                    data_dir=workdir,
                    join_window_s=0.0,
                    max_feedback_events=2000,
                    max_new_generations=2000,
                    replay_sample_size=0,
                    # A short round (the tests' settings): its time is what is compared.
                    min_feedback_events=8,
                    rm_steps=30,
                    gate_kl_prompts=16,
                    max_updates_per_round=3,
                    minibatch_size=32,
                    gate_min_ope_samples=5,
                    torch_threads=1,
                    publish_as="live",
                ),
                trainer_store,
                trainer_registry,
                log=lambda _: None,
            )
            before = trainer_store.counts().generations
            for repeat in range(args.repeats):
                order = ("off", "on") if repeat % 2 == 0 else ("on", "off")
                for arm in order:
                    with pruner(store_path, workdir) if arm == "on" else contextlib.nullcontext():
                        generate = load(
                            "generate",
                            server["grpc"],
                            "--concurrency",
                            "16",
                            "--duration-s",
                            str(args.duration_s),
                        )
                        feedback = load(
                            "feedback-stream",
                            server["grpc"],
                            "--streams",
                            "4",
                            "--duration-s",
                            str(args.duration_s),
                        )
                        started = time.monotonic()
                        result = trainer.run_round()
                        round_s = time.monotonic() - started
                    figures[arm]["generate_per_s"].append(generate["per_s"])
                    figures[arm]["feedback_per_s"].append(feedback["per_s"])
                    figures[arm]["round_s"].append(round_s)
                    log(
                        f"repeat {repeat} {arm}: generate {generate['per_s']:.0f}/s "
                        f"({generate['errors']} errors), feedback {feedback['per_s']:.0f}/s "
                        f"({feedback['errors']} errors), round {round_s:.1f} s "
                        f"({result.outcome}, {result.figures.get('new_events')} new events)"
                    )
            after = trainer_store.counts().generations
            trainer_store.close()
            trainer_registry.close()
    medians: dict[str, Any] = {
        arm: {name: statistics.median(values) for name, values in arms.items()}
        for arm, arms in figures.items()
    }
    out = {
        "checkpoint": checkpoint_kind,
        "repeats": args.repeats,
        "duration_s": args.duration_s,
        "old_generations": args.old_generations,
        "generations_before": before,
        "generations_after": after,
        "medians": medians,
        "ratios_on_over_off": {
            name: medians["on"][name] / medians["off"][name] for name in medians["on"]
        },
        "runs": figures,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

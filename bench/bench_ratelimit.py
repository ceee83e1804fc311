"""What charging the rate limit per streamed event costs, against charging the stream once.

    .venv/bin/python bench/bench_ratelimit.py [--events 20000]
        [--streams 4] [--rounds 5]

Two in-process servers side by side (each its own SQLite store, the same tiny policy), both
with a rate limit far above the load (so nothing is refused: only the bookkeeping is measured):
one with rate_limit_per_event (a token per event, issue 23), one without (the stream pays for
its opening only, as before). Rounds alternate between them (ABAB...) so drift on a shared
machine hits both arms alike; each round streams --events rating events over --streams
concurrent SubmitStream calls and times them to the last ack. Prints the median events/s of
each arm and their ratio (target: per-event at least 0.95x per-call).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_harness import Running, running_server, seeded_registry, test_config

from feedloop.core.pretrain import PretrainConfig, pretrain
from feedloop.v1 import feedloop_pb2 as pb


async def stream_round(
    live: Running, gids: list[str], events: int, streams: int, tag: str
) -> float:
    per_stream = events // streams

    async def one(s: int) -> int:
        batch = [
            pb.FeedbackEvent(
                event_id=f"{tag}-{s}-{i}",
                rating=pb.Rating(generation_id=gids[i % len(gids)], score=1.0),
            )
            for i in range(per_stream)
        ]
        return len([ack async for ack in live.feedback.SubmitStream(iter(batch), timeout=300)])

    started = time.perf_counter()
    acked = sum(await asyncio.gather(*(one(s) for s in range(streams))))
    elapsed = time.perf_counter() - started
    assert acked == per_stream * streams
    return acked / elapsed


async def main_async(args: argparse.Namespace, root: Path) -> dict[str, object]:
    checkpoint = pretrain(
        PretrainConfig(
            data_dir=root / "tiny",
            embedding_dim=16,
            value_hidden_dim=16,
            hidden_dim=32,
            epochs=1,
            batch_size=256,
            eval_samples=4,
            resume=False,
            torch_threads=1,
        ),
        progress=False,
    ).checkpoint
    arms: dict[str, list[float]] = {"per_event": [], "per_call": []}
    servers = {}
    for arm in arms:
        directory = root / arm
        directory.mkdir()
        servers[arm] = running_server(
            test_config(
                directory,
                rate_limit_rps=1e9,
                rate_limit_burst=1_000_000,
                rate_limit_per_event=arm == "per_event",
            ),
            registry=seeded_registry(directory / "registry", checkpoint),
        )
    async with servers["per_event"] as per_event, servers["per_call"] as per_call:
        lives = {"per_event": per_event, "per_call": per_call}
        gids: dict[str, list[str]] = {}
        for arm, live in lives.items():
            reply = await live.generation.Generate(
                pb.GenerateRequest(prompt="green hills", num_candidates=8), timeout=30
            )
            gids[arm] = [c.generation_id for c in reply.candidates]
            await stream_round(live, gids[arm], 2000, args.streams, "warm")  # warm-up
        for r in range(args.rounds):
            order = list(lives) if r % 2 == 0 else list(reversed(lives))
            for arm in order:
                rate = await stream_round(lives[arm], gids[arm], args.events, args.streams, f"r{r}")
                arms[arm].append(rate)
    medians = {arm: statistics.median(rates) for arm, rates in arms.items()}
    return {
        "events_per_round": args.events,
        "streams": args.streams,
        "rounds": args.rounds,
        "events_per_s": {arm: [round(x) for x in rates] for arm, rates in arms.items()},
        "median_events_per_s": {arm: round(m) for arm, m in medians.items()},
        "ratio_per_event_to_per_call": round(medians["per_event"] / medians["per_call"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(main_async(args, Path(tmp)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

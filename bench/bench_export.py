"""`feedloop export` throughput: rows/s and events/s for a store of 100k feedback events.

The store (SQLite, one file) holds --requests requests of 4 candidates and, per request, one
ranking of the 4 (6 preference pairs), one comparison, one correction and one thumbs rating: 4
events per request, 100k events for the default 25k requests. Each arm runs --runs times,
interleaved with the others, and the median is reported beside a ceiling measured in the same
run: reading the same pages (feedback_after + get_generations) with no rows built or written, so
the ratio says what building and writing cost on a machine whose speed others' work moves.

    .venv/bin/python bench/bench_export.py [--requests 25000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from feedloop.core.export_cli import PAGE_EVENTS, ExportFilter, export_dataset
from feedloop.core.store import FeedbackRecord, GenerationRecord, open_store
from feedloop.core.training_rows import KINDS_OF

CANDIDATES = 4
BATCH = 2000


def generation(gid: str, r: int, c: int) -> GenerationRecord:
    return GenerationRecord(
        generation_id=gid,
        request_id=f"r{r}",
        prompt=f"prompt {r % 997}",
        prompt_ids=[2, 17, 33],
        output_ids=list(range(8)),
        behaviour_logprobs=[-0.5] * 8,
        policy_logprobs=[-0.4] * 8,
        finished=True,
        text=f"phrase {r} {c}",
        sampling={"temperature": 0.8},
        model_version=f"v{1 + r % 3:04d}",
        client_id="bench",
        created_at=float(r),
        candidate_index=c,
        num_candidates=CANDIDATES,
    )


def fill(location: str, requests: int) -> int:
    """The store described above; the number of events."""
    store = open_store(location)
    events = 0
    try:
        for start in range(0, requests, BATCH // CANDIDATES):
            gens: list[GenerationRecord] = []
            feedback: list[FeedbackRecord] = []
            for r in range(start, min(start + BATCH // CANDIDATES, requests)):
                ids = [f"r{r}-c{c}" for c in range(CANDIDATES)]
                gens += [generation(gid, r, c) for c, gid in enumerate(ids)]
                t = float(r)
                feedback += [
                    FeedbackRecord(f"{r}-rank", "ranking", ids[::-1], "bench", t),
                    FeedbackRecord(f"{r}-cmp", "comparison", ids[:2], "bench", t),
                    FeedbackRecord(f"{r}-fix", "correction", ids[2:3], "bench", t, text="calm"),
                    FeedbackRecord(
                        f"{r}-up", "rating", ids[3:], "bench", t, score=float(r % 2), scale="thumbs"
                    ),
                ]
            store.append_generations(gens)
            store.insert_feedback(feedback)
            events += len(feedback)
    finally:
        store.close()
    return events


def read_only(location: str) -> float:
    """Seconds to read every page of events and its generations, building nothing."""
    store = open_store(location)
    started = time.perf_counter()
    last = 0
    try:
        while page := store.feedback_after(last, PAGE_EVENTS):
            last = page[-1].seq
            store.get_generations([g for e in page for g in e.generation_ids])
    finally:
        store.close()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=25_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        location = str(Path(scratch) / "replay.sqlite3")
        started = time.perf_counter()
        events = fill(location, args.requests)
        print(f"filled {events} events in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        arms = [(d, f) for d in ("preference", "kto", "sft") for f in ("jsonl", "parquet")]
        seconds: dict[str, list[float]] = {"read only": []}
        rows: dict[str, int] = {}
        for _ in range(args.runs):
            seconds["read only"].append(read_only(location))
            for dataset, fmt in arms:
                name = f"{dataset} {fmt}"
                out = str(Path(scratch) / f"out.{fmt}")
                chosen = ExportFilter(frozenset(KINDS_OF[dataset]))
                t0 = time.perf_counter()
                written, _ = export_dataset(location, dataset, chosen, out, fmt)
                seconds.setdefault(name, []).append(time.perf_counter() - t0)
                rows[name] = written
    ceiling_s = statistics.median(seconds["read only"])
    report = {"events": events, "runs": args.runs, "read_only_s": round(ceiling_s, 3), "arms": {}}
    print(f"{'arm':<20}{'rows':>8}{'median s':>10}{'rows/s':>10}{'events/s':>10}{'/read':>7}")
    for name, times in seconds.items():
        if name == "read only":
            continue
        median_s = statistics.median(times)
        arm = {
            "rows": rows[name],
            "median_s": round(median_s, 3),
            "rows_per_s": round(rows[name] / median_s),
            "events_per_s": round(events / median_s),
            "time_vs_read_only": round(median_s / ceiling_s, 2),
        }
        report["arms"][name] = arm
        print(
            f"{name:<20}{arm['rows']:>8}{median_s:>10.2f}{arm['rows_per_s']:>10}"
            f"{arm['events_per_s']:>10}{arm['time_vs_read_only']:>7}"
        )
    print(f"read only (ceiling): {ceiling_s:.2f}s, {events / ceiling_s:.0f} events/s")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

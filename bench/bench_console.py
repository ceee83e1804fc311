"""Benchmark the rating console in a real browser: a scripted rater, no think time.

    .venv/bin/python bench/bench_console.py            # 40 rounds
    .venv/bin/python bench/bench_console.py --rounds 80 --json out.json
    .venv/bin/python bench/bench_console.py --rounds 0 --screenshots docs/console

One `feedloop serve` (API keys on, the default pretrained policy, or random weights of the
default sizes when it is not built) and one `feedloop console` in front of it, as
tests/console_stack.py starts them; headless Chromium driven by selenium is the rater. Each round
the rater asks for phrases in rate mode and rates all four (four clicks), then asks for a pair in
compare mode and picks one by keyboard (one key). Each click's round trip is timed from the
click to the page that acknowledges the event loaded in the browser: the console shows that page
only once the server has acknowledged the event, which it does only once the event is durable in
the replay store. Events per minute count every acknowledged event over the whole session,
prompt pages included (what one rater at full speed gets through). At the end every
acknowledged event id is looked up in the store: the figures count only events stored once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_serve import prepare_checkpoint  # bench/ is on the path: a script

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test harness
from console_stack import Rater, browser_available, console_stack, start_browser

from feedloop.core.store import open_store

PROMPTS = ("ocean sunrise", "garden", "rain", "city night", "candle", "coffee", "autumn leaves")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timed(rater: Rater, action: Any) -> tuple[float, str]:
    """Seconds from the action to its acknowledging page loaded, and the event id it shows."""
    started = time.perf_counter()
    rater.after(action)
    elapsed = time.perf_counter() - started
    kind, message, event_id, _ = rater.notice()
    if kind != "ack":
        raise RuntimeError(f"not acknowledged: {message}")
    return elapsed, event_id


def session(rater: Rater, rounds: int) -> dict[str, Any]:
    round_trips: dict[str, list[float]] = {"rating": [], "comparison": []}
    event_ids: list[str] = []
    started = time.perf_counter()
    for r in range(rounds):
        rater.open("rate")
        rater.ask(PROMPTS[r % len(PROMPTS)])
        for i in range(len(rater.finds(".candidate"))):
            button = rater.finds(".candidate")[i].find_element("css selector", "button[value='4']")
            seconds, event_id = timed(rater, button.click)
            round_trips["rating"].append(seconds)
            event_ids.append(event_id)
        rater.open("compare")
        rater.ask(PROMPTS[(r + 3) % len(PROMPTS)])
        seconds, event_id = timed(rater, lambda r=r: rater.press("1" if r % 2 else "2"))
        round_trips["comparison"].append(seconds)
        event_ids.append(event_id)
    wall_s = time.perf_counter() - started
    every = [s for values in round_trips.values() for s in values]
    return {
        "events": len(event_ids),
        "wall_s": round(wall_s, 2),
        "events_per_minute": round(len(event_ids) / wall_s * 60, 1),
        "click_to_ack_ms": {
            kind: {
                "n": len(values),
                "median": round(statistics.median(values) * 1000, 1),
                "p99": round(percentile(values, 0.99) * 1000, 1),
            }
            for kind, values in {"all": every, **round_trips}.items()
        },
        "event_ids": event_ids,
    }


def screenshots(rater: Rater, folder: Path) -> None:
    """One PNG of each mode with phrases on screen, and of a blind pair and its reveal."""
    from selenium.webdriver.support.ui import Select

    rater.open("rate")
    rater.ask("ocean sunrise")
    second = rater.finds(".candidate")[1]
    rater.after(lambda: second.find_element("css selector", "button[value='4']").click())
    rater.screenshot(folder, "rate")
    rater.open("rank")
    rater.ask("garden")
    selects = rater.finds("select")
    for i, select in enumerate(selects):
        Select(select).select_by_value(str(len(selects) - i))
    rater.screenshot(folder, "rank")
    rater.open("compare")
    rater.ask("rain")
    rater.screenshot(folder, "compare")
    rater.open("correct")
    rater.ask("candle")
    box = rater.find("#correction-0")
    box.clear()
    box.send_keys("a quiet candle at night")
    rater.screenshot(folder, "correct")
    rater.open("evaluate")
    for field, value in (("#version_a", "v0002"), ("#version_b", "v0001")):
        rater.find(field).clear()
        rater.find(field).send_keys(value)
    rater.find("#prompts").clear()
    rater.find("#prompts").send_keys("ocean sunrise\ngarden\ncoffee")
    rater.after(lambda: rater.find("#start-evaluation").click())
    rater.screenshot(folder, "evaluate")
    for key in ("1", "t", "2"):
        rater.keys(key)
    rater.screenshot(folder, "evaluate-revealed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="rounds of 4 ratings + 1 pick")
    parser.add_argument("--checkpoint", type=Path, help="policy to serve (default: pretrained)")
    parser.add_argument("--screenshots", type=Path, help="also save a PNG of each mode here")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    missing = browser_available()
    if missing:
        print(f"bench_console: {missing}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        checkpoint, described = prepare_checkpoint(args.checkpoint, Path(tmp))
        with console_stack(Path(tmp) / "stack", checkpoint, checkpoint) as stack:
            driver = start_browser()
            try:
                rater = Rater(driver, stack.url)
                rater.sign_in("ann")
                if args.screenshots:
                    screenshots(rater, args.screenshots)
                    rater.sign_in("ann")
                result = session(rater, args.rounds) if args.rounds > 0 else None
            finally:
                driver.quit()
            if result is not None:
                store = open_store(str(stack.store_path))
                try:
                    found = {e.event_id for e in store.feedback_after(0, 1_000_000)}
                finally:
                    store.close()
                missing_ids = [e for e in result.pop("event_ids") if e not in found]
                if missing_ids:
                    raise RuntimeError(f"{len(missing_ids)} acknowledged events not stored")
                result["stored"] = result["events"]
    if result is None:
        print(f"screenshots in {args.screenshots}")
        return 0
    report = {"checkpoint": described, "rounds": args.rounds, **result}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

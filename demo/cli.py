"""`feedloop demo`: the whole loop on one machine, learning in front of you.

It starts `feedloop serve` and `feedloop train` as separate processes on the embedded defaults
(SQLite replay store and a directory registry in a fresh temporary data directory, seeded with
the default pretrained policy, loopback ports chosen by the OS), then lets a population of
simulated users ask for phrases and answer with ratings, rankings, comparisons and corrections,
noisily, according to a hidden preference. The trainer learns from that feedback, the gate
decides, the server swaps, and the users' true reward climbs. At the end: a table per version,
a PNG of reward over time with the swaps marked, and exit 0 only if the reward improved.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.live import Live

from feedloop.client.client import FeedloopClient
from feedloop.client.errors import FeedloopClientError
from feedloop.client.types import ModelsResult
from feedloop.core.config import default_data_dir
from feedloop.demo.options import build_parser
from feedloop.demo.population import (
    Population,
    PopulationConfig,
    demo_prompts,
    parse_mix,
    parse_taste_changes,
)
from feedloop.demo.processes import (
    Child,
    ChildStartupError,
    feedloop_command,
    start_child,
    start_server,
)
from feedloop.demo.report import judge, live_view, plot_reward, summary_table
from feedloop.demo.simusers import parse_preference
from feedloop.demo.tracker import DemoStats

EXIT_OK, EXIT_NOT_IMPROVED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# The trainer's defaults suit a production trickle; the demo has minutes, so rounds start after
# fewer events, and candidates go on canary trial as in production but with demo-sized evidence:
# a fifth of the users (sticky by user id), promoted when the canary's mean rating is confidently
# no more than 0.2 (on [-1, 1]) below live's, judged every 5 s. The watch then rolls a promoted
# version back if it rates confidently below a recent or the best earlier version.
# `--trainer-arg=--publish-as --trainer-arg=live` makes every passing candidate live at once.
# Anything given with --trainer-arg comes later on the command line and wins.
DEMO_TRAINER_ARGS = (
    "--wake-after-feedback-events",
    "160",
    "--interval-s",
    "20",
    "--poll-interval-s",
    "0.5",
    "--publish-as",
    "canary",
    "--canary-share",
    "0.2",
    "--decision-margin",
    "0.2",
    "--decision-interval-s",
    "5",
)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def default_checkpoint() -> Path:
    """The default pretrained policy, built now (a few minutes, once) if it is missing."""
    # Here, not at the top: pretrain imports torch, which the demo process needs for nothing else
    # (server and trainer are processes of their own).
    from feedloop.core.pretrain import default_checkpoint_dir

    # Read here, at the command's edge, like every feedloop command: where the user keeps the
    # default policy (`feedloop pretrain` honours the same variable).
    data_dir = Path(os.environ.get("FEEDLOOP_DATA_DIR") or default_data_dir())
    path = default_checkpoint_dir(data_dir)
    if not (path / "manifest.json").exists():
        print(
            f"feedloop demo: no pretrained policy at {path} yet; pretraining it now "
            "(a few minutes, once)",
            flush=True,
        )
        subprocess.run(
            feedloop_command("pretrain", "--if-missing", "--data-dir", str(data_dir)), check=True
        )
    return path


class Demo:
    def __init__(self, args: argparse.Namespace, population_config: PopulationConfig) -> None:
        self.args = args
        self.population_config = population_config
        self.console = Console()
        if not self.console.is_terminal:  # logs and pipes: wide enough for the summary table
            self.console = Console(width=130)
        self.stats = DemoStats()
        self.children: list[Child] = []
        self.client: FeedloopClient | None = None
        self.population: Population | None = None
        self.trainer_lines_seen = 0
        self.next_models_poll = 0.0
        self.last_decision = ""
        self.taste_changes = parse_taste_changes(args.taste_change)
        self.taste_change_share = 0.0  # of the users, in the first pending change

    # -- start ---------------------------------------------------------------------------------

    def start(self, data_dir: Path, checkpoint: Path) -> None:
        shutil.copytree(checkpoint, data_dir / "default-policy")
        timeout_s = self.args.startup_timeout_s
        print(f"feedloop demo: data, store, registry and logs in {data_dir}", flush=True)
        server = start_server(
            data_dir, *self.args.server_arg, log_path=data_dir / "serve.log", timeout_s=timeout_s
        )
        self.children.append(server)
        trainer = start_child(
            "trainer",
            feedloop_command(
                "train",
                "--metrics-port",
                "0",
                "--data-dir",
                str(data_dir),
                *DEMO_TRAINER_ARGS,
                *self.args.trainer_arg,
            ),
            log_path=data_dir / "train.log",
            banner_prefix="feedloop train: metrics=",
            timeout_s=timeout_s,
        )
        self.children.append(trainer)
        self.server, self.trainer = server, trainer
        grpc_address = server.banner["grpc"]
        print(
            f"feedloop demo: server grpc={grpc_address} (pid {server.pid}), "
            f"trainer pid {trainer.pid}",
            flush=True,
        )
        print(
            f"feedloop demo: metrics at http://{server.banner['metrics']}/metrics (server) "
            f"and http://{trainer.banner['metrics']}/metrics (trainer); point Prometheus at "
            "them with monitoring/prometheus/prometheus.yml",
            flush=True,
        )
        self.client = FeedloopClient(grpc_address, timeout_s=10)
        self.client.wait_until_serving(timeout_s=timeout_s)
        self.stats.observe_live(self.client.status().live_version)
        self.population = Population(self.client, self.population_config, self.stats)
        self.stats.started = time.monotonic()
        self.population.start()

    # -- run -----------------------------------------------------------------------------------

    def _poll(self) -> None:
        assert self.client is not None
        self._change_taste()
        lines = self.trainer.stdout_lines
        for line in lines[self.trainer_lines_seen : len(lines)]:
            self.stats.observe_trainer_line(line)
        self.trainer_lines_seen = len(lines)
        with contextlib.suppress(FeedloopClientError):
            self.stats.observe_live(self.client.status(timeout_s=5).live_version)
        if time.monotonic() >= self.next_models_poll:  # the registry's own record of the gate
            self.next_models_poll = time.monotonic() + 3.0
            with contextlib.suppress(FeedloopClientError):
                decisions = self.client.list_models(max_decisions=1, timeout_s=5).decisions
                if decisions:
                    d = decisions[0]
                    self.last_decision = f"{d.version} {d.action}: {d.reason}"
        for child in self.children:
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited with code {child.process.returncode}; "
                    f"its log ({child.log_path}) ends:\n{child.log_tail()}"
                )

    def _change_taste(self) -> None:
        """Apply the first pending taste change as far as the clock says (all at once, or the
        share of users its span has reached)."""
        if not self.taste_changes:
            return
        change = self.taste_changes[0]
        share = change.share_at(self.stats.elapsed_s())
        if share <= self.taste_change_share:
            return
        assert self.population is not None
        self.population.change_preference(change.preference, share)
        if self.taste_change_share == 0.0:
            self.stats.observe_taste_change(change.preference)
            how = "" if change.span_s <= 0 else f", user by user over {change.span_s:.0f} s"
            print(f"feedloop demo: the users' taste is now {change.preference}{how}", flush=True)
        self.taste_change_share = share
        if share >= 1.0:
            self.taste_changes.pop(0)
            self.taste_change_share = 0.0

    def _last_trainer_line(self) -> str:
        lines = self.trainer.stdout_lines
        return lines[-1].removeprefix("feedloop train: ") if lines else ""

    def run(self) -> None:
        deadline = time.monotonic() + self.args.duration_s
        title = (
            f"feedloop demo: {self.population_config.users} users, preference "
            f"{self.population_config.preference}, {self.args.duration_s:.0f}s"
        )

        def view() -> Any:
            return live_view(
                self.stats,
                title=title,
                remaining_s=deadline - time.monotonic(),
                last_trainer_line=self._last_trainer_line(),
                last_decision=self.last_decision,
            )

        if self.args.no_live or not self.console.is_terminal:
            next_line = time.monotonic()
            while time.monotonic() < deadline:
                self._poll()
                if time.monotonic() >= next_line:
                    self._progress_line()
                    next_line += 10
                time.sleep(0.5)
            return
        with Live(view(), console=self.console, refresh_per_second=4, transient=False) as live:
            while time.monotonic() < deadline:
                self._poll()
                live.update(view())
                time.sleep(0.5)

    def _progress_line(self) -> None:
        requests_rps, feedback_eps = self.stats.rates_per_s()
        versions = " ".join(
            f"{v.version}={v.mean_reward:.3f}({v.candidates})"
            for v in self.stats.snapshot_versions()
        )
        rounds = ",".join(f"{n} {o}" for o, n in sorted(self.stats.round_counts().items()))
        print(
            f"[{self.stats.elapsed_s():5.0f}s] {requests_rps:.1f} req/s {feedback_eps:.1f} "
            f"feedback/s live={self.stats.live_version} reward {versions} rounds: "
            f"{rounds or '-'}",
            flush=True,
        )

    # -- finish --------------------------------------------------------------------------------

    def finish(self) -> ModelsResult | None:
        """Stop the users, read the registry's story, then stop trainer and server."""
        if self.population is not None:
            self.population.stop()
        models = None
        if self.client is not None:
            with contextlib.suppress(FeedloopClientError):
                self._poll_lines_only()
                models = self.client.list_models(max_decisions=500)
        self.stop_children()
        return models

    def _poll_lines_only(self) -> None:
        lines = self.trainer.stdout_lines
        for line in lines[self.trainer_lines_seen : len(lines)]:
            self.stats.observe_trainer_line(line)
        self.trainer_lines_seen = len(lines)

    def stop_children(self) -> list[tuple[str, int]]:
        codes = []
        if self.population is not None:
            self.population.stop()
        if self.client is not None:
            self.client.close()
            self.client = None
        for child in reversed(self.children):  # trainer first, then the server
            codes.append((child.name, child.stop(grace_s=15.0)))
        self.children = []
        return codes


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv[1:])
    try:
        parse_preference(args.preference)
        parse_taste_changes(args.taste_change)
        parse_mix(args.feedback_mix)
        if args.users < 1 or args.rate_rps <= 0 or args.duration_s <= 0 or args.candidates < 1:
            raise ValueError("--users, --rate-rps, --duration-s and --candidates must be positive")
        if args.drift_at_s is not None and args.drift_at_s < 0:
            raise ValueError("--drift-at-s must be >= 0")
    except ValueError as exc:
        print(f"feedloop demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.drift:
        try:
            plan_drift(args, args.checkpoint or default_checkpoint())
        except (ValueError, OSError, subprocess.CalledProcessError) as exc:
            print(f"feedloop demo: --drift: {exc}", file=sys.stderr)
            return EXIT_USAGE
    config = PopulationConfig.from_options(args)  # after --drift has chosen the tastes
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    demo = Demo(args, config)
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="feedloop-demo-")) if temporary else args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    keep = args.keep_data or not temporary
    try:
        checkpoint = args.checkpoint or default_checkpoint()
        demo.start(data_dir, checkpoint)
        demo.run()
        models = demo.finish()
    except KeyboardInterrupt:
        demo.stop_children()
        print("feedloop demo: interrupted; server, trainer and users stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (
        ChildStartupError,
        RuntimeError,
        FeedloopClientError,
        OSError,
        subprocess.CalledProcessError,
    ) as exc:
        demo.stop_children()
        keep = True
        print(f"feedloop demo: {exc}", file=sys.stderr)
        print(f"feedloop demo: logs kept in {data_dir}", file=sys.stderr)
        return EXIT_NOT_IMPROVED
    finally:
        demo.stop_children()
        signal.signal(signal.SIGTERM, previous_handler)
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    return report(demo, models, args, data_dir if keep else None)


def plan_drift(args: argparse.Namespace, checkpoint: Path) -> None:
    """--drift: the tastes (letter sets picked by --seed on the policy's own phrases) and their
    changes, written into args.preference and args.taste_change."""
    from feedloop.demo.tastes import policy_initial_shares, set_share, taste_names, taste_sets

    shares = policy_initial_shares(checkpoint, demo_prompts(args.seed)[:500], seed=args.seed)
    sets = taste_sets(shares, 3, args.seed)
    first, second, third = taste_names(sets)
    at_s = args.drift_at_s if args.drift_at_s is not None else args.duration_s / 3
    args.preference = first
    args.taste_change = {
        "abrupt": [f"{second}@{at_s:g}"],
        "twice": [f"{second}@{at_s:g}", f"{third}@{2 * at_s:g}"],
        "gradual": [f"{second}@{at_s:g}-{2 * at_s:g}"],
    }[args.drift]
    bases = ", ".join(
        f"{name} {set_share(shares, s):.3f}"
        for name, s in zip((first, second, third), sets, strict=True)
    )
    print(
        f"feedloop demo: drift {args.drift}: preference {first}, then "
        f"{' then '.join(args.taste_change)}; the pretrained policy's liked rate on each: "
        f"{bases}",
        flush=True,
    )


def report(
    demo: Demo, models: ModelsResult | None, args: argparse.Namespace, kept: Path | None
) -> int:
    stats = demo.stats
    console = demo.console
    console.print(summary_table(stats, models))
    plot = plot_reward(stats, args.plot, preference=args.preference)
    verdict = judge(
        stats.snapshot_versions(),
        stats.initial_version,
        stats.swaps,
        min_improvement=args.min_improvement,
        min_candidates=args.min_candidates,
        round_counts=stats.round_counts(),
    )
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(stats.errors.items())) or "none"
    print(
        f"feedloop demo: {stats.requests} requests, {stats.feedback_events} feedback events, "
        f"{len(stats.swaps)} swaps, client errors: {errors}"
    )
    explored = stats.exploration
    if explored.requests:
        served = sum(v.candidates for v in stats.snapshot_versions())
        policy_reward = sum(v.reward_sum for v in stats.snapshot_versions()) / max(served, 1)
        print(
            f"feedloop demo: {explored.requests} requests served for exploration "
            f"({explored.requests / max(stats.requests, 1):.1%}), mean true reward "
            f"{explored.mean_reward:.3f} against the policies' {policy_reward:.3f} (its cost)"
        )
    print(f"feedloop demo: reward plot written to {plot}")
    if kept is not None:
        print(f"feedloop demo: data and logs kept in {kept}")
    print(f"feedloop demo: {verdict.message}")
    return EXIT_OK if verdict.improved else EXIT_NOT_IMPROVED

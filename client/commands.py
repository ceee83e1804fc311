"""The client commands of `feedloop`: generate, feedback, models (and models pin, unpin),
status, set-live, rollback, canary (trials), trainer (pause, resume) and online-report.

Each is a thin edge over FeedloopClient: parse flags, make one call, print a table (or JSON with
--json), and turn a FeedloopClientError into one line on stderr and an exit code a script can
branch on. The target and API key may come from FEEDLOOP_TARGET / FEEDLOOP_API_KEY: reading them
here, as argparse defaults, is this command line's configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from feedloop.client.client import FeedloopClient
from feedloop.client.errors import FeedloopClientError
from feedloop.client.human_eval import human_evaluation_text
from feedloop.client.online import OnlineEstimate, OnlineReportResult
from feedloop.client.options import DEFAULT_TARGET, RetryPolicy
from feedloop.client.types import RATING_SCALES, RegistryStateResult, TrialInfo

EXIT_OK, EXIT_OTHER, EXIT_USAGE = 0, 1, 2
EXIT_UNAVAILABLE, EXIT_NOT_FOUND, EXIT_INVALID, EXIT_AUTH = 3, 4, 5, 6

EXIT_CODES_BY_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_INVALID,
    # A failed compare-and-set (--expect-live): the state is not what the caller assumed.
    grpc.StatusCode.ABORTED: EXIT_INVALID,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_INVALID,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
}

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  any other error
  2  usage error (bad flags, unreadable certificate file)
  3  server unavailable, busy or too slow (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED)
  4  not found (unknown generation id or model version)
  5  invalid argument, failed precondition or a failed compare-and-set (ABORTED); the message
     names the field
  6  not authenticated or not allowed (missing or wrong API key)

environment:
  FEEDLOOP_TARGET   default for --target
  FEEDLOOP_API_KEY  default for --api-key
"""


def exit_code_for(code: grpc.StatusCode) -> int:
    return EXIT_CODES_BY_STATUS.get(code, EXIT_OTHER)


# ------------------------------------------------------------------------------ output


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table: the base install has no rich, and pipes want plain text."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short_json(value: dict[str, Any], limit: int = 60) -> str:
    if not value:
        return ""
    text = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
    )
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


# ------------------------------------------------------------------------------ commands


def run_generate(client: FeedloopClient, args: argparse.Namespace) -> Any:
    result = client.generate(
        args.prompt,
        args.n,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        model_version=args.model_version,
        routing_key=args.routing_key,
        token_logprobs=args.token_logprobs,
    )
    if args.json:
        return result
    header = (
        f"model {result.model_version} ({result.served_as})  request {result.request_id}  "
        f"seed {result.seed}"
    )
    rows = [
        (i, c.generation_id, f"{c.log_prob:.3f}", "" if c.finished else "cut", c.text)
        for i, c in enumerate(result.candidates, 1)
    ]
    table = format_table(("#", "generation_id", "log_prob", "", "text"), rows)
    if args.token_logprobs:
        table += "".join(
            f"\n{i}: "
            + "  ".join(f"{t} {lp:.3f}" for t, lp in zip(c.tokens, c.token_logprobs, strict=True))
            for i, c in enumerate(result.candidates, 1)
        )
    return header + "\n" + table


def run_feedback(client: FeedloopClient, args: argparse.Namespace) -> Any:
    kind, event_id = args.kind, args.event_id
    if kind == "rate":
        result = client.rate(args.generation_id, args.score, scale=args.scale, event_id=event_id)
    elif kind == "rank":
        result = client.rank(args.generation_ids, event_id=event_id)
    elif kind == "compare":
        result = client.compare(args.preferred_id, args.rejected_id, event_id=event_id)
    else:
        result = client.correct(args.generation_id, args.text, event_id=event_id)
    if args.json:
        return result
    return f"{result.outcome}: event {result.event_id}"


def run_models(client: FeedloopClient, args: argparse.Namespace) -> Any:
    result = client.list_models(max_decisions=args.max_decisions)
    if args.json:
        return result
    versions = format_table(
        ("", "version", "pin", "parent", "created", "params", "summary"),
        [
            (
                "*" if v.live else "",
                v.version,
                "pinned" if v.pinned else "",
                v.parent_version,
                _when(v.created_at),
                v.parameter_count,
                _short_json(v.summary),
            )
            for v in result.versions
        ],
    )
    decisions = format_table(
        ("at", "version", "action", "reason", "details"),
        [
            (_when(d.at), d.version, d.action, d.reason, _short_json(d.details))
            for d in result.decisions
        ],
    )
    state = _pointer_line(result.live_version, result.trial, result.trainer_paused)
    return f"{state}\n\n{versions}\n\ndecisions:\n{decisions}"


def run_pin(client: FeedloopClient, args: argparse.Namespace) -> Any:
    pinned = args.action == "pin"
    result = client.set_pinned(args.version, pinned, reason=args.reason)
    if args.json:
        return result
    verb = "pinned" if pinned else "unpinned"
    state = verb if result.changed else f"already {verb}"
    return f"{args.version}: {state}; pinned: {', '.join(result.pinned_versions) or '(none)'}"


def _trial_text(trial: TrialInfo | None) -> str:
    if trial is None:
        return "none"
    return f"{trial.version} ({trial.mode} {trial.share:g}, since {_when(trial.since)})"


def _pointer_line(live_version: str, trial: TrialInfo | None, trainer_paused: bool) -> str:
    paused = "  trainer: paused" if trainer_paused else ""
    return f"live: {live_version or '(none)'}  trial: {_trial_text(trial)}{paused}"


def run_status(client: FeedloopClient, args: argparse.Namespace) -> Any:
    result = client.status()
    if args.json:
        return result
    rows = [(f.name, _status_value(getattr(result, f.name))) for f in dataclasses.fields(result)]
    return format_table(("field", "value"), rows)


def _status_value(value: Any) -> str:
    if isinstance(value, TrialInfo) or value is None:
        return _trial_text(value)
    if isinstance(value, tuple):
        return ", ".join(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def run_set_live(client: FeedloopClient, args: argparse.Namespace) -> Any:
    result = client.set_live(
        args.version, reason=args.reason, expected_live_version=args.expect_live
    )
    return result if args.json else f"live: {result.live_version} (was {result.previous_version})"


def run_rollback(client: FeedloopClient, args: argparse.Namespace) -> Any:
    result = client.rollback(reason=args.reason)
    return result if args.json else f"live: {result.live_version} (was {result.previous_version})"


def _state(result: RegistryStateResult, args: argparse.Namespace) -> Any:
    if args.json:
        return result
    return _pointer_line(result.live_version, result.trial, result.trainer_paused)


def run_canary(client: FeedloopClient, args: argparse.Namespace) -> Any:
    if args.action == "start":
        result = client.start_trial(
            args.version,
            share=args.share,
            mode="shadow" if args.shadow else "canary",
            reason=args.reason,
            expected_live_version=args.expect_live,
        )
    else:
        result = client.end_trial(
            promote=args.action == "promote",
            reason=args.reason,
            expected_trial_version=args.expect_version,
        )
    return _state(result, args)


def run_trainer(client: FeedloopClient, args: argparse.Namespace) -> Any:
    result = client.set_trainer_paused(args.action == "pause", reason=args.reason)
    return _state(result, args)


def _estimate(estimate: OnlineEstimate) -> str:
    if estimate.mean is None:
        return "-"
    return f"{estimate.mean:+.3f} [{estimate.low:+.3f}, {estimate.high:+.3f}]"


def _online_text(report: OnlineReportResult) -> str:
    header = (
        f"feedback from {_when(report.since)} to {_when(report.until)}, "
        f"intervals at {(1 - report.alpha) * 100:g}% (time-uniform)\n"
        f"{_pointer_line(report.live_version, report.trial, False)}"
    )
    discounted = any(v.recent_rating is not None for v in report.versions)
    table = format_table(
        ("version", "role", "n", "mean", "interval")
        + (("recent (discounted)",) if discounted else ())
        + ("win rates",),
        [
            (
                v.version,
                v.role,
                v.rating.count,
                "-" if v.rating.mean is None else f"{v.rating.mean:+.3f}",
                "-" if v.rating.mean is None else f"[{v.rating.low:+.3f}, {v.rating.high:+.3f}]",
            )
            + ((_estimate(v.recent_rating) if v.recent_rating else "-",) if discounted else ())
            + (
                "; ".join(
                    f"vs {opponent} {w.mean:.2f} [{w.low:.2f}, {w.high:.2f}] n={w.count}"
                    for opponent, w in v.win_rates.items()
                    if w.mean is not None
                ),
            )
            for v in report.versions
        ],
    )
    text = f"{header}\n\n{table}"
    c = report.trial_comparison
    if c is not None:
        text += (
            f"\n\ntrial {c.trial_version} minus live {c.live_version}, ratings since the trial "
            f"began {c.trial_age_s:.0f} s ago: {_estimate(c.difference)} "
            f"(n {c.trial_rating.count} and {c.live_rating.count})"
        )
        if c.shadow is not None:
            s = c.shadow
            point = "-" if s.mean is None else f"{s.mean:+.3f}"
            served = "-" if s.live_mean is None else f"{s.live_mean:+.3f}"
            text += (
                f"\nshadow {c.trial_version}, off-policy on {s.count} rated live generations it "
                f"scored: lower bound {s.low:+.3f}, estimate {point} (live served {served}), "
                f"effective n {s.effective_count:.0f}, {s.clipped_share:.1%} of ratios clipped "
                f"at {s.max_weight:g}"
            )
    return text


def run_online_report(client: FeedloopClient, args: argparse.Namespace) -> Any:
    report = client.online_report(
        window_s=args.window_s,
        alpha=args.alpha,
        versions=args.version or (),
        half_life_s=args.half_life_s,
    )
    return report if args.json else _online_text(report)


def run_human_eval(client: FeedloopClient, args: argparse.Namespace) -> Any:
    result = client.human_evaluation(args.version_a, args.version_b, alpha=args.alpha)
    return result if args.json else human_evaluation_text(result)


# ------------------------------------------------------------------------------ parsers


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("FEEDLOOP_TARGET") or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help="server address; several replicas as IP:PORT,IP:PORT,... or one DNS name "
        "resolving to all of them (dns:///NAME:PORT), spread round-robin "
        "(default: $FEEDLOOP_TARGET or %(default)s)",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("FEEDLOOP_API_KEY") or None,
        metavar="KEY",
        help="sent as 'authorization: Bearer KEY' (default: $FEEDLOOP_API_KEY)",
    )
    group.add_argument("--tls", action="store_true", help="use TLS with the system's CA roots")
    group.add_argument(
        "--ca-cert",
        type=Path,
        metavar="PEM",
        help="CA certificate that signed the server's (implies --tls)",
    )
    group.add_argument(
        "--client-cert",
        type=Path,
        metavar="PEM",
        help="client certificate for mutual TLS (with --client-key)",
    )
    group.add_argument("--client-key", type=Path, metavar="PEM", help="client private key")
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name expected in the server certificate, when not the host",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="deadline for the call, retries included (default: %(default)s)",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=3,
        metavar="N",
        help="retries on UNAVAILABLE and invited RESOURCE_EXHAUSTED, with backoff, by gRPC's "
        "service config (at most 4; 0: none) (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _parser(name: str, description: str, examples: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"feedloop {name}",
        description=description,
        epilog=f"examples:\n{examples}\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser(name: str) -> argparse.ArgumentParser:
    if name == "generate":
        p = _parser(
            name,
            "Ask the server for phrases; prints each candidate with its generation id.",
            '  feedloop generate "ocean sunrise" -n 3\n'
            '  feedloop generate "quiet forest" -n 2 --temperature 0.7 --top-p 0.9 --seed 7\n'
            '  feedloop generate "rain" --model-version v0002 --json\n',
        )
        p.add_argument("prompt", help="one to three keywords")
        p.add_argument("-n", type=int, default=1, help="number of candidates (default: 1)")
        p.add_argument("--temperature", type=float, help="softmax temperature (>= 0; 0: greedy)")
        p.add_argument("--top-k", type=int, help="keep the k most likely tokens per step")
        p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
        p.add_argument("--max-tokens", type=int, help="most output tokens per candidate")
        p.add_argument("--seed", type=int, help="seed for reproducible sampling")
        p.add_argument("--model-version", help="serve from this loaded version, not the live one")
        p.add_argument(
            "--routing-key",
            help="requests with the same key land on the same side of a canary split",
        )
        p.add_argument(
            "--token-logprobs",
            action="store_true",
            help="also print each token's log-probability (under the distribution sampled from)",
        )
    elif name == "feedback":
        p = _parser(
            name,
            "Tell the server what a user thought of generated phrases.",
            "  feedloop feedback rate GEN_ID 4 --scale stars5\n"
            "  feedloop feedback rate GEN_ID 1 --scale thumbs\n"
            "  feedloop feedback rank GEN_BEST GEN_MIDDLE GEN_WORST\n"
            "  feedloop feedback compare GEN_PREFERRED GEN_REJECTED\n"
            '  feedloop feedback correct GEN_ID "calm sea at dawn"\n'
            "  feedloop feedback rate GEN_ID 0.8 --event-id my-key-1   # safe to repeat\n",
        )
        kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
        rate = kinds.add_parser("rate", help="a score for one generation")
        rate.add_argument("generation_id")
        rate.add_argument("score", type=float)
        rate.add_argument(
            "--scale",
            choices=list(RATING_SCALES),
            default="unit",
            help="unit: [0, 1]; thumbs: 0 or 1; stars5: 1 to 5 (default: unit)",
        )
        rank = kinds.add_parser("rank", help="an order over generations of one reply, best first")
        rank.add_argument("generation_ids", nargs="+", metavar="GENERATION_ID")
        compare = kinds.add_parser("compare", help="one generation preferred over another")
        compare.add_argument("preferred_id")
        compare.add_argument("rejected_id")
        correct = kinds.add_parser("correct", help="what the phrase should have been")
        correct.add_argument("generation_id")
        correct.add_argument("text")
        for sub in (rate, rank, compare, correct):
            sub.add_argument("--event-id", help="idempotency key (default: a new uuid4)")
            add_connection_flags(sub)
        return p
    elif name == "models":
        p = _parser(
            name,
            "List model versions (newest first, * = live) and the registry's decisions; "
            "`feedloop models pin VERSION` / `unpin VERSION` keep a version from retention.",
            "  feedloop models\n  feedloop models --max-decisions 20 --json\n"
            "  feedloop models pin v0003\n  feedloop models unpin v0003\n",
        )
        p.add_argument(
            "--max-decisions",
            type=int,
            default=10,
            help="most recent decisions to show (default: %(default)s)",
        )
    elif name in ("models pin", "models unpin"):
        pin = name == "models pin"
        p = _parser(
            name,
            "Pin a published version, so that registry retention never deletes its weights."
            if pin
            else "Unpin a version: registry retention may delete its weights again.",
            f'  feedloop {name} v0003 --reason "the launch version"\n',
        )
        p.add_argument("version")
        p.add_argument("--reason", default="", help="recorded in the registry history")
        p.set_defaults(action="pin" if pin else "unpin")
    elif name == "status":
        p = _parser(
            name,
            "Show a server's live version and counters.",
            "  feedloop status\n  feedloop status --target 10.0.0.5:50051 --json\n",
        )
    elif name == "set-live":
        p = _parser(
            name,
            "Make a published version live (the server verifies, then swaps).",
            '  feedloop set-live v0003 --reason "better rating in A/B"\n',
        )
        p.add_argument("version")
        p.add_argument("--reason", default="", help="recorded in the registry history")
        p.add_argument(
            "--expect-live",
            metavar="VERSION",
            help="change nothing unless VERSION is live now (compare-and-set)",
        )
    elif name == "rollback":
        p = _parser(
            name,
            "Make the previously live version live again.",
            '  feedloop rollback --reason "reward dropped after v0004"\n',
        )
        p.add_argument("--reason", default="", help="recorded in the registry history")
    elif name == "canary":
        p = _parser(
            name,
            "Run a published version on trial beside the live one, then promote or roll it back.",
            "  feedloop canary start v0004 --share 0.1\n"
            "  feedloop canary start v0004 --share 0.2 --shadow   # scores, serves nothing\n"
            '  feedloop canary promote --reason "ratings as good as live"\n'
            '  feedloop canary rollback --reason "worse ratings"\n',
        )
        actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        start = actions.add_parser("start", help="put a version on trial beside the live one")
        start.add_argument("version")
        start.add_argument(
            "--share",
            type=float,
            required=True,
            help="share of traffic in [0, 1] that it serves (or scores with --shadow)",
        )
        start.add_argument(
            "--shadow", action="store_true", help="score live traffic only, serve nothing"
        )
        start.add_argument(
            "--expect-live",
            metavar="VERSION",
            help="change nothing unless VERSION is live now (compare-and-set)",
        )
        promote = actions.add_parser("promote", help="make the version on trial live")
        rollback = actions.add_parser("rollback", help="end the trial, live unchanged")
        for end in (promote, rollback):
            end.add_argument(
                "--expect-version",
                metavar="VERSION",
                help="change nothing unless VERSION is the one on trial (compare-and-set)",
            )
        for sub in (start, promote, rollback):
            sub.add_argument("--reason", default="", help="recorded in the registry history")
            add_connection_flags(sub)
        return p
    elif name == "trainer":
        p = _parser(
            name,
            "Pause or resume the trainer's publication of new versions.",
            '  feedloop trainer pause --reason "incident 12"\n  feedloop trainer resume\n',
        )
        actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        for action, summary in (
            ("pause", "publish nothing until resumed"),
            ("resume", "publish again"),
        ):
            sub = actions.add_parser(action, help=summary)
            sub.add_argument("--reason", default="", help="recorded in the registry history")
            add_connection_flags(sub)
        return p
    elif name == "online-report":
        p = _parser(
            name,
            "Online reward by version: mean rating (normalised to [-1, 1]) and win rates from "
            "users' feedback, each with an interval that stays valid however often it is looked "
            "at; during a trial, the trial minus live since it began.",
            "  feedloop online-report\n"
            "  feedloop online-report --window-s 600 --alpha 0.1\n"
            "  feedloop online-report --half-life-s 300\n"
            "  feedloop online-report --version v0003 --version v0004 --json\n",
        )
        p.add_argument(
            "--window-s",
            type=float,
            help="read the feedback of the last S seconds (default: the server's, an hour)",
        )
        p.add_argument(
            "--alpha",
            type=float,
            help="intervals cover at level 1 - alpha, alpha in (0, 1) (default: 0.05)",
        )
        p.add_argument(
            "--half-life-s",
            type=float,
            help="also each version's rating discounted by age, a rating S seconds old weighing "
            "half (the trainer's evidence_half_life_s, 300 by default; default: not shown)",
        )
        p.add_argument(
            "--version",
            action="append",
            metavar="VERSION",
            help="report this version, even without feedback (repeatable; default: every "
            "version with feedback, live and the trial)",
        )
    elif name == "human-eval":
        p = _parser(
            name,
            "Human evaluation of version A against version B: raters' blind verdicts (from "
            "`feedloop console`), A's win rate with a Wilson interval, overall and per rater.",
            "  feedloop human-eval v0004 v0003\n  feedloop human-eval v0004 v0003 --json\n",
        )
        p.add_argument("version_a", help="version A (its win rate is reported)")
        p.add_argument("version_b", help="version B")
        p.add_argument(
            "--alpha",
            type=float,
            help="intervals cover at level 1 - alpha, alpha in (0, 1) (default: 0.05)",
        )
        p.add_argument(
            "--half-life-s",
            type=float,
            help="also each version's rating discounted by age, a rating S seconds old weighing "
            "half (the trainer's evidence_half_life_s, 300 by default; default: not shown)",
        )
    else:
        raise KeyError(name)
    add_connection_flags(p)
    return p


RUNNERS: dict[str, Callable[[FeedloopClient, argparse.Namespace], Any]] = {
    "generate": run_generate,
    "feedback": run_feedback,
    "models": run_models,
    "models pin": run_pin,
    "models unpin": run_pin,
    "status": run_status,
    "set-live": run_set_live,
    "rollback": run_rollback,
    "canary": run_canary,
    "trainer": run_trainer,
    "online-report": run_online_report,
    "human-eval": run_human_eval,
}


def client_from_args(args: argparse.Namespace) -> FeedloopClient:
    return FeedloopClient(
        args.target,
        api_key=args.api_key,
        tls=args.tls,
        root_ca_path=args.ca_cert,
        client_cert_path=args.client_cert,
        client_key_path=args.client_key,
        tls_server_name=args.tls_server_name,
        timeout_s=args.timeout,
        retry=RetryPolicy(max_attempts=args.retries + 1),
    )


def main(argv: list[str]) -> int:
    """Run one client command; argv[0] is its name (generate, feedback, models, ...)."""
    name, rest = argv[0], argv[1:]
    if name == "models" and rest[:1] in (["pin"], ["unpin"]):
        name, rest = f"models {rest[0]}", rest[1:]
    prog = f"feedloop {name}"
    if name not in RUNNERS:
        print(f"feedloop: {name!r} is not a client command", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = build_parser(name).parse_args(rest)
    except SystemExit as exc:  # argparse has printed usage or help already
        return int(exc.code or 0)
    try:
        if args.timeout <= 0 or args.retries < 0:
            raise ValueError("--timeout must be positive and --retries at least 0")
        client = client_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            output = RUNNERS[name](client, args)
    except FeedloopClientError as exc:
        print(f"{prog}: {exc.code.name}: {exc.message} (server {args.target})", file=sys.stderr)
        return exit_code_for(exc.code)
    except OSError as exc:  # a certificate file that cannot be read
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(to_jsonable(output), indent=2))
    else:
        print(output)
    return EXIT_OK

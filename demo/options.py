"""The options of `feedloop demo`: who the simulated users are and how the run goes."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  feedloop demo                                        # under 5 minutes, then a verdict
  feedloop demo --preference include:little --duration-s 300
  feedloop demo --preference avoid:the --feedback-mix rating=1 --users 16 --rate-rps 20
  feedloop demo --preference length:3 --feedback-mix comparison=0.5,ranking=0.5 --no-live
  feedloop demo --trainer-arg=--algorithm --trainer-arg=reinforce --keep-data
  feedloop demo --drift --duration-s 600                # the users' taste changes at 200 s
  feedloop demo --drift gradual --drift-at-s 120 --duration-s 480

preferences: include:WORD, avoid:WORD, length[:N] (about N words), keyword (contain the prompt),
  initial:LETTERS (the last word starts with one of the letters)
feedback kinds: rating, comparison, ranking, correction

exit codes: 0 the reward improved; 1 it did not (the reason is printed) or a process failed;
  2 usage error; 130 interrupted (everything is stopped either way)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="feedloop demo",
        description="Run the server, the trainer and simulated users together and watch the "
        "policy learn the users' preference from their feedback.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    users = p.add_argument_group("simulated users")
    users.add_argument(
        "--preference",
        default="include:little",
        help="the users' hidden preference (default: %(default)s)",
    )
    users.add_argument(
        "--feedback-mix",
        default="rating=0.4,comparison=0.3,ranking=0.15,correction=0.15",
        metavar="KIND=W,...",
        help="relative weights of feedback kinds (default: %(default)s)",
    )
    users.add_argument(
        "--users",
        type=int,
        default=64,
        help="simulated users; each stays on one side of a canary trial (default: %(default)s)",
    )
    users.add_argument(
        "--rate-rps",
        type=float,
        default=40.0,
        help="requests per second of all users together (default: %(default)s)",
    )
    users.add_argument(
        "--candidates", type=int, default=4, help="candidates per request (default: %(default)s)"
    )
    users.add_argument(
        "--noise-sd",
        type=float,
        default=0.15,
        help="noise on the users' judgement, in reward units (default: 0.15)",
    )
    users.add_argument(
        "--scale",
        choices=("unit", "thumbs", "stars5"),
        default="unit",
        help="rating scale the users rate on (default: %(default)s)",
    )
    users.add_argument(
        "--taste-change",
        action="append",
        default=[],
        metavar="PREFERENCE@SECONDS[-END]",
        help="drift: the users' preference becomes PREFERENCE this many seconds into the run "
        "(e.g. keyword@120), or user by user from SECONDS to END (initial:bcd@120-240); "
        "repeat for several changes; the report then measures each phase on its own taste",
    )
    users.add_argument(
        "--drift",
        nargs="?",
        const="abrupt",
        choices=("abrupt", "twice", "gradual"),
        help="issue 21's drift: users like phrases whose last word starts with one of a set of "
        "letters (each set about a quarter of the pretrained policy's phrases, picked by "
        "--seed), and their set changes: abrupt (once, at --drift-at-s), twice (at it and "
        "twice it) or gradual (user by user from it to twice it); replaces --preference and "
        "--taste-change",
    )
    users.add_argument(
        "--drift-at-s",
        type=float,
        help="when the first change of --drift starts (default: a third of --duration-s)",
    )
    users.add_argument("--seed", type=int, default=0, help="seed of prompts and users")
    run = p.add_argument_group("the run")
    run.add_argument(
        "--duration-s",
        type=float,
        default=225.0,
        help="how long the users keep coming (default: %(default)s)",
    )
    run.add_argument(
        "--checkpoint",
        type=Path,
        help="initial policy (default: the default pretrained policy, built first "
        "with `feedloop pretrain` if missing)",
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        help="where store, registry and logs go (default: a fresh temporary "
        "directory, removed at the end unless --keep-data)",
    )
    run.add_argument("--keep-data", action="store_true", help="keep the data directory")
    run.add_argument(
        "--plot",
        type=Path,
        default=Path("feedloop-demo-reward.png"),
        help="PNG of reward over time (default: %(default)s)",
    )
    run.add_argument(
        "--min-improvement",
        type=float,
        default=0.03,
        help="gain in mean true reward that counts as improved (default: 0.03)",
    )
    run.add_argument(
        "--min-candidates",
        type=int,
        default=40,
        help="candidates a version must serve to be measured (default: 40)",
    )
    run.add_argument(
        "--trainer-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `feedloop train` (repeat for several)",
    )
    run.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `feedloop serve` (repeat for several)",
    )
    run.add_argument(
        "--startup-timeout-s",
        type=float,
        default=180.0,
        help="how long server and trainer may take to start (default: 180)",
    )
    run.add_argument(
        "--no-live",
        action="store_true",
        help="print a progress line every 10 s instead of a live table",
    )
    return p

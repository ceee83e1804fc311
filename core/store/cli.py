"""`feedloop store`: replay store tools. `export` writes generations joined with their feedback;
`erase` deletes one client's or end user's data and records the erasure; `erasures` lists those
records; `prune`, `vacuum` and `backup` keep a long run's store bounded and safe
(feedloop.core.store.maintenance_cli).

Exit codes: 0 done (also for an erase that found nothing: it says so), 1 the store could not be
read or written, 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tqdm import tqdm

from feedloop.core.config import add_config_flags, config_from_args
from feedloop.core.errors import ConfigError, StoreError
from feedloop.core.store import maintenance_cli
from feedloop.core.store.base import ErasureRecord
from feedloop.core.store.cli_common import StoreToolConfig, open_existing
from feedloop.core.tool_cli import ToolParser, UsageError, parse_command

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

EXAMPLES = """\
examples:
  feedloop store export                                  # the embedded store, to stdout
  feedloop store export --store ~/replay.sqlite3 --output replay.jsonl
  feedloop store export --store 'postgresql://feedloop@db:5432/feedloop?schema=prod' | head
  FEEDLOOP_STORE=postgresql://feedloop@db/feedloop feedloop store export -o all.jsonl

Each output line is one generation (every logged field: prompt, output tokens, behaviour and
policy log-probabilities, sampling parameters, model version, ...) with a "feedback" list of
every event that names it, oldest first.
"""

EXAMPLES_ERASE = """\
examples:
  feedloop store erase --client app-42                      # the embedded store
  feedloop store erase --client app-42 --requested-by "ticket 1234 (dpo@example.com)"
  feedloop store erase --client app-42 --store 'postgresql://feedloop@db/feedloop?schema=prod'
  feedloop store erase --end-user user-7781                 # the app's end-user key

Deletes, in one transaction, every generation served to the client (or logged with the end-user
key: GenerateRequest.end_user, the OpenAI API's `user`), every feedback event the client sent or
that names one of those generations, and their shadow scores, after removing the same rows from
every archive file retention wrote; records who asked, when and how many rows (never the
content: `feedloop store erasures` lists the records). The trainer never
reads the erased rows again and its cursors stay valid. Models trained before the erasure keep
their weights: what they learnt from the data is not unlearnt. Rows the server logs for the
client after the erasure are not erased. An unknown client: nothing is found, nothing changes.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog="feedloop store", description="Replay store tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ToolParser)
    export = commands.add_parser(
        "export",
        help="write generations joined with their feedback as JSON Lines",
        description="Write every generation with its feedback events as JSON Lines.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--config", metavar="FILE", help="TOML config file ([store] table)")
    add_config_flags(export, StoreToolConfig)
    export.add_argument(
        "-o", "--output", metavar="FILE", help="write here instead of stdout (replaced whole)"
    )
    erase = commands.add_parser(
        "erase",
        help="delete one client's generations and feedback, and record the erasure",
        description="Delete one client's generations and feedback from the replay store.",
        epilog=EXAMPLES_ERASE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    whose = erase.add_mutually_exclusive_group(required=True)
    whose.add_argument("--client", metavar="ID", help="the client id to erase")
    whose.add_argument(
        "--end-user", metavar="KEY", help="the end-user key to erase (GenerateRequest.end_user)"
    )
    erase.add_argument(
        "--requested-by",
        metavar="WHO",
        help="who asked, recorded with the erasure (default: this user's login name)",
    )
    erasures = commands.add_parser(
        "erasures", help="list the recorded erasures", description="List the recorded erasures."
    )
    for sub in (erase, erasures):
        sub.add_argument("--config", metavar="FILE", help="TOML config file ([store] table)")
        add_config_flags(sub, StoreToolConfig)
        sub.add_argument("--json", action="store_true", help="print JSON")
    maintenance_cli.add_parsers(commands)
    return parser


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    """stdout, or FILE written beside itself and renamed in place: no half-written export."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.partial")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def export(location: str, output: str | None) -> tuple[int, int]:
    """Export the store at location; (generations, feedback events) written."""
    store = open_existing(location)
    try:
        total = store.counts().generations
        generations = events = 0
        with (
            _output(output) as out,
            tqdm(
                total=total,
                unit="gen",
                desc="export",
                file=sys.stderr,
                disable=output is None or not sys.stderr.isatty(),
            ) as progress,
        ):
            for row in store.iter_export():
                out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
                generations += 1
                events += len(row["feedback"])
                progress.update(1)
        return generations, events
    finally:
        store.close()


def erase(
    location: str, requested_by: str, *, client_id: str | None = None, end_user: str | None = None
) -> ErasureRecord:
    """Erase a client's or an end user's data from the store at location (EXAMPLES_ERASE)."""
    store = open_existing(location)
    try:
        if end_user is not None:
            return store.erase_end_user(end_user, requested_by=requested_by, now=time.time())
        assert client_id is not None
        return store.erase_client(client_id, requested_by=requested_by, now=time.time())
    finally:
        store.close()


def list_erasures(location: str) -> list[ErasureRecord]:
    store = open_existing(location)
    try:
        return store.erasures()
    finally:
        store.close()


def _erasure_text(record: ErasureRecord) -> str:
    return (
        f"{record.identity}: {record.generations} generations, {record.feedback} "
        f"feedback events, {record.shadow_scores} shadow scores, {record.archive_rows} archive "
        f"rows, {record.verdicts} human-evaluation verdicts erased at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(record.erased_at))} UTC, "
        f"requested by {record.requested_by}"
    )


def run_erase(config: StoreToolConfig, args: argparse.Namespace) -> None:
    flag, value = (
        ("--client", args.client) if args.client is not None else ("--end-user", args.end_user)
    )
    if not value.strip():
        raise UsageError(f"feedloop store erase: {flag} must not be empty")
    record = erase(
        config.store_location(),
        args.requested_by or getpass.getuser(),
        client_id=args.client,
        end_user=args.end_user,
    )
    if args.json:
        print(json.dumps({**dataclasses.asdict(record), "found": record.found}))
    elif record.found:
        print(f"feedloop store erase: {_erasure_text(record)}")
    else:
        print(
            f"feedloop store erase: found nothing for {record.identity}; nothing changed "
            "and nothing was recorded"
        )


def run_erasures(config: StoreToolConfig, args: argparse.Namespace) -> None:
    records = list_erasures(config.store_location())
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in records], indent=2))
    else:
        print("\n".join(_erasure_text(r) for r in records) or "no erasures recorded")


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parse_command(parser, argv)
        config_class = (
            maintenance_cli.StoreRetentionConfig if args.command == "prune" else StoreToolConfig
        )
        config = config_from_args(config_class, args, section="store")
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"feedloop store {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        if args.command == "erase":
            run_erase(config, args)
            return EXIT_OK
        if args.command == "erasures":
            run_erasures(config, args)
            return EXIT_OK
        if args.command == "prune":
            assert isinstance(config, maintenance_cli.StoreRetentionConfig)
            maintenance_cli.run_prune(config, args)
            return EXIT_OK
        if args.command == "vacuum":
            maintenance_cli.run_vacuum(config, args)
            return EXIT_OK
        if args.command == "backup":
            maintenance_cli.run_backup(config, args)
            return EXIT_OK
        generations, events = export(config.store_location(), args.output)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, OSError) as exc:
        print(f"feedloop store {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"feedloop store export: {generations} generations, {events} feedback events "
        f"-> {args.output or 'stdout'}",
        file=sys.stderr,
    )
    return EXIT_OK

"""`feedloop store prune | vacuum | backup`: the replay store's upkeep for long runs.

Retention runs as its own process (`feedloop store prune`, once from cron or a timer, or
`--prune-every-s` to repeat), not inside the server: the server's event loop never waits on a
prune (not even for the GIL: a batch's reads and JSON decoding run in another process), one
pruner serves every server replica of a shared PostgreSQL store, and the trainer's rounds keep
their own process to themselves. The store's locks do the rest: each batch is one short write
transaction that the server's group commits pass between.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from feedloop.core.config import add_config_flags, is_postgres_url
from feedloop.core.errors import StoreUnavailableError
from feedloop.core.store.base import ReplayStore
from feedloop.core.store.cli_common import StoreToolConfig, open_existing
from feedloop.core.store.retention import DAY_S, StorePruner, StoreRetentionPolicy
from feedloop.core.tool_cli import UsageError

EXAMPLES_PRUNE = """\
examples:
  feedloop store prune --retain-days 7                        # once (from cron, a timer)
  feedloop store prune --retain-days 7 --prune-every-s 300    # every 5 minutes, until stopped
  feedloop store prune --retain-max-gb 20 --archive-dir /srv/feedloop-archive

Deletes generations older than --retain-days (or the oldest while the store's live data is over
--retain-max-gb, SQLite only) with the feedback events naming them, in small batches, never what
the trainer still needs: rows past its cursor (the current window, join window and held-out
share), rows younger than --retain-min-age-h (feedback may still arrive; the online evaluation
reads them) and generations a kept event names. With --archive-dir the rows are first written
there as gzip JSON Lines in `feedloop store export`'s format. SQLite then gives the space back
(incremental vacuum); PostgreSQL reuses it for new rows once autovacuum has run.
"""


@dataclass(frozen=True)
class StoreRetentionConfig(StoreToolConfig):
    retain_days: float | None = field(
        default=None, metadata={"help": "delete generations and their feedback older than this"}
    )
    retain_max_gb: float | None = field(
        default=None,
        metadata={"help": "delete the oldest while the store's live data is over this (SQLite)"},
    )
    retain_min_age_h: float = field(
        default=24.0,
        metadata={
            "help": "never delete rows younger than this: feedback may still arrive, and the "
            "trainer's online evaluation reads a day of ratings (its decision_lookback_s)"
        },
    )
    archive_dir: Path | None = field(
        default=None,
        metadata={"help": "write pruned rows here first (gzip JSON Lines, the export format)"},
    )
    prune_every_s: float | None = field(
        default=None, metadata={"help": "repeat every this many seconds (unset: once)"}
    )
    prune_batch: int = field(
        default=500, metadata={"help": "generations per delete transaction (a short write lock)"}
    )

    def policy(self) -> StoreRetentionPolicy:
        try:
            return StoreRetentionPolicy(
                retain_s=None if self.retain_days is None else self.retain_days * DAY_S,
                retain_max_bytes=(
                    None if self.retain_max_gb is None else int(self.retain_max_gb * 1e9)
                ),
                min_age_s=self.retain_min_age_h * 3600,
                batch_generations=self.prune_batch,
            )
        except ValueError as exc:
            raise UsageError(f"feedloop store prune: {exc}") from None


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    prune = commands.add_parser(
        "prune",
        help="apply age- and size-based retention (optionally archiving first)",
        description="Delete what the retention lets go, in small batches.",
        epilog=EXAMPLES_PRUNE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(prune, StoreRetentionConfig)
    vacuum = commands.add_parser(
        "vacuum",
        help="switch a SQLite store made before retention to incremental vacuum (one VACUUM)",
        description=(
            "Rewrite a SQLite store once so retention can give space back (auto_vacuum="
            "INCREMENTAL). Needs as much free disk as the store; writers wait meanwhile, so "
            "run it while the server is stopped."
        ),
    )
    add_config_flags(vacuum, StoreToolConfig)
    backup = commands.add_parser(
        "backup",
        help="back up the embedded store and registry while the server runs",
        description=(
            "Copy the registry (under its writers' lock) and then the SQLite store (SQLite's "
            "online backup API: one consistent snapshot, writers never blocked) into DEST, "
            "laid out as a data directory: restore by serving with --data-dir DEST. "
            "PostgreSQL: use pg_dump (README)."
        ),
    )
    backup.add_argument("destination", metavar="DEST", help="a new or empty directory")
    backup.add_argument(
        "--registry", metavar="DIR", help="the registry directory (default: DATA_DIR/registry)"
    )
    add_config_flags(backup, StoreToolConfig)
    for sub in (prune, vacuum, backup):
        sub.add_argument("--config", metavar="FILE", help="TOML config file ([store] table)")
        sub.add_argument("--json", action="store_true", help="print JSON")


def run_prune(config: StoreRetentionConfig, args: argparse.Namespace) -> None:
    policy = config.policy()
    store = open_existing(config.store_location())
    try:
        try:
            pruner = StorePruner(store, policy, archive_dir=config.archive_dir)
        except ValueError as exc:
            raise UsageError(f"feedloop store prune: {exc}") from None
        while True:
            try:
                report = pruner.run_once()
            except StoreUnavailableError as exc:
                if config.prune_every_s is None:
                    raise
                # Repeating: a pass that met a busy or unreachable store is tried again at the
                # next one (each batch is its own transaction: nothing is left half-done).
                print(f"feedloop store prune: pass failed, retrying: {exc}", file=sys.stderr)
                time.sleep(config.prune_every_s)
                continue
            if args.json:
                print(json.dumps({**asdict(report), "rows": asdict(report.rows)}), flush=True)
            else:
                print(f"feedloop store prune: {report.summary()}", flush=True)
            if config.prune_every_s is None:
                return
            time.sleep(config.prune_every_s)
    finally:
        store.close()


def _sqlite(store: ReplayStore, command: str) -> ReplayStore:
    from feedloop.core.store.sqlite import SQLiteStore

    if not isinstance(store, SQLiteStore):
        raise UsageError(
            f"feedloop store {command}: the store is PostgreSQL; "
            + (
                "back it up with pg_dump (README: backup and restore)"
                if command == "backup"
                else "PostgreSQL reuses deleted rows' space by itself (autovacuum)"
            )
        )
    return store


def run_vacuum(config: StoreToolConfig, args: argparse.Namespace) -> None:
    store = open_existing(config.store_location())
    try:
        sqlite = _sqlite(store, "vacuum")
        before = sqlite.vacuum_mode()  # type: ignore[attr-defined]
        started = time.monotonic()
        if before != "incremental":
            sqlite.convert_to_incremental_vacuum()  # type: ignore[attr-defined]
        result = {
            "before": before,
            "after": sqlite.vacuum_mode(),  # type: ignore[attr-defined]
            "seconds": round(time.monotonic() - started, 3),
            "bytes": sqlite.size_bytes(),
        }
    finally:
        store.close()
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"feedloop store vacuum: auto_vacuum {result['before']} -> {result['after']} "
            f"({result['bytes'] / 1e6:.1f} MB, {result['seconds']} s)"
        )


def run_backup(config: StoreToolConfig, args: argparse.Namespace) -> None:
    destination = Path(args.destination)
    if destination.exists() and any(destination.iterdir()):
        raise UsageError(f"feedloop store backup: {destination} is not empty")
    registry = args.registry or str(config.data_dir / "registry")
    if is_postgres_url(registry):
        raise UsageError(
            "feedloop store backup: the registry is PostgreSQL; back it up with pg_dump "
            "(README: backup and restore)"
        )
    store = open_existing(config.store_location())
    try:
        sqlite = _sqlite(store, "backup")
        started = time.monotonic()
        # The registry first: the store copied after it is at least as new, so the restored
        # trainer's cursor never points past data the restored store lacks (see README).
        versions: list[str] = []
        if Path(registry).is_dir():
            from feedloop.core.registry.directory import DirectoryRegistry

            versions = DirectoryRegistry(Path(registry)).backup(destination / "registry")
        destination.mkdir(parents=True, exist_ok=True)
        sqlite.backup(destination / "replay.sqlite3")  # type: ignore[attr-defined]
        counts = store.counts()
    finally:
        store.close()
    result = {
        "destination": str(destination),
        "registry_versions": versions,
        "generations": counts.generations,
        "feedback": counts.feedback,
        "seconds": round(time.monotonic() - started, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"feedloop store backup: {counts.generations} generations, {counts.feedback} "
            f"feedback events and {len(versions)} registry versions -> {destination} "
            f"({result['seconds']} s); restore: feedloop serve --data-dir {destination}",
            file=sys.stderr,
        )

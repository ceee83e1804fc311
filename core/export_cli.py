"""`feedloop export`: users' feedback as training datasets in TRL's formats, JSON Lines or Parquet.

Streams: events are read a page at a time in the order they were stored, each page's generations
fetched with it, and rows written as they come (Parquet in row groups), so memory stays bounded
by a page whatever the store holds. The file appears whole or not at all (written beside itself,
then renamed). core/training_rows.py builds the rows.

Exit codes: 0 written, 1 the store could not be read or the file written, 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from feedloop.core.config import add_config_flags, config_from_args
from feedloop.core.errors import ConfigError, StoreError
from feedloop.core.feedback_kinds import FEEDBACK_KINDS
from feedloop.core.store.base import ReplayStore
from feedloop.core.store.cli_common import StoreToolConfig, open_existing
from feedloop.core.tool_cli import ToolParser, UsageError
from feedloop.core.training_rows import (
    COLUMNS,
    DATASETS,
    KINDS_OF,
    DatasetName,
    Row,
    Skipped,
    rows_of,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
PAGE_EVENTS = 2000  # events read per query; their generations are fetched in one more
PARQUET_ROW_GROUP = 50_000

EXAMPLES = """\
examples:
  feedloop export preference -o pairs.jsonl                  # comparisons, rankings, corrections
  feedloop export preference --kind comparison -o pairs.parquet
  feedloop export kto --kto-threshold 0.5 --since 2026-12-01 -o kto.parquet
  feedloop export sft --version v0007 --version v0008 -o sft.jsonl
  python -c "import datasets; print(datasets.load_dataset('json', data_files='pairs.jsonl'))"

datasets (TRL's formats; each row also has kind, event_id and model_version):
  preference  {prompt, chosen, rejected}: a comparison's pair; a ranking's every better one over
              every worse one (K(K-1)/2 pairs); a correction's text over the original
  kto         {prompt, completion, label}: one per rating; label true when the rating, mapped to
              [-1, 1] by its scale, is above the threshold, false below minus it, no row between
  sft         {prompt, completion}: one per correction (TRL's prompt-completion format)
"""


@dataclass(frozen=True)
class ExportFilter:
    """Which events and rows go in: kinds, a received-at floor, model versions."""

    kinds: frozenset[str]
    since: float | None = None  # Unix seconds; events received before are left out
    versions: frozenset[str] = field(default_factory=frozenset)  # empty: every version

    def takes_event(self, kind: str, received_at: float) -> bool:
        return kind in self.kinds and (self.since is None or received_at >= self.since)

    def takes_row(self, row: Row) -> bool:
        return not self.versions or row["model_version"] in self.versions


class RowWriter(Protocol):
    def write(self, row: Row) -> None: ...
    def close(self) -> None: ...


class JsonLinesWriter:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def write(self, row: Row) -> None:
        self._out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._out.flush()


class ParquetRowWriter:
    """Rows buffered into row groups of PARQUET_ROW_GROUP, each written as it fills."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        import pyarrow as pa  # the export extra; imported only for Parquet
        import pyarrow.parquet as pq

        types = {"label": pa.bool_()}
        self._pa = pa
        self._schema = pa.schema([(c, types.get(c, pa.string())) for c in columns])
        self._writer = pq.ParquetWriter(str(path), self._schema)
        self._buffer: dict[str, list[Any]] = {c: [] for c in columns}
        self._rows = 0

    def write(self, row: Row) -> None:
        for column, values in self._buffer.items():
            values.append(row[column])
        self._rows += 1
        if self._rows >= PARQUET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            table = self._pa.Table.from_pydict(self._buffer, schema=self._schema)
            self._writer.write_table(table)
            for values in self._buffer.values():
                values.clear()
            self._rows = 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def file_format(path: str | None, asked: str | None) -> str:
    """jsonl or parquet: as asked, else by the file's suffix (stdout: jsonl)."""
    if asked:
        return asked
    if path is not None and Path(path).suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    return "jsonl"


@contextlib.contextmanager
def _writer(path: str | None, fmt: str, columns: Sequence[str]) -> Iterator[RowWriter]:
    """A writer to stdout, or to FILE written beside itself and renamed in place when done."""
    if path is None:
        if fmt == "parquet":
            raise UsageError("feedloop export: Parquet needs --output FILE")
        writer = JsonLinesWriter(sys.stdout)
        yield writer
        writer.close()
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.partial")
    try:
        if fmt == "parquet":
            parquet = ParquetRowWriter(tmp, columns)
            yield parquet
            parquet.close()
        else:
            with tmp.open("w", encoding="utf-8") as out:
                jsonl = JsonLinesWriter(out)
                yield jsonl
                jsonl.close()
                os.fsync(out.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def iter_rows(
    store: ReplayStore,
    dataset: DatasetName,
    chosen: ExportFilter,
    *,
    kto_threshold: float,
    skipped: Skipped,
    page_events: int = PAGE_EVENTS,
) -> Iterator[Row]:
    """dataset's rows of every event the filter takes, in the order the events were stored."""
    last_seq = 0
    while page := store.feedback_after(last_seq, page_events):
        last_seq = page[-1].seq
        events = [e for e in page if chosen.takes_event(e.kind, e.received_at)]
        if not events:
            continue
        generations = store.get_generations([g for e in events for g in e.generation_ids])
        for event in events:
            for row in rows_of(
                dataset, event, generations, kto_threshold=kto_threshold, skipped=skipped
            ):
                if chosen.takes_row(row):
                    yield row


def export_dataset(
    location: str,
    dataset: DatasetName,
    chosen: ExportFilter,
    output: str | None,
    fmt: str,
    *,
    kto_threshold: float = 0.0,
) -> tuple[int, dict[str, int]]:
    """Write dataset's rows from the store at location; (rows written, skipped by reason)."""
    store = open_existing(location)
    skipped = Skipped({})
    written = 0
    try:
        with _writer(output, fmt, COLUMNS[dataset]) as writer:
            for row in iter_rows(
                store, dataset, chosen, kto_threshold=kto_threshold, skipped=skipped
            ):
                writer.write(row)
                written += 1
    finally:
        store.close()
    return written, skipped.counts


def parse_since(text: str) -> float:
    """Unix seconds, or an ISO 8601 date or time (UTC unless it names a zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"feedloop export: --since {text!r} is neither Unix seconds nor an ISO 8601 date"
        ) from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC).timestamp()
    return moment.timestamp()


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog="feedloop export",
        description="Write users' feedback as a training dataset (TRL's formats).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", choices=DATASETS, help="which dataset (see below)")
    parser.add_argument("--config", metavar="FILE", help="TOML config file ([store] table)")
    add_config_flags(parser, StoreToolConfig)
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="write here (.jsonl or .parquet) instead of stdout"
    )
    parser.add_argument(
        "--format", choices=("jsonl", "parquet"), help="file format (default: by the suffix)"
    )
    parser.add_argument(
        "--kind",
        action="append",
        choices=FEEDBACK_KINDS,
        help="only events of this kind (repeatable; default: every kind the dataset takes)",
    )
    parser.add_argument(
        "--since", metavar="WHEN", help="only events received at or after (ISO 8601 or Unix s)"
    )
    parser.add_argument(
        "--version",
        action="append",
        default=[],
        metavar="VERSION",
        help="only generations of this model version (repeatable)",
    )
    parser.add_argument(
        "--kto-threshold",
        type=float,
        default=0.0,
        metavar="T",
        help="kto: label true above T, false below -T, on ratings mapped to [-1, 1] "
        "(default: %(default)s)",
    )
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv[1:])
        config = config_from_args(StoreToolConfig, args, section="store")
        dataset: DatasetName = args.dataset
        kinds = set(args.kind or KINDS_OF[dataset])
        if not kinds <= set(KINDS_OF[dataset]):
            raise UsageError(
                f"feedloop export: --kind {', '.join(sorted(kinds - set(KINDS_OF[dataset])))} "
                f"gives no {dataset} rows (it takes {', '.join(KINDS_OF[dataset])})"
            )
        if not 0.0 <= args.kto_threshold < 1.0:
            raise UsageError("feedloop export: --kto-threshold must be in [0, 1)")
        chosen = ExportFilter(
            frozenset(kinds),
            parse_since(args.since) if args.since else None,
            frozenset(args.version),
        )
        fmt = file_format(args.output, args.format)
        if fmt == "parquet" and args.output is None:
            raise UsageError("feedloop export: Parquet needs --output FILE")
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"feedloop export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    started = time.monotonic()
    try:
        written, skipped = export_dataset(
            config.store_location(),
            dataset,
            chosen,
            args.output,
            fmt,
            kto_threshold=args.kto_threshold,
        )
    except (StoreError, OSError) as exc:
        print(f"feedloop export: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    left_out = "".join(f", {n} left out ({reason})" for reason, n in sorted(skipped.items()))
    print(
        f"feedloop export: {written} {dataset} rows{left_out} -> {args.output or 'stdout'} "
        f"in {time.monotonic() - started:.1f}s",
        file=sys.stderr,
    )
    return EXIT_OK

"""What every `feedloop store` command shares: where the store is, and opening it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from feedloop.core.config import default_data_dir, is_postgres_url
from feedloop.core.store.base import ReplayStore
from feedloop.core.store.factory import open_store


@dataclass(frozen=True)
class StoreToolConfig:
    """Where the store is: the same keys as the server's and trainer's configs."""

    data_dir: Path = field(
        default_factory=default_data_dir,
        metadata={"help": "feedloop's data directory (holds the embedded store)"},
    )
    store: str | None = field(
        default=None,
        metadata={
            "help": "replay store: a SQLite path or a postgresql:// URL "
            "(unset: DATA_DIR/replay.sqlite3)"
        },
    )

    def store_location(self) -> str:
        return self.store or str(self.data_dir / "replay.sqlite3")


def open_existing(location: str) -> ReplayStore:
    """The store at location; FileNotFoundError rather than a new empty SQLite file."""
    if not is_postgres_url(location) and not Path(location).is_file():
        raise FileNotFoundError(f"no replay store at {location}")
    return open_store(location)

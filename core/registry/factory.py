"""Opening a model registry: the backend is chosen by the location's form, with every option
the backends take, so that callers need not know which one they got."""

from __future__ import annotations

from pathlib import Path

from feedloop.core.config import is_postgres_url
from feedloop.core.registry.base import ModelRegistry
from feedloop.core.registry.directory import DirectoryRegistry


def open_registry(
    location: str | Path,
    *,
    poll_interval_s: float | None = None,
    data_dir: Path | None = None,
) -> ModelRegistry:
    """A registry from a directory path or a postgresql:// URL.

    poll_interval_s: how often a wait for a new live version re-reads the pointer (None: the
    backend's default; a PostgreSQL registry is woken by notifications and polls only in case
    one is lost). data_dir: the data folder a PostgreSQL registry keeps its checkpoint cache in
    (None: the default data folder).
    """
    text = str(location)
    if is_postgres_url(text):
        # Imported here, so that a directory registry never loads psycopg.
        from feedloop.core.registry.postgres import PostgresRegistry, checkpoint_cache_dir

        return PostgresRegistry(
            text,
            cache_dir=None if data_dir is None else checkpoint_cache_dir(data_dir, text),
            poll_interval_s=(
                PostgresRegistry.DEFAULT_POLL_INTERVAL_S
                if poll_interval_s is None
                else poll_interval_s
            ),
        )
    return DirectoryRegistry(
        Path(text),
        poll_interval_s=(
            DirectoryRegistry.DEFAULT_POLL_INTERVAL_S
            if poll_interval_s is None
            else poll_interval_s
        ),
    )

"""Opening a replay store: the backend is chosen by the location's form."""

from __future__ import annotations

from feedloop.core.config import is_postgres_url
from feedloop.core.store.base import ReplayStore


def open_store(location: str) -> ReplayStore:
    """A replay store from a SQLite path or a postgresql:// URL (schema migrated on open)."""
    # Imported here, so that a SQLite store never loads psycopg and the reverse.
    if is_postgres_url(location):
        from feedloop.core.store.postgres import PostgresStore

        return PostgresStore(location)
    from feedloop.core.store.sqlite import SQLiteStore

    return SQLiteStore(location)

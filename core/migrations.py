"""Versioned schemas: ordered migrations brought up to date inside one transaction.

A schema keeps its version in a one-row table. At open, every migration past the stored version
runs, in order, inside the caller's transaction together with the version bump, so a schema is
either at the old version or the new one, never between (a crash mid-migration rolls back).
Reopening an up-to-date schema runs nothing. A migration, once released, is never edited:
changes are new entries appended to the list. The replay store (both backends) and the
PostgreSQL model registry keep their schemas this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def migrate(
    conn: Any,
    migrations: Sequence[Sequence[str]],
    *,
    placeholder: str,
    store_name: str,
    error: type[Exception],
    version_table: str = "schema_version",
) -> None:
    """Bring a schema to len(migrations) inside the caller's transaction.

    conn is a DB-API connection (sqlite3 or psycopg: both have `execute` returning a cursor);
    placeholder is the driver's parameter marker ("?" or "%s"). The version lives in one row of
    version_table; a schema newer than these migrations raises `error`.
    """
    latest = len(migrations)
    conn.execute(f"CREATE TABLE IF NOT EXISTS {version_table} (version INTEGER NOT NULL)")
    row = conn.execute(f"SELECT version FROM {version_table}").fetchone()
    current = row[0] if row else 0
    if current > latest:
        raise error(
            f"{store_name} has schema version {current}, newer than this feedloop knows "
            f"({latest}): upgrade feedloop"
        )
    for statements in migrations[current:]:
        for statement in statements:
            conn.execute(statement)
    if row is None:
        conn.execute(f"INSERT INTO {version_table} (version) VALUES ({placeholder})", (latest,))
    elif current != latest:
        conn.execute(f"UPDATE {version_table} SET version = {placeholder}", (latest,))

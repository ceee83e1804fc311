"""PostgreSQL isolation for the store and registry tests: a fresh schema per test, dropped after.

Tests that need the server skip with the reason only when nothing answers on 127.0.0.1:5432;
any other failure (bad credentials, missing database) fails loudly instead of hiding.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Iterator

import psycopg
import pytest

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


@functools.cache
def unreachable_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when the server answers."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        text = str(exc).lower()
        if "connection refused" in text or "timeout" in text or "timed out" in text:
            return f"no PostgreSQL server reachable at {ADMIN_URL}: {exc}".splitlines()[0]
        raise
    return None


def require_postgres() -> None:
    reason = unreachable_reason()
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def fresh_schema(prefix: str = "t") -> Iterator[str]:
    """A new empty schema name in database `test` (created lazily by the code under test)."""
    require_postgres()
    schema = f"{prefix}_{uuid.uuid4().hex[:16]}"
    try:
        yield schema
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def schema_url(schema: str) -> str:
    return f"{ADMIN_URL}?schema={schema}"

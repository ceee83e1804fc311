"""PostgreSQL replay store specifics: schemas, fail fast, reconnect, migrations, error mapping."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from pg_support import ADMIN_URL, fresh_schema, schema_url
from store_support import generation, rating

from feedloop.core.errors import StoreFullError, StoreUnavailableError
from feedloop.core.postgres import parse_url, redact
from feedloop.core.store.postgres import PostgresStore, _unavailable
from feedloop.core.store.schema import LATEST_VERSION, POSTGRES_MIGRATIONS


@pytest.mark.postgres
def test_postgres_unreachable_server_fails_fast_with_unavailable() -> None:
    # Port 1 on loopback: nothing listens, so the connection is refused at once.
    with pytest.raises(StoreUnavailableError, match="connecting"):
        PostgresStore("postgresql://postgres@127.0.0.1:1/test?schema=nowhere&connect_timeout=2")


@pytest.mark.postgres
def test_postgres_reconnects_by_itself_after_losing_its_connections() -> None:
    app = f"feedloop-test-{uuid.uuid4().hex[:8]}"
    with fresh_schema("store") as schema:
        store = PostgresStore(f"{schema_url(schema)}&application_name={app}")
        try:
            store.append_generations([generation("g1")])
            with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s",
                    (app,),
                ).fetchall()
                assert killed, "the store held no connection to terminate"
                # pg_terminate_backend only signals: wait until the backends are gone, so the
                # store's next call meets connections already lost (what this test is about)
                # rather than racing a termination in the middle of its transaction.
                deadline = time.monotonic() + 10
                while admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
                ).fetchone()[0]:
                    assert time.monotonic() < deadline, "terminated backends did not exit"
                    time.sleep(0.02)
            assert store.insert_feedback([rating("e1", "g1")]) == [True]
            assert store.counts().feedback == 1
        finally:
            store.close()


@pytest.mark.postgres
def test_postgres_schemas_isolate_stores_in_one_database() -> None:
    with fresh_schema("store") as first, fresh_schema("store") as second:
        a, b = PostgresStore(schema_url(first)), PostgresStore(schema_url(second))
        try:
            a.append_generations([generation("only-in-a")])
            assert b.counts().generations == 0
            assert a.counts().generations == 1
        finally:
            a.close()
            b.close()


@pytest.mark.postgres
def test_postgres_old_schema_is_migrated_in_place() -> None:
    with fresh_schema("store") as schema:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE SCHEMA "{schema}"')
            admin.execute(f'SET search_path TO "{schema}"')
            for statement in POSTGRES_MIGRATIONS[0]:
                admin.execute(statement)
            admin.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            admin.execute("INSERT INTO schema_version VALUES (1)")
        store = PostgresStore(schema_url(schema))
        try:
            assert store.schema_version() == LATEST_VERSION
            store.append_generations([generation("g1")])
            assert store.counts().generations == 1
        finally:
            store.close()
        with psycopg.connect(ADMIN_URL) as admin:
            found = admin.execute(
                "SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
                (schema, "generations_model_version"),
            ).fetchall()
        assert found


@pytest.mark.postgres
def test_postgres_search_path_in_options_also_picks_the_schema() -> None:
    with fresh_schema("store") as schema:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE SCHEMA "{schema}"')  # options= does not create it
        store = PostgresStore(f"{ADMIN_URL}?options=-csearch_path%3D{schema}")
        try:
            store.append_generations([generation("g1")])
        finally:
            store.close()
        with psycopg.connect(ADMIN_URL) as admin:
            rows = admin.execute(f'SELECT generation_id FROM "{schema}".generations').fetchall()
        assert rows == [("g1",)]


def test_postgres_url_parameters_of_ours_are_stripped_and_defaults_added() -> None:
    conninfo, schema = parse_url("postgresql://u:secret@db:5432/app?schema=prod&sslmode=require")
    assert schema == "prod"
    assert "schema=" not in conninfo and "sslmode=require" in conninfo
    assert "connect_timeout=3" in conninfo and "application_name=feedloop" in conninfo
    assert "tcp_user_timeout=10000" in conninfo and "keepalives=1" in conninfo
    conninfo, schema = parse_url("postgresql://db/app?connect_timeout=9&application_name=x")
    assert schema is None and "connect_timeout=9" in conninfo and "application_name=x" in conninfo
    assert redact("postgresql://u:secret@db/app") == "postgresql://u:***@db/app"
    assert redact("postgresql://db/app") == "postgresql://db/app"


def test_postgres_disk_full_maps_to_store_full() -> None:
    assert isinstance(_unavailable("m", psycopg.errors.DiskFull()), StoreFullError)
    other = _unavailable("m", psycopg.OperationalError())
    assert isinstance(other, StoreUnavailableError) and not isinstance(other, StoreFullError)

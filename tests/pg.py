"""Throw-away PostgreSQL databases on the machine's server, for the store's tests.

    pg_db = pg_database_fixture()           # in a test module: a module-scoped fixture
    def test_x(pg_db: str): open_store(pg_db)

    with fresh_database() as url: ...       # one more, dropped on exit

The server is the machine's own (127.0.0.1:5432, user postgres, trust auth; override with
EDGERUN_TEST_PG=postgresql://…/postgres). When none answers the test FAILS saying how to
start it (.ci/run does): a missing database must not pass as a skipped feature.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

ADMIN_URL = os.environ.get("EDGERUN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not answering at {ADMIN_URL} ({str(exc).strip().splitlines()[0]}). "
            "Start it: `pg_ctlcluster <version> main start` or `service postgresql start` "
            "(.ci/run does this), or set EDGERUN_TEST_PG to a server's admin URL.",
            pytrace=False,
        )


def url_for(name: str) -> str:
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.contextmanager
def fresh_database(prefix: str = "edgerun_test") -> Iterator[str]:
    """A new, empty database; its URL. Dropped (connections forced off) on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = _admin()
    try:
        conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    try:
        yield url_for(name)
    finally:
        conn = _admin()
        try:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()


def pg_database_fixture() -> object:
    """A module-scoped fixture (assign it to a name in a test module) yielding a fresh
    database URL."""

    @pytest.fixture(scope="module")
    def _pg_database() -> Iterator[str]:
        with fresh_database() as url:
            yield url

    return _pg_database

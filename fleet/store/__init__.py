"""The console's record: an append-only log of everything it did, and driver leases.

    store = open_store("fleet.db")                      # SQLite file (the default)
    store = open_store("sqlite:///var/lib/fleet.db")    # the same, as a URL
    store = open_store("postgresql://ops@db.lan/fleet") # shared by several consoles

`open_store` applies pending migrations (fleet/store/migrations/) and refuses a database
whose schema is newer than this code. The returned `SqlStore` implements
`fleet.ports.Store`.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from fleet.errors import FleetCode, FleetError
from fleet.store.batch import RecordBatcher
from fleet.store.dialect import Dialect
from fleet.store.migrations import SchemaStatus
from fleet.store.sql_store import SqlStore, TelemetrySample

__all__ = [
    "DEFAULT_DB",
    "RecordBatcher",
    "SchemaStatus",
    "SqlStore",
    "TelemetrySample",
    "open_store",
]

DEFAULT_DB = "fleet.db"


def open_store(
    url: str | os.PathLike[str],
    *,
    migrate: bool = True,
    create: bool | None = None,
    busy_timeout_s: float = 10.0,
    connect_timeout_s: float = 5.0,
) -> SqlStore:
    """A path or `sqlite:///path` → SQLite; `postgresql://…` → PostgreSQL.

    `migrate=False` opens without touching the schema and (unless `create`) without
    creating a missing SQLite file (FleetError console.not_found), for `db status`."""
    make = migrate if create is None else create
    dialect: Dialect
    if isinstance(url, os.PathLike):
        from fleet.store.sqlite import SqliteDialect

        dialect = SqliteDialect(Path(url), busy_timeout_s=busy_timeout_s, create=make)
    else:
        text = str(url).strip()
        scheme = urlsplit(text).scheme.lower() if "://" in text else ""
        if not text:
            raise FleetError(
                FleetCode.CONFIG,
                "the record (--db / db in fleet.toml) is empty: give a SQLite path or a "
                "postgresql://user@host/db URL",
            )
        if scheme in ("postgresql", "postgres"):
            from fleet.store.postgresql import PostgresDialect

            dialect = PostgresDialect(text, connect_timeout_s=connect_timeout_s)
        elif scheme == "sqlite":
            from fleet.store.sqlite import SqliteDialect

            # sqlite:///rel/path and sqlite:////abs/path, as SQLAlchemy spells them.
            path = text.split("://", 1)[1]
            if not path.startswith("/") or path == "/":
                raise FleetError(
                    FleetCode.CONFIG,
                    f"bad SQLite URL {text!r}: write sqlite:///relative/path or "
                    "sqlite:////absolute/path",
                )
            dialect = SqliteDialect(Path(path[1:]), busy_timeout_s=busy_timeout_s, create=make)
        elif scheme:
            raise FleetError(
                FleetCode.CONFIG,
                f"the record {text!r} has an unknown scheme {scheme!r}: give a SQLite path, "
                "sqlite:///path or postgresql://user@host/db",
            )
        else:
            from fleet.store.sqlite import SqliteDialect

            dialect = SqliteDialect(
                Path(text).expanduser(), busy_timeout_s=busy_timeout_s, create=make
            )
    return SqlStore(dialect, migrate=migrate)

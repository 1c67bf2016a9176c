"""Numbered schema migrations, one folder per dialect.

    fleet/store/migrations/sqlite/0001_records_and_leases.sql
    fleet/store/migrations/postgresql/0001_records_and_leases.sql

Both folders hold the same numbers: version N means the same tables on both. All pending
migrations apply in one transaction (all or none), under the dialect's migration lock;
`schema_version` lists what was applied. A database newer than this code is refused:
an older console must not write rows a newer schema would misread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fleet.errors import FleetCode, FleetError
from fleet.store.dialect import Dialect, split_statements

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_BOOTSTRAP = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " applied_at DOUBLE PRECISION NOT NULL)"
)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    current: int  # 0: empty database
    latest: int  # what this code knows
    pending: tuple[str, ...]  # names of the migrations `migrate` would apply

    @property
    def too_new(self) -> bool:
        return self.current > self.latest


def load(dialect: str) -> list[Migration]:
    """The dialect's migrations in order; a gap in the numbers is a packaging bug."""
    folder = resources.files("fleet.store") / "migrations" / dialect
    found: list[Migration] = []
    for entry in folder.iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    if [mig.version for mig in found] != list(range(1, len(found) + 1)):
        raise FleetError(
            FleetCode.STORE,
            f"the {dialect} migrations shipped with edge-fleet are not numbered 1..N "
            f"({[mig.name for mig in found]}): reinstall edgerun",
        )
    return found


def current_version(dialect: Dialect, cur: Any) -> int:
    if not dialect.table_exists(cur, "schema_version"):
        return 0
    cur.execute("SELECT max(version) FROM schema_version")
    row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def status(dialect: Dialect, cur: Any) -> SchemaStatus:
    migrations = load(dialect.name)
    current = current_version(dialect, cur)
    return SchemaStatus(
        current=current,
        latest=len(migrations),
        pending=tuple(mig.name for mig in migrations if mig.version > current),
    )


def too_new(where: str, current: int, latest: int) -> FleetError:
    return FleetError(
        FleetCode.STORE,
        f"the record {where} has schema version {current}, newer than this edge-fleet "
        f"knows (version {latest}): upgrade edgerun on this machine; nothing was written",
        schema_version=current,
        supported_version=latest,
    )


def apply(dialect: Dialect, cur: Any) -> list[str]:
    """Apply what is pending inside the caller's write transaction; the names applied."""
    dialect.lock_migrations(cur)
    cur.execute(_BOOTSTRAP)
    migrations = load(dialect.name)
    current = current_version(dialect, cur)
    if current > len(migrations):
        raise too_new(dialect.where, current, len(migrations))
    applied: list[str] = []
    for mig in migrations:
        if mig.version <= current:
            continue
        for statement in split_statements(mig.sql, dialect.complete):
            cur.execute(statement)
        cur.execute(
            dialect.sql("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)"),
            (mig.version, mig.name, dialect.now(cur)),
        )
        applied.append(mig.name)
    return applied

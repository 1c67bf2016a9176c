"""What differs between SQLite and PostgreSQL, behind one small interface.

The store (fleet/store/sql_store.py) writes its SQL once, with `?` placeholders, and asks
the dialect for the few things that differ: connecting, opening a (write) transaction,
the database's clock, row locks, serialising appends, JSON columns and turning driver
errors into FleetError(console.store) with what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from fleet.errors import FleetError

Cursor = Any  # sqlite3.Cursor | psycopg.Cursor: both have execute/fetchone/fetchall


class Dialect(Protocol):
    name: str  # "sqlite" | "postgresql": also the migrations folder
    where: str  # the database, as the operator should read it (no password)
    for_update: str  # appended to a SELECT that must lock the row it reads
    json_param: str  # placeholder for a JSON column value

    def connect(self) -> None:
        """(Re)connect if there is no usable connection."""
        ...

    def close(self) -> None: ...

    def transaction(self, *, write: bool) -> AbstractContextManager[Cursor]:
        """A transaction; `write` takes the write lock at once (SQLite BEGIN IMMEDIATE),
        so a read-then-write inside it cannot race another writer."""
        ...

    def sql(self, query: str) -> str:
        """`?` placeholders to the driver's own."""
        ...

    def now(self, cur: Cursor) -> float:
        """Unix seconds from the database's clock where it has one."""
        ...

    def lock_migrations(self, cur: Cursor) -> None:
        """Keep two consoles from migrating at once (inside the transaction)."""
        ...

    def lock_appends(self, cur: Cursor) -> float:
        """Make `seq` order the commit order, so a reader tailing `after_seq` never
        misses a row that committed late; the database's time once locked (one round
        trip for both)."""
        ...

    def insert_returning(self, cur: Cursor, query: str, rows: list[tuple[Any, ...]]) -> list[int]:
        """Run an `INSERT … RETURNING <int>` once per row; the values, in order."""
        ...

    def table_exists(self, cur: Cursor, table: str) -> bool: ...

    def encode_json(self, text: str) -> Any: ...

    def decode_json(self, value: Any) -> Any: ...

    def complete(self, text: str) -> bool:
        """Whether `text` ends a statement (for splitting migration scripts)."""
        ...

    def is_error(self, exc: BaseException) -> bool:
        """A driver error (translated by `translate`)."""
        ...

    def translate(self, exc: BaseException, doing: str) -> FleetError: ...


def split_statements(script: str, complete: Callable[[str], bool]) -> Iterator[str]:
    """Statements of a migration file, one at a time (triggers' BEGIN…END included).
    `complete(text)` says whether `text` ends a statement; one that never says so gets
    the whole script at once (PostgreSQL runs a script in one call)."""
    buf: list[str] = []
    for line in script.splitlines(keepends=True):
        buf.append(line)
        text = "".join(buf)
        if complete(text):
            if text.strip():
                yield text
            buf.clear()
    rest = "".join(buf).strip()
    if rest and not all(ln.strip().startswith("--") for ln in rest.splitlines() if ln.strip()):
        yield rest

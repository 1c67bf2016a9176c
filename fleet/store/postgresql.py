"""PostgreSQL (psycopg 3): the record several operators and consoles share.

Times come from the server's clock (`clock_timestamp()`, read after any lock wait), so
consoles with skewed clocks agree on who holds a lease. Appends take a transaction-level
advisory lock so `seq` order is commit order (an identity column alone hands out numbers
at INSERT time, and a reader tailing `after_seq` could skip a row that committed late).
Migrations run under another advisory lock so two consoles starting at once do not race.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fleet.errors import FleetCode, FleetError

# Advisory lock keys (any fixed bigints; "edgerun" in ASCII, then a suffix).
_MIGRATE_LOCK = 0x65646765_72756E01
_APPEND_LOCK = 0x65646765_72756E02


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class PostgresDialect:
    name = "postgresql"
    for_update = " FOR UPDATE"
    json_param = "?::jsonb"

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self.where = safe_url(url)
        self.connect_timeout_s = connect_timeout_s
        self._conn: Any = None
        try:
            import psycopg
        except ImportError:
            raise FleetError(
                FleetCode.STORE,
                "a PostgreSQL record needs the console's extra: pip install 'edgerun[fleet]'",
            ) from None
        self._psycopg = psycopg

    def connect(self) -> None:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return
        self.close()
        try:
            self._conn = self._psycopg.connect(
                self.url,
                autocommit=True,  # transactions are explicit (conn.transaction())
                connect_timeout=max(1, round(self.connect_timeout_s)),
                application_name="edge-fleet",
            )
        except self._psycopg.Error as exc:
            raise self.translate(exc, "connecting", connecting=True) from exc

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[Any]:
        self.connect()
        conn = self._conn
        with conn.transaction(), conn.cursor() as cur:
            yield cur

    def sql(self, query: str) -> str:
        return query.replace("?", "%s")

    def now(self, cur: Any) -> float:
        cur.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
        return float(cur.fetchone()[0])

    def lock_migrations(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))

    def lock_appends(self, cur: Any) -> float:
        # The lock first (in the select list's order), then the clock after any wait.
        cur.execute(
            "SELECT pg_advisory_xact_lock(%s), extract(epoch FROM clock_timestamp())::float8",
            (_APPEND_LOCK,),
        )
        return float(cur.fetchone()[1])

    def insert_returning(self, cur: Any, query: str, rows: list[tuple[Any, ...]]) -> list[int]:
        # One pipelined round trip for the whole batch instead of one per row.
        cur.executemany(query, rows, returning=True)
        out = []
        while True:
            out.append(int(cur.fetchone()[0]))
            if not cur.nextset():
                break
        return out

    def table_exists(self, cur: Any, table: str) -> bool:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        return bool(cur.fetchone()[0])

    def encode_json(self, text: str) -> Any:
        return text  # cast by `%s::jsonb`

    def decode_json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value

    def complete(self, text: str) -> bool:
        # PostgreSQL takes a whole script in one simple-protocol execute.
        return False

    def is_error(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.Error)

    def translate(self, exc: BaseException, doing: str, *, connecting: bool = False) -> FleetError:
        msg = str(exc).strip()
        first = msg.splitlines()[0] if msg else type(exc).__name__
        low = msg.lower()
        where = self.where
        if "password authentication failed" in low or "no password supplied" in low:
            text = (
                f"PostgreSQL at {where} refused the login ({first}): check the user and "
                "password in the URL (or ~/.pgpass)"
            )
        elif "role" in low and "does not exist" in low:
            text = f"PostgreSQL at {where}: {first}; create that role or use another user"
        elif "database" in low and "does not exist" in low:
            db = urlsplit(self.url).path.lstrip("/") or "<name>"
            text = f"PostgreSQL at {where}: {first}; create it first (createdb {db})"
        elif "pg_hba.conf" in low:
            text = f"PostgreSQL at {where} refused this client ({first}): allow it in pg_hba.conf"
        elif connecting:
            text = (
                f"cannot reach PostgreSQL at {where} ({first}): is the server running and "
                "are the host and port right?"
            )
        elif isinstance(exc, self._psycopg.OperationalError) or "connection" in low:
            text = (
                f"lost the connection to PostgreSQL at {where} while {doing} ({first}): "
                "a transaction commits whole or not at all; retry"
            )
            # Reads and lease calls are safe to repeat: the store retries them once.
            return FleetError(
                FleetCode.STORE, text, store="postgresql", url=where, lost_connection=True
            )
        elif "permission denied" in low:
            text = (
                f"PostgreSQL at {where} refused {doing} ({first}): grant this user rights "
                "on the record's tables"
            )
        else:
            text = f"PostgreSQL at {where} failed while {doing}: {first}"
        return FleetError(FleetCode.STORE, text, store="postgresql", url=where)

"""SQLite: the default record, a local file (stdlib sqlite3).

WAL so readers (`history`, a second console's view) never block the driver's appends;
a busy timeout so two consoles writing at once wait instead of failing; synchronous=FULL
because the record is evidence and appends are few and small. One connection per store,
guarded by the store's lock. The clock is this machine's: a SQLite file is only ever
shared by consoles on one machine (not over NFS, where its locks do not hold).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleet.errors import FleetCode, FleetError


class SqliteDialect:
    name = "sqlite"
    for_update = ""  # BEGIN IMMEDIATE already holds the whole file's write lock
    json_param = "?"

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0, create: bool = True) -> None:
        self.path = path
        self.where = str(path)
        self.busy_timeout_s = busy_timeout_s
        self.create = create  # False: a missing file is not made (`db status`)
        self._conn: sqlite3.Connection | None = None

    def connect(self) -> None:
        if self._conn is not None:
            return
        if self.path.is_dir():
            raise FleetError(
                FleetCode.STORE,
                f"the record {self.where} is a folder: give a file path such as "
                f"{self.where.rstrip('/')}/fleet.db",
            )
        if not self.create and not self.path.exists():
            raise FleetError(
                FleetCode.NOT_FOUND,
                f"there is no record at {self.where} yet: the first command that records "
                "anything creates it (or run `edge-fleet db migrate`)",
                path=self.where,
            )
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_s,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # the store's lock serialises use
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Schema check, WAL and durability, retried while another process holds the file.

        SQLite answers some lock conflicts at once instead of calling the busy handler:
        switching a new file to WAL (it needs the file to itself) and opening a WAL file
        while another connection recovers or checkpoints it (SQLITE_BUSY_RECOVERY /
        SQLITE_BUSY_SNAPSHOT). Consoles started together hit exactly that.
        """

        def prepare() -> object:
            # Reading the schema first makes a corrupt or foreign file fail here.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            return conn.execute("PRAGMA synchronous = FULL")

        self._while_busy(prepare)

    def _while_busy(self, step: Callable[[], object]) -> None:
        """Run `step`, again while SQLite answers "locked"/"busy" at once, for the same
        busy_timeout_s that the busy handler gives an ordinary wait for the write lock."""
        deadline = time.monotonic() + self.busy_timeout_s
        pause = 0.005
        while True:
            try:
                step()
                return
            except sqlite3.OperationalError as exc:
                low = str(exc).lower()
                if ("locked" not in low and "busy" not in low) or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[sqlite3.Cursor]:
        self.connect()
        assert self._conn is not None
        cur = self._conn.cursor()
        try:
            # Another connection recovering or checkpointing the WAL as it opens or
            # closes is answered at once, not by the busy handler: retried.
            self._while_busy(lambda: cur.execute("BEGIN IMMEDIATE" if write else "BEGIN"))
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            # Also when COMMIT itself failed (busy, disk full): never leave the
            # connection inside a transaction the next BEGIN would trip over.
            if self._conn.in_transaction:
                self._conn.rollback()
            raise
        finally:
            cur.close()

    def sql(self, query: str) -> str:
        return query

    def now(self, cur: Any) -> float:
        return time.time()

    def lock_migrations(self, cur: Any) -> None:
        pass  # BEGIN IMMEDIATE: one writer at a time

    def lock_appends(self, cur: Any) -> float:
        # BEGIN IMMEDIATE: one writer at a time, so seq order is commit order already.
        return time.time()

    def insert_returning(self, cur: Any, query: str, rows: list[tuple[Any, ...]]) -> list[int]:
        # sqlite3's executemany cannot return rows; in-process calls are cheap anyway.
        out = []
        for row in rows:
            cur.execute(query, row)
            out.append(int(cur.fetchone()[0]))
        return out

    def table_exists(self, cur: Any, table: str) -> bool:
        row = cur.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        return row is not None

    def encode_json(self, text: str) -> Any:
        return text

    def decode_json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    def complete(self, text: str) -> bool:
        return sqlite3.complete_statement(text)

    def is_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error)

    def translate(self, exc: BaseException, doing: str) -> FleetError:
        msg = str(exc)
        low = msg.lower()
        where = self.where
        if "locked" in low or "busy" in low:
            text = (
                f"the record {where} stayed locked by another process for more than "
                f"{self.busy_timeout_s:g} s while {doing}: is another edge-fleet stuck on it? "
                "Retry, or stop that process"
            )
        elif "readonly" in low or "read-only" in low:
            text = (
                f"the record {where} is read-only ({msg}) while {doing}: make the file and "
                "its folder writable (SQLite writes -wal/-shm files beside it), or point "
                "--db at a writable place"
            )
        elif "unable to open" in low:
            text = (
                f"cannot open the record {where} while {doing}: does its folder exist and "
                "may this user write there?"
            )
        elif "not a database" in low or "malformed" in low or "corrupt" in low:
            text = (
                f"the record {where} is not a SQLite database or is corrupt ({msg}): nothing "
                "was changed; restore it from a backup or point --db at another file"
            )
        elif "disk" in low and ("full" in low or "i/o" in low):
            text = f"the record {where} could not be written ({msg}) while {doing}: check the disk"
        else:
            text = f"the record {where} failed while {doing}: {msg}"
        return FleetError(FleetCode.STORE, text, store="sqlite", path=where)

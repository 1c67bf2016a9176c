"""Store-and-forward queue for telemetry and events: SQLite in WAL mode, on disk.

A message is committed here (with its per-stream sequence number) before anything
tries to send it, and deleted only once the broker acknowledged it (QoS 1 PUBACK),
so a broker outage, a restart or a kill -9 loses nothing. Rows leave in id order.

The queue is bounded by bytes and by age. When it must drop, it drops the oldest
telemetry first and events only when no telemetry is left, and it keeps count of
what it dropped so the link can say so in an `outbox.dropped` event.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["telemetry", "event"]
KINDS: tuple[Kind, ...] = ("telemetry", "event")  # drop order: telemetry first

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_kind ON messages (kind, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Rows cost a little more than their payload on disk; counted for the byte bound.
ROW_OVERHEAD = 64


class OutboxError(Exception):
    """The outbox cannot be opened or written (disk full, unreadable file...)."""


@dataclass(frozen=True)
class Row:
    id: int
    kind: Kind
    seq: int
    topic: str
    payload: bytes
    created: float


@dataclass(frozen=True)
class Depth:
    messages: int
    bytes: int
    oldest_age_s: float | None


class Outbox:
    """Thread-safe; one instance per state directory."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        max_age_s: float,
        synchronous: Literal["full", "normal"] = "full",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self.recovered_from: Path | None = None
        try:
            self._db = self._open(synchronous)
        except sqlite3.DatabaseError as exc:
            # A file that is not a database (or is damaged beyond SQLite's recovery)
            # must not stop the agent: keep it aside for inspection, start afresh.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("outbox %s is unreadable (%s); moved aside to %s", self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    os.replace(src, Path(f"{aside}{suffix}"))
            self.recovered_from = aside
            try:
                self._db = self._open(synchronous)
            except sqlite3.Error as again:
                raise OutboxError(f"cannot create outbox {self.path}: {again}") from again
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc
        self._bytes = self._scalar("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM messages") + (
            ROW_OVERHEAD * self._scalar("SELECT COUNT(*) FROM messages")
        )
        self._count = self._scalar("SELECT COUNT(*) FROM messages")

    def _open(self, synchronous: str) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            db.executescript(_SCHEMA)
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _scalar(self, sql: str, *args: object) -> int:
        row = self._db.execute(sql, args).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    # ----------------------------------------------------------------- writing

    def put(self, kind: Kind, topic: str, build: Callable[[int], bytes]) -> int:
        """Assign the next sequence number of `kind`, store `build(seq)`; return seq.

        Sequence number and row are committed together: no number is used twice or
        skipped, whatever instant the process dies at.
        """
        with self._lock, self._transaction("write to"):
            seq = self._meta(f"seq.{kind}") + 1
            payload = build(seq)
            created = self._clock()
            self._db.execute(
                "INSERT INTO messages (kind, seq, topic, payload, created) VALUES (?, ?, ?, ?, ?)",
                (kind, seq, topic, payload, created),
            )
            self._set_meta(f"seq.{kind}", seq)
            self._bytes += len(payload) + ROW_OVERHEAD
            self._count += 1
            self._enforce(created)
        return seq

    @contextlib.contextmanager
    def _transaction(self, action: str) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; on any failure roll back, resync the counters
        from the table, and turn sqlite errors into OutboxError."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._recount()
                raise
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot {action} outbox {self.path}: {exc}") from exc

    def _meta(self, key: str) -> int:
        return self._scalar("SELECT value FROM meta WHERE key = ?", key)

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _recount(self) -> None:
        self._count = self._scalar("SELECT COUNT(*) FROM messages")
        self._bytes = (
            self._scalar("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM messages")
            + ROW_OVERHEAD * self._count
        )

    def _drop(self, kind: Kind, cause: str, where: str, args: tuple[object, ...]) -> int:
        rows = self._db.execute(
            f"DELETE FROM messages WHERE kind = ? AND {where} RETURNING LENGTH(payload)",
            (kind, *args),
        ).fetchall()
        if rows:
            self._count -= len(rows)
            self._bytes -= sum(int(r[0]) + ROW_OVERHEAD for r in rows)
            key = f"dropped.{cause}.{kind}"
            self._set_meta(key, self._meta(key) + len(rows))
            self._set_meta(f"dropped.total.{kind}", self._meta(f"dropped.total.{kind}") + len(rows))
        return len(rows)

    def _enforce(self, now: float) -> None:
        """Apply the age bound, then the byte bound; inside the caller's transaction."""
        cutoff = now - self.max_age_s
        for kind in KINDS:
            self._drop(kind, "age", "created < ?", (cutoff,))
        for kind in KINDS:
            while self._bytes > self.max_bytes:
                # Drop in chunks: a few rows per loop keeps a full outbox cheap to trim.
                excess = self._bytes - self.max_bytes
                ids = self._db.execute(
                    "SELECT id, LENGTH(payload) FROM messages WHERE kind = ? ORDER BY id LIMIT 256",
                    (kind,),
                ).fetchall()
                if not ids:
                    break
                chosen: list[int] = []
                freed = 0
                for row_id, size in ids:
                    chosen.append(int(row_id))
                    freed += int(size) + ROW_OVERHEAD
                    if freed >= excess:
                        break
                self._drop(kind, "size", "id <= ?", (chosen[-1],))

    def prune(self) -> None:
        """Apply the age bound now (the sender calls this now and then)."""
        with self._lock, self._transaction("prune"):
            self._enforce(self._clock())

    # ----------------------------------------------------------------- reading

    def pending(self, after_id: int = 0, limit: int = 100) -> list[Row]:
        """The oldest rows with id > `after_id`, in order."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, kind, seq, topic, payload, created FROM messages "
                    "WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read outbox {self.path}: {exc}") from exc
        return [Row(int(r[0]), r[1], int(r[2]), r[3], bytes(r[4]), float(r[5])) for r in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged rows (one transaction for the lot); returns how many."""
        batch = [(i,) for i in ids]
        if not batch:
            return 0
        with self._lock:
            with self._transaction("delete from"):
                before = self._db.total_changes
                freed = 0
                for (row_id,) in batch:
                    row = self._db.execute(
                        "DELETE FROM messages WHERE id = ? RETURNING LENGTH(payload)",
                        (row_id,),
                    ).fetchone()
                    if row is not None:
                        freed += int(row[0]) + ROW_OVERHEAD
                deleted = self._db.total_changes - before
            self._count -= deleted
            self._bytes -= freed
            return deleted

    def depth(self) -> Depth:
        with self._lock:
            oldest = self._db.execute("SELECT MIN(created) FROM messages").fetchone()
            age = None if oldest is None or oldest[0] is None else self._clock() - oldest[0]
            return Depth(self._count, self._bytes, None if age is None else round(age, 3))

    def last_seq(self, kind: Kind) -> int:
        with self._lock:
            return self._meta(f"seq.{kind}")

    def dropped_total(self) -> dict[str, int]:
        with self._lock:
            return {kind: self._meta(f"dropped.total.{kind}") for kind in KINDS}

    def take_dropped(self) -> dict[str, int]:
        """Drops not reported yet, as {"size.telemetry": n, ...}; resets them to zero."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value FROM meta WHERE key LIKE 'dropped.%' "
                "AND key NOT LIKE 'dropped.total.%' AND value > 0"
            ).fetchall()
            if not rows:
                return {}
            self._db.execute(
                "UPDATE meta SET value = 0 WHERE key LIKE 'dropped.%' "
                "AND key NOT LIKE 'dropped.total.%'"
            )
        return {str(k).removeprefix("dropped."): int(v) for k, v in rows}

    def count_dropped(self, cause: str, kind: Kind, n: int) -> None:
        """Record rows lost for a reason outside the bounds (e.g. the broker refused them)."""
        with self._lock:
            key = f"dropped.{cause}.{kind}"
            self._set_meta(key, self._meta(key) + n)
            self._set_meta(f"dropped.total.{kind}", self._meta(f"dropped.total.{kind}") + n)

    def close(self) -> None:
        with self._lock:
            self._db.close()

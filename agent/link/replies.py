"""Replies kept on disk by command id: a repeated id gets its first reply again,
also after a restart. Bounded by count and age; lives beside the outbox."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class ReplyCache:
    def __init__(
        self,
        path: Path,
        max_entries: int,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Survives process crashes; a power cut may forget the newest replies, and then a
        # retransmitted command runs again. No fsync keeps command replies fast.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies "
            "(id TEXT PRIMARY KEY, body BLOB NOT NULL, created REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS replies_created ON replies (created)")

    def get(self, command_id: str) -> bytes | None:
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT body, created FROM replies WHERE id = ?", (command_id,)
                ).fetchone()
            except sqlite3.Error as exc:
                log.error("cannot read the reply cache: %s", exc)
                return None
        if row is None or row[1] < self._clock() - self.max_age_s:
            return None
        return bytes(row[0])

    def put(self, command_id: str, body: bytes) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO replies (id, body, created) VALUES (?, ?, ?)",
                    (command_id, body, self._clock()),
                )
                self._trim()
            except sqlite3.Error as exc:
                # Losing idempotency for one command is better than failing it.
                log.error("cannot store the reply to %r: %s", command_id, exc)

    def _trim(self) -> None:
        self._db.execute("DELETE FROM replies WHERE created < ?", (self._clock() - self.max_age_s,))
        self._db.execute(
            "DELETE FROM replies WHERE id IN "
            "(SELECT id FROM replies ORDER BY created DESC LIMIT -1 OFFSET ?)",
            (self.max_entries,),
        )

    def __len__(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM replies").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

"""Command ids remembered on disk, with a digest of the command and its first reply.

A repeated id with the same body gets its first reply again, also after a restart; the
same id on a different body is told apart by the digest. An id is remembered at least
until its command expires (`keep_until`), so a captured command cannot run again
while it is still valid: the count bound (`max_entries`) only drops the stored reply
bodies of newer entries, never an unexpired id. At most `max_ids` unexpired ids are
kept; past that the dispatcher refuses new commands instead of forgetting one.
Lives beside the outbox.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Unexpired ids kept at most (a row is ~100 bytes without its reply body).
MAX_IDS = 100_000
# A digest of rows carried over from the cache before digests existed: matches any body.
LEGACY_DIGEST = ""


@dataclass(frozen=True)
class Remembered:
    digest: str
    body: bytes | None  # None: ran, but the reply is no longer kept


class ReplyCache:
    def __init__(
        self,
        path: Path,
        max_entries: int,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
        max_ids: int = MAX_IDS,
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.max_ids = max(max_ids, max_entries)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Survives process crashes; a power cut may forget the newest replies, and then a
        # retransmitted command runs again. No fsync keeps command replies fast.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS command_ids (id TEXT PRIMARY KEY, digest TEXT NOT NULL, "
            "body BLOB, created REAL NOT NULL, keep_until REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS command_ids_created ON command_ids (created)")
        self._db.execute("CREATE INDEX IF NOT EXISTS command_ids_keep ON command_ids (keep_until)")
        self._migrate()

    def _migrate(self) -> None:
        """Replies of the old `replies` table keep answering their ids."""
        old = self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'replies'"
        ).fetchone()
        if old is None:
            return
        self._db.execute(
            "INSERT OR IGNORE INTO command_ids (id, digest, body, created, keep_until) "
            "SELECT id, ?, body, created, created FROM replies",
            (LEGACY_DIGEST,),
        )
        self._db.execute("DROP TABLE replies")

    def get(self, command_id: str) -> Remembered | None:
        now = self._clock()
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT digest, body, created, keep_until FROM command_ids WHERE id = ?",
                    (command_id,),
                ).fetchone()
            except sqlite3.Error as exc:
                log.error("cannot read the reply cache: %s", exc)
                return None
        if row is None:
            return None
        digest, body, created, keep_until = row
        if created < now - self.max_age_s and keep_until < now:
            return None
        return Remembered(str(digest), None if body is None else bytes(body))

    def full(self) -> bool:
        """True when `max_ids` unexpired ids are kept: no new command may run now."""
        now = self._clock()
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT COUNT(*) FROM command_ids WHERE keep_until >= ?", (now,)
                ).fetchone()
            except sqlite3.Error as exc:
                log.error("cannot read the reply cache: %s", exc)
                return False
        return int(row[0]) >= self.max_ids

    def put(self, command_id: str, digest: str, body: bytes, keep_until: float = 0.0) -> None:
        now = self._clock()
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO command_ids (id, digest, body, created, keep_until) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (command_id, digest, body, now, keep_until),
                )
                self._trim(now)
            except sqlite3.Error as exc:
                # Losing idempotency for one command is better than failing it.
                log.error("cannot store the reply to %r: %s", command_id, exc)

    def _trim(self, now: float) -> None:
        self._db.execute(
            "DELETE FROM command_ids WHERE created < ? AND keep_until < ?",
            (now - self.max_age_s, now),
        )
        # Beyond the newest `max_entries`: expired ids go, unexpired ones lose their body.
        self._db.execute(
            "DELETE FROM command_ids WHERE keep_until < ? AND id IN "
            "(SELECT id FROM command_ids ORDER BY created DESC LIMIT -1 OFFSET ?)",
            (now, self.max_entries),
        )
        self._db.execute(
            "UPDATE command_ids SET body = NULL WHERE body IS NOT NULL AND id IN "
            "(SELECT id FROM command_ids ORDER BY created DESC LIMIT -1 OFFSET ?)",
            (self.max_entries,),
        )

    def __len__(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM command_ids").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

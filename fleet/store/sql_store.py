"""SqlStore: fleet.ports.Store on SQLite or PostgreSQL, with the same SQL on both.

The store owns its one connection (behind a lock, so threads may share it); every
driver error leaves as FleetError(console.store) saying what to do. Leases are fencing
leases: one row per name whose token grows with every new holder, checked inside the
same transaction as an append made under it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from fleet.errors import FleetCode, FleetError
from fleet.ports import Lease, NewRecord, Record, RecordKind, Store
from fleet.store import migrations
from fleet.store.dialect import Cursor, Dialect

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def _retry_once_on_lost_connection(fn: Callable[P, T]) -> Callable[P, T]:
    """For calls that are safe to repeat (reads, lease calls: re-acquiring or renewing
    as the same holder is idempotent): a dropped server connection (a restart, a
    failover) is retried once on a new one. Appends are not repeated: the caller
    decides, since a commit whose answer was lost may have happened."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except FleetError as exc:
            if not exc.details.get("lost_connection"):
                raise
            log.warning("%s; reconnecting once", exc.message)
            return fn(*args, **kwargs)

    return call


_COLUMNS = "seq, ts, key_id, operator, kind, rollout_id, device_id, result, data"


@dataclass(frozen=True, slots=True)
class TelemetrySample:
    """One device's telemetry interval, kept a bounded time for the dashboard."""

    device_id: str
    ts: float  # Unix seconds (the device's clock)
    p95_ms: float | None = None
    rate_per_s: float | None = None
    error_rate: float | None = None
    rss_mb: float | None = None
    temperature_c: float | None = None


_TELEMETRY = "device_id, ts, p95_ms, rate_per_s, error_rate, rss_mb, temperature_c"


def _kind(value: str) -> RecordKind:
    try:
        return RecordKind(value)
    except ValueError:
        # A newer console's kind: keep the text rather than fail the whole read.
        return value  # type: ignore[return-value]


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


class SqlStore:
    def __init__(self, dialect: Dialect, *, migrate: bool = True) -> None:
        self._dialect = dialect
        self._lock = threading.RLock()
        self._closed = False
        self._insert = dialect.sql(
            "INSERT INTO records (ts, key_id, operator, kind, rollout_id, device_id, result, data)"
            f" VALUES (?, ?, ?, ?, ?, ?, ?, {dialect.json_param}) RETURNING seq"
        )
        try:
            with self._tx("opening it", write=migrate) as cur:
                if migrate:
                    applied = migrations.apply(dialect, cur)
                    if applied:
                        log.info("record %s: applied %s", dialect.where, ", ".join(applied))
        except BaseException:
            self._close_quietly()
            raise

    # ------------------------------------------------------------------ plumbing

    @property
    def dialect(self) -> str:
        return self._dialect.name

    @property
    def where(self) -> str:
        """The database as an operator reads it (path, or URL without password)."""
        return self._dialect.where

    @contextmanager
    def _tx(self, doing: str, *, write: bool) -> Iterator[Cursor]:
        with self._lock:
            if self._closed:
                raise FleetError(FleetCode.STORE, f"the record {self.where} is closed")
            try:
                with self._dialect.transaction(write=write) as cur:
                    yield cur
            except FleetError:
                raise
            except Exception as exc:
                if self._dialect.is_error(exc):
                    raise self._dialect.translate(exc, doing) from exc
                raise

    def _q(self, query: str) -> str:
        return self._dialect.sql(query)

    def _close_quietly(self) -> None:
        try:
            self._dialect.close()
        except Exception:
            log.debug("closing %s failed", self.where, exc_info=True)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close_quietly()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- migrations

    @_retry_once_on_lost_connection
    def schema(self) -> migrations.SchemaStatus:
        with self._tx("reading its schema version", write=False) as cur:
            return migrations.status(self._dialect, cur)

    def migrate(self) -> list[str]:
        """Apply pending migrations; the names applied (empty when up to date)."""
        with self._tx("migrating it", write=True) as cur:
            return migrations.apply(self._dialect, cur)

    # ------------------------------------------------------------------- records

    def append(
        self, entries: Sequence[NewRecord], *, who: tuple[str, str], lease: Lease | None = None
    ) -> list[Record]:
        key_id, operator = who
        rows = [(entry, self._encode(entry)) for entry in entries]
        if not rows:
            return []
        with self._tx("appending to it", write=True) as cur:
            if lease is not None:
                self._check_lease(cur, lease)
            ts = self._dialect.lock_appends(cur)
            seqs = self._dialect.insert_returning(
                cur,
                self._insert,
                [
                    (
                        ts,
                        key_id,
                        operator,
                        str(entry.kind),
                        entry.rollout_id,
                        entry.device_id,
                        entry.result,
                        self._dialect.encode_json(data),
                    )
                    for entry, data in rows
                ],
            )
            out = [
                Record(
                    seq=seq,
                    ts=ts,
                    key_id=key_id,
                    operator=operator,
                    kind=entry.kind,
                    data=json.loads(data),
                    rollout_id=entry.rollout_id,
                    device_id=entry.device_id,
                    result=entry.result,
                )
                for seq, (entry, data) in zip(seqs, rows, strict=True)
            ]
            return out

    @staticmethod
    def _encode(entry: NewRecord) -> str:
        try:
            try:
                return json.dumps(dict(entry.data), allow_nan=False, separators=(",", ":"))
            except ValueError:
                # NaN/inf (a gate figure over no samples) is not JSON: keep it as the
                # string float() reads back rather than lose the record or the figure.
                return json.dumps(_finite_json(dict(entry.data)), separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            # A programming error upstream, but it must not lose the rest silently.
            raise FleetError(
                FleetCode.STORE,
                f"a {entry.kind} record's data is not plain JSON ({exc}); nothing was appended",
            ) from exc

    @_retry_once_on_lost_connection
    def records(
        self,
        *,
        rollout_id: str | None = None,
        device_id: str | None = None,
        kinds: Iterable[RecordKind] | None = None,
        after_seq: int = 0,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[Record]:
        """Matching records in `seq` order (`newest_first`: the latest `limit` of them,
        newest first, for `history`)."""
        where = ["seq > ?"]
        params: list[Any] = [after_seq]
        if rollout_id is not None:
            where.append("rollout_id = ?")
            params.append(rollout_id)
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if kinds is not None:
            wanted = [str(k) for k in kinds]
            if not wanted:
                return []
            where.append(f"kind IN ({', '.join('?' for _ in wanted)})")
            params.extend(wanted)
        query = f"SELECT {_COLUMNS} FROM records WHERE {' AND '.join(where)}"
        query += " ORDER BY seq DESC" if newest_first else " ORDER BY seq"
        if limit is not None:
            query += " LIMIT ?"
            params.append(max(0, int(limit)))
        with self._tx("reading it", write=False) as cur:
            cur.execute(self._q(query), params)
            found = cur.fetchall()
        return [self._record(row) for row in found]

    def _record(self, row: Sequence[Any]) -> Record:
        seq, ts, key_id, operator, kind, rollout_id, device_id, result, data = row
        return Record(
            seq=int(seq),
            ts=float(ts),
            key_id=key_id,
            operator=operator,
            kind=_kind(kind),
            data=self._dialect.decode_json(data),
            rollout_id=rollout_id,
            device_id=device_id,
            result=result,
        )

    @_retry_once_on_lost_connection
    def rollout_ids(self, limit: int = 100) -> list[str]:
        query = (
            "SELECT rollout_id FROM records WHERE rollout_id IS NOT NULL"
            " GROUP BY rollout_id ORDER BY min(seq) DESC LIMIT ?"
        )
        with self._tx("listing rollouts", write=False) as cur:
            cur.execute(self._q(query), (max(0, int(limit)),))
            return [row[0] for row in cur.fetchall()]

    # -------------------------------------------------------------------- leases

    def _lease_row(self, cur: Cursor, name: str) -> tuple[str, int, float] | None:
        cur.execute(
            self._q(
                f"SELECT holder, token, expires_at FROM leases WHERE name = ?{self._dialect.for_update}"
            ),
            (name,),
        )
        row = cur.fetchone()
        return None if row is None else (str(row[0]), int(row[1]), float(row[2]))

    def _check_lease(self, cur: Cursor, lease: Lease) -> None:
        """Inside an append's transaction: the lease must be current. Its row stays
        locked until commit, so nobody can take it between this check and the append."""
        row = self._lease_row(cur, lease.name)
        now = self._dialect.now(cur)
        if row is not None:
            holder, token, expires_at = row
            if holder == lease.holder and token == lease.token and expires_at > now:
                return
        raise self._lost(lease, row, now)

    def _lost(self, lease: Lease, row: tuple[str, int, float] | None, now: float) -> FleetError:
        if row is None or not row[0]:
            state = "nobody holds it now"
        elif row[0] == lease.holder and row[1] == lease.token:
            state = f"it expired {now - row[2]:.1f} s ago"
        else:
            state = f"{row[0]} holds it now (token {row[1]})"
        return FleetError(
            FleetCode.LEASE,
            f"lease {lease.name!r} (token {lease.token}) is no longer held by {lease.holder}: "
            f"{state}; nothing was written — stop, and let the current holder drive",
            lease=lease.name,
            holder=row[0] if row else None,
            token=row[1] if row else None,
        )

    @staticmethod
    def _ttl(ttl_s: float) -> float:
        if not (isinstance(ttl_s, int | float) and math.isfinite(ttl_s) and ttl_s > 0):
            raise FleetError(
                FleetCode.BAD_INPUT, f"a lease's time to live must be > 0 s, not {ttl_s!r}"
            )
        return float(ttl_s)

    @_retry_once_on_lost_connection
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        ttl = self._ttl(ttl_s)
        if not name or not holder:
            raise FleetError(FleetCode.BAD_INPUT, "a lease needs a name and a holder")
        with self._tx(f"taking lease {name!r}", write=True) as cur:
            cur.execute(
                self._q(
                    "INSERT INTO leases (name, holder, token, expires_at) VALUES (?, '', 0, 0)"
                    " ON CONFLICT (name) DO NOTHING"
                ),
                (name,),
            )
            row = self._lease_row(cur, name)
            assert row is not None
            current, token, expires_at = row
            now = self._dialect.now(cur)
            if current and current != holder and expires_at > now:
                return None
            # A new holder (or one coming back after a release) gets a new token, which
            # fences off whatever the previous holder still has in flight.
            if current != holder:
                token += 1
            cur.execute(
                self._q("UPDATE leases SET holder = ?, token = ?, expires_at = ? WHERE name = ?"),
                (holder, token, now + ttl, name),
            )
            return Lease(name=name, holder=holder, token=token, expires_at=now + ttl)

    @_retry_once_on_lost_connection
    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease:
        ttl = self._ttl(ttl_s)
        with self._tx(f"renewing lease {lease.name!r}", write=True) as cur:
            row = self._lease_row(cur, lease.name)
            now = self._dialect.now(cur)
            # Expired but untaken is still ours: anyone taking it would have bumped the
            # token, so renewing cannot overlap another holder.
            if row is None or row[0] != lease.holder or row[1] != lease.token:
                raise self._lost(lease, row, now)
            cur.execute(
                self._q("UPDATE leases SET expires_at = ? WHERE name = ?"),
                (now + ttl, lease.name),
            )
            return Lease(lease.name, lease.holder, lease.token, now + ttl)

    @_retry_once_on_lost_connection
    def release_lease(self, lease: Lease) -> None:
        # The row stays (holder '' = free) so the next holder's token is higher still.
        with self._tx(f"releasing lease {lease.name!r}", write=True) as cur:
            cur.execute(
                self._q(
                    "UPDATE leases SET holder = '', expires_at = 0"
                    " WHERE name = ? AND holder = ? AND token = ?"
                ),
                (lease.name, lease.holder, lease.token),
            )

    @_retry_once_on_lost_connection
    def lease(self, name: str) -> Lease | None:
        """The current (unexpired, by the database's clock) holder, or None."""
        with self._tx(f"reading lease {name!r}", write=False) as cur:
            row = self._lease_row_plain(cur, name)
            now = self._dialect.now(cur)
        if row is None or not row[0] or row[2] <= now:
            return None
        return Lease(name=name, holder=row[0], token=row[1], expires_at=row[2])

    def _lease_row_plain(self, cur: Cursor, name: str) -> tuple[str, int, float] | None:
        cur.execute(self._q("SELECT holder, token, expires_at FROM leases WHERE name = ?"), (name,))
        row = cur.fetchone()
        return None if row is None else (str(row[0]), int(row[1]), float(row[2]))

    # ----------------------------------------------------------------- telemetry

    def add_telemetry(self, samples: Iterable[TelemetrySample]) -> int:
        """Keep these samples (non-finite figures become NULL); how many were added."""
        rows = [
            (
                s.device_id,
                float(s.ts),
                _finite(s.p95_ms),
                _finite(s.rate_per_s),
                _finite(s.error_rate),
                _finite(s.rss_mb),
                _finite(s.temperature_c),
            )
            for s in samples
        ]
        if not rows:
            return 0
        with self._tx("adding telemetry", write=True) as cur:
            cur.executemany(
                self._q(f"INSERT INTO telemetry ({_TELEMETRY}) VALUES (?, ?, ?, ?, ?, ?, ?)"), rows
            )
        return len(rows)

    @_retry_once_on_lost_connection
    def telemetry(
        self, *, device_id: str | None = None, since: float | None = None, limit: int | None = None
    ) -> list[TelemetrySample]:
        """Samples in time order (oldest first)."""
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if since is not None:
            where.append("ts >= ?")
            params.append(float(since))
        query = f"SELECT {_TELEMETRY} FROM telemetry WHERE {' AND '.join(where)} ORDER BY ts"
        if limit is not None:
            query += " LIMIT ?"
            params.append(max(0, int(limit)))
        with self._tx("reading telemetry", write=False) as cur:
            cur.execute(self._q(query), params)
            found = cur.fetchall()
        return [TelemetrySample(*row) for row in found]

    @_retry_once_on_lost_connection
    def prune(self, older_than: float) -> int:
        """Drop telemetry with ts < older_than; how many rows went."""
        with self._tx("pruning telemetry", write=True) as cur:
            cur.execute(self._q("DELETE FROM telemetry WHERE ts < ?"), (float(older_than),))
            return int(cur.rowcount or 0)


def _implements_the_seam(store: SqlStore) -> Store:
    # mypy checks here that SqlStore still satisfies fleet.ports.Store.
    return store

"""The console's record: what appends, reads and leases cost on SQLite and PostgreSQL.

    python bench/store.py [--pg postgresql://postgres@127.0.0.1:5432/postgres] [--n 2000]

Prints medians (and p90) per operation for each dialect:
  append x1     one record per transaction (what a driver does per device event)
  append x100   100 records in one transaction, per record
  batcher       1,000 records through RecordBatcher (add + flush), per record
  read          one rollout's records (`records(rollout_id=…)`), n * 10 rows in the table
  history       the latest 50 records (`history`'s query)
  lease         acquire + renew + release of a driver lease
and the file size per 10,000 records on SQLite. SQLite runs with synchronous=FULL (an
fsync per commit: the record is evidence), so `append x1` is mostly the disk's fsync.
PostgreSQL is a throw-away database on the given server, dropped afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.ports import NewRecord, RecordKind
from fleet.store import RecordBatcher, SqlStore, open_store

WHO = ("bench-key", "bench")


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e6)
    return out


def show(dialect: str, what: str, us: list[float], per: int = 1) -> None:
    us = sorted(u / per for u in us)
    p90 = us[int(len(us) * 0.9)]
    print(f"{dialect:10s} {what:12s} median {statistics.median(us):9.1f} us   p90 {p90:9.1f} us")


def record(i: int, rollout: str) -> NewRecord:
    return NewRecord(
        RecordKind.DEVICE_OUTCOME,
        {"outcome": "succeeded", "job": f"job-{i}", "phase": "committed", "figures": [1.5, 2.5]},
        rollout_id=rollout,
        device_id=f"dev-{i % 1000:04d}",
        result="ok",
    )


def run(store: SqlStore, n: int) -> None:
    d = store.dialect
    rollout = "r-bench"
    i = iter(range(10**9))
    show(d, "append x1", timed(lambda: store.append([record(next(i), rollout)], who=WHO), n))
    batch = [record(k, "r-batch") for k in range(100)]
    show(d, "append x100", timed(lambda: store.append(batch, who=WHO), max(5, n // 50)), 100)
    batcher = RecordBatcher(store, WHO)

    def batched() -> None:
        for k in range(1000):
            batcher.add(record(k, "r-batcher"))
        batcher.flush()

    show(d, "batcher", timed(batched, 5), 1000)
    batcher.close()
    # Many rollouts in the table, so `read` uses the index, not luck.
    for k in range(n // 100):
        store.append([record(j, f"r-other-{k}") for j in range(100)], who=WHO)
    show(d, "read", timed(lambda: store.records(rollout_id=rollout), 30))
    show(d, "history", timed(lambda: store.records(limit=50, newest_first=True), 100))
    name = f"lease-{uuid.uuid4().hex[:6]}"

    def lease_round() -> None:
        lease = store.acquire_lease(name, "bench", ttl_s=30)
        assert lease is not None
        store.release_lease(store.renew_lease(lease, ttl_s=30))

    show(d, "lease", timed(lease_round, max(50, n // 10)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        path = Path(tmp) / "fleet.db"
        with open_store(path) as store:
            run(store, args.n)
            rows = len(store.records())
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        print(f"sqlite     {size / rows * 10_000 / 2**20:.1f} MiB per 10,000 records (with WAL)")

    import psycopg

    name = f"edgerun_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = urlunsplit(urlsplit(args.pg)._replace(path=f"/{name}"))
        with open_store(url) as store:
            run(store, args.n)
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

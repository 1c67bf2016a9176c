"""The record store on a real SQLite file and the machine's real PostgreSQL.

Every behaviour test runs on both (`store_url` is parametrized). Races use separate
connections (threads) and separate processes (this module run as a worker:
`python -m tests.fleet.test_store <command> …`), and the lease takeover after a crash
kills a real holder process with SIGKILL.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fleet.errors import FleetCode, FleetError
from fleet.ports import Lease, NewRecord, RecordKind
from fleet.store import RecordBatcher, SqlStore, TelemetrySample, open_store
from fleet.store.migrations import load
from tests.pg import fresh_database, pg_database_fixture

ROOT = Path(__file__).resolve().parents[2]
WHO = ("key-a1b2", "alice")

pg_db = pg_database_fixture()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return str(tmp_path_factory.mktemp("store") / "fleet.db")
    return str(request.getfixturevalue("pg_db"))


@pytest.fixture(scope="module")
def store(store_url: str) -> Iterator[SqlStore]:
    s = open_store(store_url)
    yield s
    s.close()


def uid(prefix: str) -> str:
    # Tests share one database per dialect; unique names keep them apart.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def raw_execute(url: str, sql: str) -> None:
    """Run one statement with the driver itself, past the store."""
    if url.startswith("postgresql://"):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql)
    else:
        lite = sqlite3.connect(url, isolation_level=None)
        try:
            lite.execute(sql)
        finally:
            lite.close()


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------ records


def test_append_then_read_back(store: SqlStore) -> None:
    rid = uid("r")
    data = {"plan": {"canary": 2, "waves": [0.25, 0.5]}, "bundle": "digits-1.1.0", "é": "ü"}
    written = store.append(
        [
            NewRecord(RecordKind.ROLLOUT_CREATED, data, rollout_id=rid),
            NewRecord(RecordKind.DEVICE_OUTCOME, {"outcome": "succeeded"}, rid, "dev-1", "ok"),
        ],
        who=WHO,
    )
    assert [r.seq for r in written] == sorted({r.seq for r in written})
    assert written[0].seq < written[1].seq
    assert all(r.key_id == "key-a1b2" and r.operator == "alice" for r in written)
    assert abs(written[0].ts - time.time()) < 60  # the store's clock, in Unix seconds
    read = store.records(rollout_id=rid)
    assert read == written
    assert read[0].data == data
    assert read[1].device_id == "dev-1" and read[1].result == "ok"
    assert read[1].kind is RecordKind.DEVICE_OUTCOME
    assert store.append([], who=WHO) == []


def test_filters_and_rollout_ids(store: SqlStore) -> None:
    r1, r2, dev = uid("r"), uid("r"), uid("dev")
    first = store.append([NewRecord(RecordKind.ROLLOUT_CREATED, rollout_id=r1)], who=WHO)
    store.append(
        [
            NewRecord(RecordKind.DEVICE_STARTED, {"job": "j1"}, r1, dev),
            NewRecord(RecordKind.GATE_RESULT, {"gate": "p95_ms", "passed": False}, r1, dev),
            NewRecord(RecordKind.ROLLOUT_CREATED, rollout_id=r2),
            NewRecord(RecordKind.DEVICE_STARTED, {"job": "j2"}, r2, dev),
        ],
        who=("key-other", "bob"),
    )
    by_device = store.records(device_id=dev)
    assert [(r.rollout_id, r.kind) for r in by_device] == [
        (r1, RecordKind.DEVICE_STARTED),
        (r1, RecordKind.GATE_RESULT),
        (r2, RecordKind.DEVICE_STARTED),
    ]
    gates = store.records(rollout_id=r1, kinds=[RecordKind.GATE_RESULT])
    assert len(gates) == 1 and gates[0].data == {"gate": "p95_ms", "passed": False}
    assert store.records(device_id=dev, kinds=[]) == []
    two = store.records(device_id=dev, kinds=[RecordKind.DEVICE_STARTED, RecordKind.GATE_RESULT])
    assert len(two) == 3
    after = store.records(rollout_id=r1, after_seq=first[0].seq)
    assert [r.kind for r in after] == [RecordKind.DEVICE_STARTED, RecordKind.GATE_RESULT]
    assert len(store.records(device_id=dev, limit=2)) == 2
    newest = store.records(device_id=dev, limit=1, newest_first=True)
    assert newest[0].rollout_id == r2 and newest[0].operator == "bob"
    ids = store.rollout_ids(limit=2)
    assert ids == [r2, r1]  # newest first
    assert store.rollout_ids(limit=1) == [r2]


def test_record_is_append_only(store: SqlStore, store_url: str) -> None:
    rid = uid("r")
    store.append([NewRecord(RecordKind.ROLLOUT_CREATED, {"v": 1}, rollout_id=rid)], who=WHO)
    refused: list[str] = []
    statements = [
        f"UPDATE records SET result = 'forged' WHERE rollout_id = '{rid}'",
        f"DELETE FROM records WHERE rollout_id = '{rid}'",
    ]
    if store.dialect == "postgresql":
        statements.append("TRUNCATE records")
    for sql in statements:
        with pytest.raises((sqlite3.Error, psycopg.Error)) as info:
            raw_execute(store_url, sql)
        refused.append(str(info.value))
    assert all("append-only" in text for text in refused), refused
    (kept,) = store.records(rollout_id=rid)
    assert kept.result is None and kept.data == {"v": 1}


def test_a_failed_append_writes_nothing(store: SqlStore) -> None:
    rid = uid("r")
    good = NewRecord(RecordKind.WAVE_STARTED, {"wave": 0}, rollout_id=rid)
    for bad in ({"when": object()}, {"nested": [1, {b"bytes"}]}):
        with pytest.raises(FleetError) as info:
            store.append([good, NewRecord(RecordKind.GATE_RESULT, bad, rid)], who=WHO)
        assert info.value.code is FleetCode.STORE
        assert "not plain JSON" in info.value.message
    assert store.records(rollout_id=rid) == []


def test_non_finite_figures_are_kept_as_strings(store: SqlStore) -> None:
    rid = uid("r")
    data = {"figure": float("nan"), "limits": [float("inf"), -float("inf"), 1.5]}
    (written,) = store.append([NewRecord(RecordKind.GATE_RESULT, data, rid)], who=WHO)
    (read,) = store.records(rollout_id=rid)
    assert read.data == {"figure": "NaN", "limits": ["Infinity", "-Infinity", 1.5]}
    assert written.data == read.data
    assert float(read.data["limits"][0]) == float("inf")  # float() reads them back


def test_store_is_shared_by_threads(store: SqlStore) -> None:
    rid = uid("r")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                store.append([NewRecord(RecordKind.COMMAND_SENT, {"n": n, "i": i}, rid)], who=WHO)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    seqs = [r.seq for r in store.records(rollout_id=rid)]
    assert len(seqs) == 40 and seqs == sorted(set(seqs))


def test_a_tailing_reader_never_misses_a_row(store_url: str) -> None:
    """Consoles follow a rollout with records(after_seq=last seen). That only works if
    seq order is commit order: writers racing on separate connections must never let
    a smaller seq commit after a larger one was visible."""
    rid = uid("tail")
    writers = [open_store(store_url) for _ in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(s: SqlStore, n: int) -> None:
        try:
            while not stop.is_set():
                s.append([NewRecord(RecordKind.COMMAND_SENT, {"n": n}, rid)] * 3, who=WHO)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, n)) for n, s in enumerate(writers)]
    seen: list[int] = []
    with open_store(store_url) as reader:
        try:
            for t in threads:
                t.start()
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                new = reader.records(rollout_id=rid, after_seq=seen[-1] if seen else 0)
                seen.extend(r.seq for r in new)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
            for s in writers:
                s.close()
        seen.extend(
            r.seq for r in reader.records(rollout_id=rid, after_seq=seen[-1] if seen else 0)
        )
        everything = [r.seq for r in reader.records(rollout_id=rid)]
    assert errors == []
    assert len(everything) > 30  # they did write concurrently
    assert seen == everything


def test_batcher_writes_everything_in_few_transactions(store: SqlStore) -> None:
    rid = uid("r")
    batcher = RecordBatcher(store, WHO, max_batch=200, max_delay_s=0.05)

    def sender(n: int) -> None:
        for i in range(300):
            batcher.add(NewRecord(RecordKind.COMMAND_SENT, {"n": n, "i": i}, rid, f"dev-{n}"))

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    batcher.flush(timeout_s=60)
    assert batcher.pending == 0 and batcher.error is None
    written = store.records(rollout_id=rid)
    assert len(written) == 1200
    for n in range(4):  # each sender's records in the order it added them
        assert [r.data["i"] for r in written if r.data["n"] == n] == list(range(300))
    # One transaction shares one ts: far fewer commits than records.
    assert len({r.ts for r in written}) < len(written) / 2
    batcher.add(NewRecord(RecordKind.COMMAND_REPLY, {"last": True}, rid))
    batcher.close()
    assert store.records(rollout_id=rid, kinds=[RecordKind.COMMAND_REPLY])[0].data == {"last": True}
    with pytest.raises(FleetError):
        batcher.add(NewRecord(RecordKind.COMMAND_SENT, rollout_id=rid))


def test_batcher_keeps_records_while_the_database_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    with open_store(path, busy_timeout_s=0.05) as store:
        batcher = RecordBatcher(store, WHO, max_delay_s=0.01, retry_max_s=0.2)
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            for i in range(10):
                batcher.add(NewRecord(RecordKind.COMMAND_SENT, {"i": i}, "r"))
            wait_for(lambda: batcher.error is not None, 30, "the append to fail")
            error = batcher.error
            assert error is not None and "locked" in error.message
            with pytest.raises(FleetError) as info:
                batcher.flush(timeout_s=0.2)
            assert "10 records are not written yet" in info.value.message
            assert batcher.pending == 10
        finally:
            holder.close()  # the lock goes; the queued records get written
        batcher.close(timeout_s=30)
        assert batcher.error is None
        assert [r.data["i"] for r in store.records(rollout_id="r")] == list(range(10))


# ------------------------------------------------------------------- leases


def test_lease_expiry_takeover_fences_the_stale_holder(store: SqlStore) -> None:
    name = uid("rollout")
    a = store.acquire_lease(name, "console-a", ttl_s=0.3)
    assert a is not None and a.holder == "console-a"
    assert store.acquire_lease(name, "console-b", ttl_s=5) is None  # held
    assert store.lease(name) == a
    store.append([NewRecord(RecordKind.WAVE_STARTED, rollout_id=name)], who=WHO, lease=a)
    again = store.acquire_lease(name, "console-a", ttl_s=0.3)  # ours: same token
    assert again is not None and again.token == a.token

    b: Lease | None = None

    def taken() -> bool:
        nonlocal b
        b = store.acquire_lease(name, "console-b", ttl_s=30)
        return b is not None

    wait_for(taken, 15, "the expired lease to be taken over")
    assert b is not None and b.token > a.token and b.holder == "console-b"
    assert store.lease(name) == b
    with pytest.raises(FleetError) as info:
        store.append([NewRecord(RecordKind.WAVE_FINISHED, rollout_id=name)], who=WHO, lease=a)
    assert info.value.code is FleetCode.LEASE
    assert "console-b holds it now" in info.value.message
    with pytest.raises(FleetError) as renew:
        store.renew_lease(a, ttl_s=30)
    assert renew.value.code is FleetCode.LEASE
    store.release_lease(a)  # a stale release is a no-op, not a theft
    assert store.lease(name) == b
    kinds = [r.kind for r in store.records(rollout_id=name)]
    assert kinds == [RecordKind.WAVE_STARTED]  # the stale append left nothing


def test_append_under_an_expired_lease_is_refused(store: SqlStore) -> None:
    name = uid("rollout")
    lease = store.acquire_lease(name, "console-a", ttl_s=0.2)
    assert lease is not None
    wait_for(lambda: store.lease(name) is None, 15, "the lease to expire")
    with pytest.raises(FleetError) as info:
        store.append([NewRecord(RecordKind.WAVE_STARTED, rollout_id=name)], who=WHO, lease=lease)
    assert info.value.code is FleetCode.LEASE and "expired" in info.value.message
    # Nobody took it meanwhile, so its holder may renew and carry on with the same token.
    renewed = store.renew_lease(lease, ttl_s=30)
    assert renewed.token == lease.token and renewed.expires_at > lease.expires_at
    store.append([NewRecord(RecordKind.WAVE_STARTED, rollout_id=name)], who=WHO, lease=renewed)
    assert len(store.records(rollout_id=name)) == 1


def test_release_frees_and_the_token_keeps_growing(store: SqlStore) -> None:
    name = uid("rollout")
    tokens = []
    for holder in ("a", "b", "a"):
        lease = store.acquire_lease(name, holder, ttl_s=30)
        assert lease is not None
        tokens.append(lease.token)
        store.release_lease(lease)
        assert store.lease(name) is None
    assert tokens == sorted(set(tokens))  # strictly growing across holders and releases


def test_bad_lease_arguments(store: SqlStore) -> None:
    for ttl in (0, -1, float("inf"), float("nan")):
        with pytest.raises(FleetError) as info:
            store.acquire_lease(uid("x"), "a", ttl_s=ttl)
        assert info.value.code is FleetCode.BAD_INPUT
    with pytest.raises(FleetError):
        store.acquire_lease("", "a", ttl_s=1)


def test_lease_race_between_threads(store_url: str) -> None:
    name = uid("race")
    stores = [open_store(store_url) for _ in range(6)]
    go = threading.Barrier(len(stores))
    got: list[Lease | None] = [None] * len(stores)

    def race(i: int) -> None:
        go.wait(timeout=30)
        got[i] = stores[i].acquire_lease(name, f"console-{i}", ttl_s=30)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        for s in stores:
            s.close()
    winners = [lease for lease in got if lease is not None]
    assert len(winners) == 1, got
    with open_store(store_url) as s:
        assert s.lease(name) == winners[0]


@contextlib.contextmanager
def worker(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """This module as a separate console process (see `_main`)."""
    cmd = [sys.executable, "-m", "tests.fleet.test_store", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


def test_lease_race_between_processes(store_url: str, tmp_path: Path) -> None:
    name, go = uid("race"), tmp_path / "go"
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(worker(["race", store_url, name, f"proc-{i}", str(go)]))
            for i in range(3)
        ]
        for p in procs:  # each says it is ready before the start signal
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, out
            results.append(json.loads(out))
    winners = [r for r in results if r["lease"] is not None]
    assert len(winners) == 1, results
    with open_store(store_url) as s:
        held = s.lease(name)
    assert held is not None and held.holder == winners[0]["lease"]["holder"]


def test_fencing_holds_under_contention(store_url: str, tmp_path: Path) -> None:
    """Three console processes fight over one lease for a second: appends under it
    never interleave (one holder per token, tokens only grow in seq order), and every
    append made after the lease's time ran out is refused."""
    name, go = uid("fight"), tmp_path / "go"
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(worker(["drive", store_url, name, f"drv-{i}", str(go)]))
            for i in range(3)
        ]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        reports = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, out
            reports.append(json.loads(out))
    assert sum(r["late_tries"] for r in reports) > 0
    assert [r["late_accepted"] for r in reports] == [0, 0, 0]
    with open_store(store_url) as s:
        seen = [(r.data["token"], r.data["holder"]) for r in s.records(rollout_id=name)]
    assert all(r["turns"] > 0 for r in reports), reports  # they did contend
    assert len({holder for _, holder in seen}) >= 2, reports
    tokens = [token for token, _ in seen]
    assert tokens == sorted(tokens)
    holders: dict[int, set[str]] = {}
    for token, holder in seen:
        holders.setdefault(token, set()).add(holder)
    assert all(len(h) == 1 for h in holders.values()), holders


def test_killed_holder_loses_the_lease_after_its_ttl(store_url: str) -> None:
    name, ttl = uid("crash"), 1.5
    with worker(["hold", store_url, name, "doomed-console", str(ttl)]) as proc:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    with open_store(store_url) as s:
        taken: Lease | None = None

        def take() -> bool:
            nonlocal taken
            taken = s.acquire_lease(name, "survivor", ttl_s=30)
            return taken is not None

        wait_for(take, 30, "the dead holder's lease to expire")
        assert taken is not None
        assert taken.token > first["token"]
        # Granted only once the dead holder's lease had run out (same database clock).
        assert taken.expires_at - 30 >= first["expires_at"]
        # The dead holder's records stay; its fencing token can no longer append.
        dead = Lease(name, "doomed-console", first["token"], first["expires_at"])
        with pytest.raises(FleetError) as info:
            s.append([NewRecord(RecordKind.WAVE_STARTED, rollout_id=name)], who=WHO, lease=dead)
        assert info.value.code is FleetCode.LEASE
        assert [r.operator for r in s.records(rollout_id=name)] == ["doomed"]


# ---------------------------------------------------------------- telemetry


def test_telemetry_kept_and_pruned(store: SqlStore) -> None:
    dev = uid("dev")
    t0 = 1_700_000_000.0
    added = store.add_telemetry(
        [
            TelemetrySample(dev, t0, 3.5, 20.0, 0.0, 81.0, 55.0),
            TelemetrySample(dev, t0 + 10, float("nan"), 21.0, None, 82.0, float("inf")),
            TelemetrySample(dev, t0 + 20, 3.9, 19.0, 0.01, 83.0, 56.5),
        ]
    )
    assert added == 3
    rows = store.telemetry(device_id=dev)
    assert [r.ts for r in rows] == [t0, t0 + 10, t0 + 20]
    assert rows[1].p95_ms is None and rows[1].temperature_c is None  # non-finite: unknown
    assert rows[2] == TelemetrySample(dev, t0 + 20, 3.9, 19.0, 0.01, 83.0, 56.5)
    assert [r.ts for r in store.telemetry(device_id=dev, since=t0 + 5)] == [t0 + 10, t0 + 20]
    assert store.prune(older_than=t0 + 15) >= 2
    assert [r.ts for r in store.telemetry(device_id=dev)] == [t0 + 20]


# --------------------------------------------------------------- migrations


@pytest.fixture
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "new.db")
    else:
        with fresh_database() as url:
            yield url


both = pytest.mark.parametrize("empty_url", ["sqlite", "postgresql"], indirect=True)


@both
def test_migrations_from_empty_and_idempotent_reopen(empty_url: str) -> None:
    latest = len(load("sqlite"))
    assert latest == len(load("postgresql")) >= 2
    if not empty_url.startswith("postgresql://"):
        with pytest.raises(FleetError) as info:
            open_store(empty_url, migrate=False)  # `db status` does not create a file
        assert info.value.code is FleetCode.NOT_FOUND and not Path(empty_url).exists()
    with open_store(empty_url, migrate=False, create=True) as s:
        status = s.schema()
        assert status.current == 0 and status.latest == latest and len(status.pending) == latest
    with open_store(empty_url) as s:
        assert s.schema().current == latest and s.schema().pending == ()
        s.append([NewRecord(RecordKind.ROLLOUT_CREATED, rollout_id="r")], who=WHO)
    with open_store(empty_url) as s:  # re-open: nothing re-applied, nothing lost
        assert s.migrate() == []
        assert len(s.records()) == 1
    if empty_url.startswith("postgresql://"):
        with psycopg.connect(empty_url) as conn:
            rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    else:
        with sqlite3.connect(empty_url) as conn:
            rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == list(range(1, latest + 1))


@both
def test_consoles_starting_at_once_migrate_once(empty_url: str) -> None:
    go = threading.Barrier(4)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            go.wait(timeout=30)
            open_store(empty_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with open_store(empty_url, migrate=False) as s:
        assert s.schema().current == len(load(s.dialect))


@both
def test_a_newer_schema_is_refused(empty_url: str) -> None:
    open_store(empty_url).close()
    latest = len(load("sqlite"))
    raw_execute(
        empty_url,
        f"INSERT INTO schema_version (version, name, applied_at) VALUES ({latest + 7}, 'future', 0)",
    )
    with pytest.raises(FleetError) as info:
        open_store(empty_url)
    assert info.value.code is FleetCode.STORE
    assert f"schema version {latest + 7}" in info.value.message
    assert f"version {latest})" in info.value.message
    with open_store(empty_url, migrate=False) as s:  # `db status` can still say so
        assert s.schema().too_new


# ------------------------------------------------------------ clear errors


def test_unreachable_postgresql_is_a_clear_error() -> None:
    from tests.mqtt_broker import free_port

    with pytest.raises(FleetError) as info:
        open_store(f"postgresql://ops:s3cret@127.0.0.1:{free_port()}/fleet")
    assert info.value.code is FleetCode.STORE
    assert "cannot reach PostgreSQL" in info.value.message
    assert "s3cret" not in info.value.message  # the password never reaches the screen


def test_postgresql_refusals_say_what_to_do(pg_db: str) -> None:
    base = pg_db.rsplit("/", 1)[0]
    with pytest.raises(FleetError) as info:
        open_store(f"{base}/no_such_db_{uuid.uuid4().hex[:6]}")
    assert "createdb" in info.value.message
    role = pg_db.replace("postgres@", "no_such_role@")
    with pytest.raises(FleetError) as info:
        open_store(role)
    assert info.value.code is FleetCode.STORE and "role" in info.value.message


def test_lost_postgresql_connection_then_reconnect(caplog: pytest.LogCaptureFixture) -> None:
    # Its own database: terminating backends must not hit the module's shared store.
    def cut(url: str) -> None:
        raw_execute(
            url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'edge-fleet' AND pid <> pg_backend_pid()"
            " AND datname = current_database()",
        )

    with fresh_database() as url, open_store(url) as s:
        s.append([NewRecord(RecordKind.COMMAND_SENT, rollout_id="before")], who=WHO)
        cut(url)
        # A read is repeated once on a new connection: the caller sees no failure.
        with caplog.at_level("WARNING", logger="fleet.store.sql_store"):
            assert len(s.records(rollout_id="before")) == 1
        assert any("reconnecting once" in r.getMessage() for r in caplog.records)
        lease = s.acquire_lease("r", "console-a", ttl_s=30)
        assert lease is not None
        cut(url)
        assert s.renew_lease(lease, ttl_s=30).token == lease.token
        # An append is not repeated (its commit may have happened): a clear error.
        cut(url)
        with pytest.raises(FleetError) as info:
            s.append([NewRecord(RecordKind.COMMAND_SENT, rollout_id="after")], who=WHO)
        assert info.value.code is FleetCode.STORE and "retry" in info.value.message
        assert "lost the connection" in info.value.message
        s.append([NewRecord(RecordKind.COMMAND_SENT, rollout_id="after")], who=WHO)
        assert len(s.records(rollout_id="after")) == 1


def test_corrupt_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    junk = b"this is not a database\n" * 500
    path.write_bytes(junk)
    with pytest.raises(FleetError) as info:
        open_store(path)
    assert info.value.code is FleetCode.STORE and "corrupt" in info.value.message
    assert path.read_bytes() == junk


def test_locked_sqlite_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    open_store(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(FleetError) as info:
            open_store(path, busy_timeout_s=0.2)
        assert info.value.code is FleetCode.STORE and "locked" in info.value.message
    finally:
        holder.close()
    open_store(path).close()  # free again: opens


def test_read_only_sqlite_file_is_a_clear_error(tmp: Path) -> None:
    tmp.chmod(0o755)  # the unprivileged child must reach the folder
    folder = tmp / "ro"
    folder.mkdir()
    path = folder / "fleet.db"
    with open_store(path) as s:
        s.append([NewRecord(RecordKind.ROLLOUT_CREATED, rollout_id="kept")], who=WHO)
    before = path.read_bytes()
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        result = _as_unprivileged(lambda: _try_open(path))
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
    assert result.startswith("console.store:"), result
    assert "read-only" in result
    assert path.read_bytes() == before


def _try_open(path: Path) -> str:
    try:
        with open_store(path) as s:
            s.append([NewRecord(RecordKind.ROLLOUT_CREATED)], who=WHO)
    except FleetError as exc:
        return f"{exc.code.value}: {exc.message}"
    return "opened and appended"


def _as_unprivileged(fn: Callable[[], str]) -> str:
    """Run `fn` in a forked child that is not root (root writes read-only files)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            out = fn()
        except BaseException as exc:
            out = f"child failed: {exc!r}"
        os.write(write, out.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        out = pipe.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.mark.parametrize(
    ("url", "code", "words"),
    [
        ("", FleetCode.CONFIG, "empty"),
        ("mysql://db/fleet", FleetCode.CONFIG, "unknown scheme"),
        ("sqlite://fleet.db", FleetCode.CONFIG, "sqlite:///"),
        ("/nonexistent-dir/sub/fleet.db", FleetCode.STORE, "does its folder exist"),
    ],
)
def test_bad_record_locations(url: str, code: FleetCode, words: str) -> None:
    with pytest.raises(FleetError) as info:
        open_store(url)
    assert info.value.code is code and words in info.value.message


def test_sqlite_url_and_folder(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path}/a.db") as s:
        assert s.dialect == "sqlite" and s.where == f"{tmp_path}/a.db"
    with pytest.raises(FleetError) as info:
        open_store(tmp_path)
    assert "is a folder" in info.value.message


# ----------------------------------------------------------- worker process


def _main(argv: list[str]) -> int:
    command, url, name, holder, *rest = argv
    if command == "race":
        go = Path(rest[0])
        with open_store(url) as s:
            print("ready", flush=True)
            deadline = time.monotonic() + 30
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.002)
            lease = s.acquire_lease(name, holder, ttl_s=30)
        out: dict[str, Any] = {"lease": None if lease is None else {"holder": lease.holder}}
        print(json.dumps(out), flush=True)
        return 0
    if command == "drive":
        return _drive(url, name, holder, Path(rest[0]))
    if command == "hold":
        s = open_store(url)
        lease = s.acquire_lease(name, holder, ttl_s=float(rest[0]))
        assert lease is not None
        s.append(
            [NewRecord(RecordKind.DRIVER_TOOK_OVER, rollout_id=name)],
            who=("key-doomed", "doomed"),
            lease=lease,
        )
        print(json.dumps({"token": lease.token, "expires_at": lease.expires_at}), flush=True)
        time.sleep(120)  # until killed
        return 1
    return 2


def _lease_moved_on(s: SqlStore, lease: Lease) -> bool:
    return s.lease(lease.name) != lease


def _drive(url: str, name: str, holder: str, go: Path) -> int:
    """Take the lease whenever free, append under it, then either release it or keep
    quiet past its TTL and try one late append (which must be refused)."""
    ttl = 0.4
    late_tries = late_accepted = appended = 0
    with open_store(url) as s:
        print("ready", flush=True)
        deadline = time.monotonic() + 30
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        # About a second of fighting, and longer (bounded) until this one had a turn.
        start = time.monotonic()
        turn = 0
        while time.monotonic() < start + (1.0 if turn else 10.0):
            lease = s.acquire_lease(name, holder, ttl_s=ttl)
            if lease is None:
                time.sleep(0.005)
                continue
            turn += 1
            entry = NewRecord(
                RecordKind.WAVE_STARTED, {"token": lease.token, "holder": holder}, name
            )
            try:
                for _ in range(3):
                    s.append([entry], who=WHO, lease=lease)
                    appended += 1
            except FleetError as exc:
                assert exc.code is FleetCode.LEASE  # a slow turn outlived its ttl
                continue
            if turn % 2:
                s.release_lease(lease)
                time.sleep(0.03)  # let the others at it, or one console starves them
                continue
            # Expired by the database's clock: the lease it reports is no longer ours.
            wait_for(functools.partial(_lease_moved_on, s, lease), 10, "the lease to expire")
            late_tries += 1
            try:
                s.append([entry], who=WHO, lease=lease)
                late_accepted += 1
            except FleetError as exc:
                assert exc.code is FleetCode.LEASE
            time.sleep(0.03)
    report = {
        "turns": turn,
        "appended": appended,
        "late_tries": late_tries,
        "late_accepted": late_accepted,
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

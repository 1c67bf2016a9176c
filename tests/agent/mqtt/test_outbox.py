"""The on-disk outbox: order, sequence numbers, acknowledgement, bounds, recovery."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.outbox import ROW_OVERHEAD, Outbox


def payload(seq: int, size: int = 10) -> bytes:
    return json.dumps({"seq": f"{seq:06d}", "pad": "x" * size}).encode()  # fixed size


def put(box: Outbox, kind: str, size: int = 10) -> int:
    return box.put(kind, f"t/{kind}", lambda seq: payload(seq, size))  # type: ignore[arg-type]


def test_rows_leave_in_order_and_only_when_acknowledged(tmp: Path) -> None:
    box = Outbox(tmp / "o.sqlite", 10**6, 3600)
    assert [put(box, "telemetry") for _ in range(3)] == [1, 2, 3]
    assert put(box, "event") == 1  # each stream counts on its own
    rows = box.pending(0, 10)
    assert [(r.kind, r.seq) for r in rows] == [
        ("telemetry", 1),
        ("telemetry", 2),
        ("telemetry", 3),
        ("event", 1),
    ]
    assert [r.seq for r in box.pending(rows[1].id, 10)] == [3, 1]
    assert box.ack([rows[0].id, rows[2].id]) == 2
    assert box.ack([rows[0].id]) == 0  # a repeated PUBACK is harmless
    assert [r.seq for r in box.pending(0, 10)] == [2, 1]
    assert box.depth().messages == 2
    box.close()
    # Reopened (a restart): the rest is still there, numbering goes on.
    again = Outbox(tmp / "o.sqlite", 10**6, 3600)
    assert [r.seq for r in again.pending(0, 10)] == [2, 1]
    assert put(again, "telemetry") == 4
    assert again.depth().bytes == sum(len(r.payload) + ROW_OVERHEAD for r in again.pending(0, 10))


def test_over_the_byte_bound_drops_oldest_telemetry_first_and_counts(tmp: Path) -> None:
    row = len(payload(1, 100)) + ROW_OVERHEAD
    box = Outbox(tmp / "o.sqlite", max_bytes=10 * row, max_age_s=3600)
    put(box, "event", 100)
    for _ in range(9):
        put(box, "telemetry", 100)
    assert box.depth().messages == 10 and box.take_dropped() == {}
    for _ in range(3):
        put(box, "telemetry", 100)
    rows = box.pending(0, 100)
    assert len(rows) == 10
    assert rows[0].kind == "event"  # the event outlives older telemetry
    assert [r.seq for r in rows if r.kind == "telemetry"] == list(range(4, 13))
    assert box.take_dropped() == {"size.telemetry": 3}
    assert box.take_dropped() == {}  # reported once
    # With no telemetry left to drop, events go (oldest first).
    for _ in range(10):
        put(box, "event", 100)
    rows = box.pending(0, 100)
    assert {r.kind for r in rows} == {"event"} and len(rows) == 10
    assert box.take_dropped() == {"size.telemetry": 9, "size.event": 1}
    assert box.dropped_total() == {"telemetry": 12, "event": 1}


def test_age_bound(tmp: Path) -> None:
    now = [1000.0]
    box = Outbox(tmp / "o.sqlite", 10**6, max_age_s=60, clock=lambda: now[0])
    put(box, "telemetry")
    put(box, "event")
    now[0] += 61
    put(box, "telemetry")
    assert [r.seq for r in box.pending(0, 10)] == [2]
    assert box.take_dropped() == {"age.telemetry": 1, "age.event": 1}
    now[0] += 61
    box.prune()
    assert box.pending(0, 10) == []


def test_a_message_that_cannot_be_built_leaves_no_trace(tmp: Path) -> None:
    box = Outbox(tmp / "o.sqlite", 10**6, 3600)

    def broken(seq: int) -> bytes:
        raise ValueError("no")

    with pytest.raises(ValueError):
        box.put("event", "t", broken)
    assert put(box, "event") == 1  # the number was not used up
    assert box.depth().messages == 1


def test_an_unreadable_outbox_is_moved_aside(tmp: Path) -> None:
    path = tmp / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    box = Outbox(path, 10**6, 3600)
    assert box.recovered_from is not None and box.recovered_from.exists()
    assert put(box, "event") == 1


def test_survives_kill_9_mid_write(tmp: Path) -> None:
    """A writer killed at a random point leaves a consistent queue: numbers 1..n, no gaps."""
    path = tmp / "o.sqlite"
    code = (
        "import sys, os, signal\n"
        "from pathlib import Path\n"
        "from agent.outbox import Outbox\n"
        f"box = Outbox(Path({str(path)!r}), 10**8, 3600)\n"
        "for i in range(100000):\n"
        "    box.put('telemetry', 't', lambda s: b'x' * 200)\n"
        "    if i == 300: print('go', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[3]
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"go"
    proc.kill()
    proc.wait()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    box = Outbox(path, 10**8, 3600)
    seqs = [r.seq for r in box.pending(0, 10**6)]
    assert len(seqs) > 300
    assert seqs == list(range(1, len(seqs) + 1))
    assert box.last_seq("telemetry") == len(seqs)
    assert put(box, "telemetry") == len(seqs) + 1

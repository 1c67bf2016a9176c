"""STATE/update.json: whole records, atomically replaced; junk is refused, never trusted."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent.protocol.update import Phase
from agent.update.journal import JobRecord, Journal, parse_journal


def record(phase: Phase) -> JobRecord:
    now = time.time()
    return JobRecord("abc", "deploy", phase, {"version": "1.1.0"}, "1.1.0", now, now)


def test_each_write_replaces_the_whole_file_and_reads_back(tmp: Path) -> None:
    journal = Journal(tmp)
    for phase in (Phase.DOWNLOADING, Phase.VERIFYING, Phase.TRIAL):
        journal.record(record(phase))
        assert Journal(tmp).job == journal.job
        assert journal.job is not None and journal.job.phase is phase
    journal.mark_bad("1.1.0", "a" * 64, "trial: p95")
    assert journal.count_crash("a" * 64) == 1 and journal.count_crash("a" * 64) == 2
    reread = Journal(tmp)
    assert reread.is_bad(sha256="a" * 64) is not None
    assert reread.state.crashes == {"a" * 64: 2}
    assert reread.job is not None and reread.job.phase is Phase.TRIAL
    assert sorted(p.name for p in tmp.iterdir()) == ["update.json"]  # no temp file left


def test_a_crash_between_tmp_and_rename_leaves_the_old_record(tmp: Path) -> None:
    journal = Journal(tmp)
    journal.record(record(Phase.DOWNLOADING))
    # What a crash after writing the temp file and before the rename leaves.
    (tmp / ".update.json.tmp").write_bytes(b'{"schema": 1, "job": {"phase": "tri')
    again = Journal(tmp)
    assert again.job is not None and again.job.phase is Phase.DOWNLOADING
    again.record(record(Phase.VERIFYING))
    assert Journal(tmp).job.phase is Phase.VERIFYING  # type: ignore[union-attr]
    assert not (tmp / ".update.json.tmp").exists()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"schema": 2}',
        b'{"schema": 1, "job": {"phase": "exploded"}}',
        b'{"schema": 1, "job": {"id": 1}}',
        b'{"schema": 1, "bad_versions": {}}',
        b'{"schema": 1, "crashes": {"a": -1}}',
        b'{"schema": 1, "crashes": {"a": true}}',
        b"[" * 100_000,
        b" " * (2 << 20),
    ],
)
def test_junk_is_refused_with_value_error(data: bytes, tmp: Path) -> None:
    with pytest.raises(ValueError):
        parse_journal(data)
    (tmp / "update.json").write_bytes(data)
    assert Journal(tmp).job is None
    assert (tmp / "update.json.unreadable").exists()


def test_the_file_is_private(tmp: Path) -> None:
    Journal(tmp).record(record(Phase.ACCEPTED))
    assert os.stat(tmp / "update.json").st_mode & 0o077 == 0
    assert json.loads((tmp / "update.json").read_text())["job"]["phase"] == "accepted"

"""The update journal reader survives a bounded fuzz run (fixed seed, real journal seeds)."""

from __future__ import annotations

import time
from pathlib import Path

from agent.protocol.update import Phase
from agent.update.journal import JobRecord, Journal
from tests.fuzz import run_harness


def test_journal_fuzz_finds_nothing(tmp: Path) -> None:
    journal = Journal(tmp)
    now = time.time()
    journal.record(
        JobRecord(
            "j1",
            "deploy",
            Phase.TRIAL,
            {"url": "http://h/b", "size": 3},
            "1.1.0",
            now,
            now,
            candidate_sha="ab" * 32,
            figures={"bytes": 3},
        )
    )
    journal.mark_bad("1.1.0", "ab" * 32, "trial: p95")
    journal.count_crash("ab" * 32)
    seeds = [(tmp / "update.json").read_bytes(), b'{"schema": 1, "job": null}']
    proc = run_harness("journal", runs=3000, max_len=4096, seeds=seeds, workdir=tmp / "fuzz")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

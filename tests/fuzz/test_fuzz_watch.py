"""The watchdog's answer checks survive a bounded fuzz run (fixed seed, seeded with answers
of the sample's shape: finite, NaN, inf, empty)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.fuzz import run_harness


def _seed(dtype_index: int, shape: tuple[int, ...], values: np.ndarray) -> bytes:
    # The harness reads: dtype index, rank, dims, then the values' bytes.
    head = bytes([dtype_index, len(shape), *shape])
    return head + values.tobytes()


def test_watch_fuzz_finds_nothing(tmp: Path) -> None:
    logits = np.zeros((1, 10), np.float32)
    logits[0, 3] = 5
    nan = logits.copy()
    nan[0, 4] = np.nan
    seeds = [
        _seed(1, (1, 10), logits) * 2,
        _seed(1, (1, 10), logits) + _seed(1, (1, 10), nan),
        _seed(2, (2, 10), np.full((2, 10), np.inf)),
        _seed(1, (0, 10), np.zeros(0, np.float32)),
    ]
    proc = run_harness("watch", runs=3000, max_len=2048, seeds=seeds, workdir=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

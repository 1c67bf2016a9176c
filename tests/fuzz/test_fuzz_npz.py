"""The golden .npz header reader (agent.npz) survives a bounded fuzz run (fixed seed, real npz seeds)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tests.fuzz import run_harness


def _npz(compressed: bool, **arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def test_npz_header_fuzz_finds_nothing(tmp: Path) -> None:
    seeds = [
        _npz(False, input=np.zeros((4, 1, 8, 8), np.float32)),
        _npz(True, input=np.zeros((65536, 3), np.float32), mask=np.ones((2,), bool)),
        _npz(False, x=np.arange(3, dtype=np.int64).reshape(3, 1)),
    ]
    proc = run_harness("npz", runs=3000, max_len=4096, seeds=seeds, workdir=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

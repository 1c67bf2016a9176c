"""A bounded atheris run of the request checks and the manifest's tensor list (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fuzz import run_harness


def _seeds() -> list[bytes]:
    tensors = [
        {"name": "input", "dtype": "float32", "shape": [-1, -1]},
        {"name": "state", "dtype": "float32", "shape": [2, -1, 128], "batch_axis": 1},
        {"name": "sr", "dtype": "int64", "shape": [], "batch_axis": None},
    ]
    text = json.dumps(tensors).encode()
    return [bytes(range(64)) + text, b"\x01" * 48 + text, b"\xff" * 64 + b'[{"batch_axis": 3}]']


def test_request_checks_hold_their_contract(tmp_path: Path) -> None:
    out = run_harness("tensors", runs=4000, max_len=1024, seeds=_seeds(), workdir=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "Done 4000 runs" in out.stderr, out.stderr[-2000:]

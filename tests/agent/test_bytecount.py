"""count_bytes (agent/api/bytecount.py) against bytes.count, on both of its paths."""

from __future__ import annotations

import numpy as np
import pytest

from agent.api.bytecount import count_bytes


@pytest.mark.parametrize("size", [0, 1, 100, 4096, 4097, 333_000])
def test_count_bytes_agrees_with_bytes_count(size: int) -> None:
    rng = np.random.default_rng(size)
    data = rng.choice(np.frombuffer(b'[{,}]0.5e-"', np.uint8), size).tobytes()
    want = data.count(b"[") + data.count(b"{")
    for view in (data, bytearray(data), memoryview(data)):
        assert count_bytes(view, b"[{") == want
        assert count_bytes(view, b",") == data.count(b",")
    assert count_bytes(data, b"") == 0


def test_count_bytes_counts_high_bytes() -> None:
    data = bytes(range(256)) * 40  # above the numpy threshold, every byte value
    assert all(count_bytes(data, bytes((c,))) == 40 for c in (0, 127, 128, 255))

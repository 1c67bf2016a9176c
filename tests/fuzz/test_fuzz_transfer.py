"""The MQTT transfer decoders (agent.protocol.transfer) survive a bounded fuzz run
(fixed seed, real chunks and need messages as seeds)."""

from __future__ import annotations

from pathlib import Path

from agent.protocol.transfer import Need, chunks_of
from tests.fuzz import run_harness


def test_transfer_decoders_fuzz_finds_nothing(tmp: Path) -> None:
    data = bytes(range(256)) * 5
    chunks = chunks_of(data, 256)
    sha = chunks[0].bundle_sha256
    seeds = [b"\x00" + c.encode() for c in (chunks[0], chunks[-1])]
    seeds += [
        b"\x01" + Need("t1", sha, len(data), len(chunks), ((0, 2), (3, 5)), "silence").encode(),
        b"\x01" + Need("t1", sha, len(data), None, (), "start").encode(),
    ]
    proc = run_harness("transfer", runs=4000, max_len=2048, seeds=seeds, workdir=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

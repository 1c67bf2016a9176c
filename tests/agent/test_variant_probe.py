"""The latency probe's inputs: read once per selection, shared by every candidate.

The real sample bundle (its golden inputs: 16 digits, batch axis 0), unpacked afresh.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from agent.bundle import load_unpacked
from agent.variants.latency import ProbeInputs
from tests.helpers import unpack_sample


def test_the_golden_inputs_are_read_once_and_each_call_gets_its_own_rows(
    tmp_path: Path,
) -> None:
    parts = unpack_sample(tmp_path / "digits")
    manifest = load_unpacked(parts.directory)
    assert manifest.golden_inputs is not None
    golden = parts.directory / manifest.golden_inputs
    with np.load(golden) as data:
        first = data["input"][:1]
    probe = ProbeInputs(manifest, parts.directory)
    golden.unlink()  # what the candidates measure must already be held
    four, two = probe.feeds(4), probe.feeds(2)
    assert four["input"].shape == (4, 1, 8, 8) and two["input"].shape == (2, 1, 8, 8)
    assert all(np.array_equal(row, first[0]) for row in four["input"])
    assert four["input"].flags.c_contiguous
    four["input"][:] = 0  # one candidate's feeds are its own
    assert np.array_equal(probe.feeds(1)["input"], first)
    assert probe.row_bytes() == first.nbytes


def test_without_golden_inputs_the_probe_is_zeros_of_the_manifests_shapes(
    tmp_path: Path,
) -> None:
    parts = unpack_sample(tmp_path / "digits")
    manifest = dataclasses.replace(load_unpacked(parts.directory), golden_inputs=None)
    feeds = ProbeInputs(manifest, parts.directory).feeds(3)
    assert feeds["input"].shape == (3, 1, 8, 8) and feeds["input"].dtype == np.float32
    assert not feeds["input"].any()

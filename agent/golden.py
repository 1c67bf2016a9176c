"""Replay a bundle's golden cases on this device before it may serve."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from agent.bundle import BundleError, Manifest
from agent.errors import ServingError
from agent.runtimes.base import Runtime
from agent.tensors import validate_feeds

log = logging.getLogger(__name__)


class GoldenMismatchError(BundleError):
    """The model's outputs on this device differ from the recorded ones beyond tolerance."""

    code = "bundle.golden_mismatch"


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise GoldenMismatchError(f"cannot read golden file {path.name}: {exc}") from exc


def check_golden(manifest: Manifest, directory: Path, runtime: Runtime) -> dict[str, float]:
    """Return the max abs difference per output; raise GoldenMismatchError beyond tolerance."""
    fmt = runtime.format
    if manifest.golden_inputs is None or fmt not in manifest.golden_outputs:
        log.warning("bundle %s has no golden cases for %s; not validated", manifest.name, fmt)
        return {}
    inputs = _load(directory / manifest.golden_inputs)
    expected = _load(directory / manifest.golden_outputs[fmt])
    try:
        # The same checks a request meets, so golden cases that disagree with the
        # manifest's own shapes and batch axes are named as such, not as a runtime crash.
        validate_feeds(manifest.inputs, inputs, max_batch=sys.maxsize)
    except ServingError as exc:
        raise GoldenMismatchError(f"golden inputs do not fit the manifest: {exc}") from exc
    try:
        got = runtime.run(inputs)
    except Exception as exc:
        raise GoldenMismatchError(f"golden inputs fail to run on {runtime.name}: {exc}") from exc
    diffs: dict[str, float] = {}
    failures = []
    for name, want in expected.items():
        if name not in got:
            raise GoldenMismatchError(f"golden output {name!r} is not produced by the model")
        have = got[name]
        if have.shape != want.shape:
            raise GoldenMismatchError(
                f"golden output {name!r} has shape {list(have.shape)}, expected {list(want.shape)}"
            )
        diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
        diffs[name] = float(diff.max()) if diff.size else 0.0
        bound = manifest.golden_atol + manifest.golden_rtol * np.abs(want.astype(np.float64))
        if np.any(diff > bound):
            failures.append(
                f"{name}: max abs diff {diffs[name]:.3g} exceeds atol {manifest.golden_atol:g} "
                f"+ rtol {manifest.golden_rtol:g}"
            )
    if failures:
        raise GoldenMismatchError(
            f"golden cases do not reproduce on {runtime.name}: " + "; ".join(failures)
        )
    return diffs

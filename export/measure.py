"""Run `agent.probe` in a child process so figures belong to the model alone."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import TensorSpec

log = logging.getLogger(__name__)


class MeasureError(RuntimeError):
    """The child process failed to load or run the model."""


def _reason(stderr: str) -> str:
    """The child's own error line; the last line of a traceback if it crashed."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return lines[-1][-500:] if lines else "no error output"


def probe(
    model_path: Path,
    runtime: str,
    inputs: dict[str, np.ndarray],
    input_specs: tuple[TensorSpec, ...],
    output_specs: tuple[TensorSpec, ...],
    threads: int = 1,
    runs: int = 50,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Measure in a fresh interpreter; return (figures, outputs on `inputs`)."""
    with tempfile.TemporaryDirectory(prefix="edgerun-probe-") as tmp:
        t = Path(tmp)
        np.savez(t / "inputs.npz", **inputs)  # type: ignore[arg-type]
        (t / "spec.json").write_text(
            json.dumps(
                {
                    "inputs": [s.to_json() for s in input_specs],
                    "outputs": [s.to_json() for s in output_specs],
                }
            )
        )
        cmd = [
            sys.executable, "-m", "agent.probe",
            "--runtime", runtime, "--model", str(model_path),
            "--spec", str(t / "spec.json"), "--inputs", str(t / "inputs.npz"),
            "--threads", str(threads), "--runs", str(runs),
            "--save-outputs", str(t / "outputs.npz"),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise MeasureError(
                f"measuring {model_path.name} with {runtime} failed "
                f"(exit {proc.returncode}): {_reason(proc.stderr)}"
            )
        figures: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(t / "outputs.npz", allow_pickle=False) as data:
            outputs = {k: data[k] for k in data.files}
    log.info(
        "%s on %s: p50 %.3f ms, model peak %.1f MB",
        model_path.name,
        runtime,
        figures["latency_ms"]["p50"],
        figures["model_peak_mb"],
    )
    return figures, outputs


def measure_latency(
    model_path: Path,
    runtime: str,
    inputs: dict[str, np.ndarray],
    input_specs: tuple[TensorSpec, ...],
    output_specs: tuple[TensorSpec, ...],
    threads: int = 1,
    runs: int = 50,
) -> dict[str, Any]:
    figures, _ = probe(model_path, runtime, inputs, input_specs, output_specs, threads, runs)
    latency: dict[str, Any] = figures["latency_ms"]
    return latency

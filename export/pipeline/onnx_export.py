"""Export to ONNX with a dynamic batch axis, as one file, and prove parity with PyTorch.

Uses the TorchScript-based exporter (dynamo=False): it needs no onnxscript, is
what Optimum uses for BERT-style models, and handles data-dependent Python in
forward() by tracing. The exported model is run with onnxruntime on held-out
rows and compared output by output with the PyTorch model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from export.pipeline.errors import ExportFailedError, ParityError
from export.pipeline.loader import Split
from export.pipeline.recipe import TensorDecl
from export.pipeline.runners import run_onnx
from export.pipeline.torchrun import as_tensors, predict

log = logging.getLogger(__name__)


def export_onnx(
    model: torch.nn.Module,
    sample: Split,
    inputs: Sequence[TensorDecl],
    outputs: Sequence[str],
    path: Path,
    opset: int,
) -> Path:
    names = [t.name for t in inputs]
    # Every -1 in the recipe's shapes becomes a named dynamic axis (batch, sequence...).
    dynamic: dict[str, dict[int, str]] = {
        t.name: {i: ("batch" if i == 0 else f"{t.name}_dim{i}")
                 for i, d in enumerate(t.shape) if d == -1}
        for t in inputs
    }  # fmt: skip
    for name in outputs:
        dynamic[name] = {0: "batch"}
    args = as_tensors(sample.take(2).inputs, names)
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow
            torch.onnx.export(
                model, args, str(path), input_names=names, output_names=list(outputs),
                dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True,
            )  # fmt: skip
    except Exception as exc:
        raise ExportFailedError(
            f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:500]}"
        ) from exc
    check_single_file(path)
    log.info("exported %s (%d bytes, opset %d)", path.name, path.stat().st_size, opset)
    return path


def check_single_file(path: Path) -> None:
    """A bundle carries one model file: refuse ONNX with external data."""
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]  # fmt: skip
    if external:
        raise ExportFailedError(
            f"{path.name} keeps {len(external)} tensors in external files; bundles need one "
            "file under 2 GB"
        )


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path,
    held_out: Split,
    input_names: Sequence[str],
    output_names: Sequence[str],
    atol: float,
    batch_size: int,
    stage: str = "onnx float",
) -> dict[str, float]:
    """Max abs diff per output; raises ParityError when any exceeds atol."""
    ref = predict(model, held_out, input_names, output_names, batch_size)
    got = run_onnx(onnx_path, held_out.inputs, batch_size=batch_size)
    diffs = {name: float(np.max(np.abs(got[name].astype(np.float64) - ref[name])))
             for name in output_names}  # fmt: skip
    log.info("parity %s: %s", stage, diffs)
    if any(not np.isfinite(d) or d > atol for d in diffs.values()):
        raise ParityError(stage, diffs, atol)
    return diffs

"""Accuracy-driven mixed precision: keep the layers INT8 hurts most in float.

When a static INT8 model breaks the gate, each quantizable node is quantized on its
own (`nodes_to_quantize = [node]`, everything else float) and its error against the
float model is measured on the calibration rows: that is the node's sensitivity.
Then the most sensitive nodes are kept in float (`nodes_to_exclude`), one more at a
time, until the gate passes or `max_float` of the quantizable nodes are float (past
that the INT8 speed gain is gone). Every step is recorded for the report.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from export.pipeline.loader import Split
from export.pipeline.quantize import QuantizeConfig, quantize_onnx

log = logging.getLogger(__name__)

# Node types whose quantization changes numbers (weights or activations). Shape ops
# (Reshape, Transpose...) are quantized only around these and are not searched.
SEARCHED_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "MaxPool",
    "AveragePool", "GlobalAveragePool", "ReduceMean", "Concat", "Sigmoid", "Softmax",
    "LeakyRelu", "Gather", "Where", "Split", "Resize", "InstanceNormalization",
    "LayerNormalization",
})  # fmt: skip


@dataclass
class MixedResult:
    path: Path | None  # the mixed model (None: the gate never passed)
    kept_float: list[str]
    sensitivity: list[dict[str, Any]]  # [{"node", "op", "error"}], most sensitive first
    steps: list[dict[str, Any]] = field(default_factory=list)
    passed: bool = False
    quantizable: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"kept_float": self.kept_float, "sensitivity": self.sensitivity,
                "steps": self.steps, "passed": self.passed, "quantizable": self.quantizable}  # fmt: skip


def quantizable_nodes(path: Path, operators: Sequence[str] = ()) -> list[tuple[str, str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = set(operators) or SEARCHED_OPS
    return [(n.name, n.op_type) for n in graph.node if n.op_type in ops and n.name]


def _relative_error(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    """Mean |q - f| over mean |f|, the worst output."""
    worst = 0.0
    for name, f in ref.items():
        scale = float(np.mean(np.abs(f))) or 1.0
        worst = max(worst, float(np.mean(np.abs(got[name] - f))) / scale)
    return worst


def search(
    float_path: Path,
    out_path: Path,
    cfg: QuantizeConfig,
    calibration: Split,
    run: Callable[[Path, Split], dict[str, np.ndarray]],
    evaluate: Callable[[Path], tuple[float, bool]],
    max_float: float,
) -> MixedResult:
    """`run(model, split)` gives outputs; `evaluate(model)` gives (metric, gate passed)."""
    from export.pipeline.quantize import _preprocess

    with tempfile.TemporaryDirectory(prefix="edgerun-mixed-") as tmp:
        work = Path(tmp)
        # Node names as the quantizer sees them (after the same pre-processing).
        pre = _preprocess(float_path, work / "pre.onnx")
        nodes = quantizable_nodes(pre, cfg.operators)
        ref = run(pre, calibration)
        sens: list[dict[str, Any]] = []
        for name, op in nodes:
            one = work / "one.onnx"
            quantize_onnx(pre, one, replace(cfg, nodes_to_quantize=(name,)), calibration)
            err = _relative_error(run(one, calibration), ref)
            sens.append({"node": name, "op": op, "error": round(err, 6)})
            log.info("mixed precision: %s (%s) alone: relative error %.4g", name, op, err)
        sens.sort(key=lambda s: -float(s["error"]))
        result = MixedResult(None, [], sens, quantizable=len(nodes))
        limit = int(max_float * len(nodes))
        for k in range(1, limit + 1):
            kept = [s["node"] for s in sens[:k]]
            step_path = work / f"mixed-{k}.onnx"
            quantize_onnx(pre, step_path, replace(cfg, nodes_to_exclude=tuple(kept)), calibration)
            metric, passed = evaluate(step_path)
            result.steps.append({"kept_float": kept, "metric": metric, "passed": passed})
            log.info("mixed precision: %d node(s) float -> %.4f (%s)", k, metric,
                     "pass" if passed else "fail")  # fmt: skip
            if passed:
                step_path.replace(out_path)
                result.path, result.kept_float, result.passed = out_path, kept, True
                break
    return result

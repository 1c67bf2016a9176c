"""Accuracy-driven mixed precision: keep the layers INT8 hurts most in float.

When a static INT8 model breaks the gate, each quantizable node is quantized on its
own (`nodes_to_quantize = [node]`, everything else float) and its error against the
float model is measured on the calibration rows: that is the node's sensitivity.
Then the most sensitive nodes are kept in float (`nodes_to_exclude`), one more at a
time, until the gate passes, or the latency gain is gone (each step's p50 measured as
the build measures its candidates: float p50 / mix p50 below `min_speedup`), or
`max_float` of the quantizable nodes are float. Every step is recorded for the
report, with what ended the search (`ended`).
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
from export.pipeline.quantize import QuantizeConfig, preprocess, quantize_onnx

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
    # What ended the search: ENDED_GATE, ENDED_LATENCY or ENDED_LIMIT.
    ended: str = ""
    float_latency_ms: float | None = None  # the float model's p50, the latency baseline
    min_speedup: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"kept_float": self.kept_float, "sensitivity": self.sensitivity,
                "steps": self.steps, "passed": self.passed, "quantizable": self.quantizable,
                "ended": self.ended, "float_latency_ms": self.float_latency_ms,
                "min_speedup": self.min_speedup}  # fmt: skip


ENDED_GATE = "gate passed"
ENDED_LATENCY = "latency gain gone"
ENDED_LIMIT = "mixed_max_float reached"


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
    latency: Callable[[Path], float] | None = None,
    min_speedup: float = 1.0,
) -> MixedResult:
    """`run(model, split)` gives outputs; `evaluate(model)` gives (metric, gate passed);
    `latency(model)` its p50 in ms (None: latency is not measured and never ends it)."""
    with tempfile.TemporaryDirectory(prefix="edgerun-mixed-") as tmp:
        work = Path(tmp)
        # Pre-processed once: node names as the quantizer sees them, and every
        # quantize_onnx below starts from this model instead of pre-processing again.
        pre = preprocess(float_path, work / "pre.onnx")
        nodes = quantizable_nodes(pre, cfg.operators)
        ref = run(pre, calibration)
        sens: list[dict[str, Any]] = []
        for name, op in nodes:
            one = work / "one.onnx"
            quantize_onnx(pre, one, replace(cfg, nodes_to_quantize=(name,)), calibration,
                          preprocessed=True)  # fmt: skip
            err = _relative_error(run(one, calibration), ref)
            sens.append({"node": name, "op": op, "error": round(err, 6)})
            log.info("mixed precision: %s (%s) alone: relative error %.4g", name, op, err)
        sens.sort(key=lambda s: -float(s["error"]))
        result = MixedResult(None, [], sens, quantizable=len(nodes), min_speedup=min_speedup)
        if latency is not None:
            result.float_latency_ms = round(latency(float_path), 4)
        limit = int(max_float * len(nodes))
        result.ended = ENDED_LIMIT
        for k in range(1, limit + 1):
            kept = [s["node"] for s in sens[:k]]
            step_path = work / f"mixed-{k}.onnx"
            quantize_onnx(pre, step_path, replace(cfg, nodes_to_exclude=tuple(kept)), calibration,
                          preprocessed=True)  # fmt: skip
            metric, passed = evaluate(step_path)
            step: dict[str, Any] = {"kept_float": kept, "metric": metric, "passed": passed}
            result.steps.append(step)
            if result.float_latency_ms is not None and latency is not None:
                p50 = latency(step_path)
                speedup = result.float_latency_ms / p50 if p50 > 0 else float("inf")
                step["latency_ms"], step["speedup"] = round(p50, 4), round(speedup, 3)
                if speedup < min_speedup:
                    # More float nodes only take more of the INT8 gain away: stop here,
                    # and a mix that passed but is no faster is no candidate either.
                    log.info("mixed precision: %d node(s) float -> %.4f, %.3gx the float "
                             "model's speed (< %.3g): the latency gain is gone", k, metric,
                             speedup, min_speedup)  # fmt: skip
                    result.ended = ENDED_LATENCY
                    break
            log.info("mixed precision: %d node(s) float -> %.4f (%s)", k, metric,
                     "pass" if passed else "fail")  # fmt: skip
            if passed:
                step_path.replace(out_path)
                result.path, result.kept_float, result.passed = out_path, kept, True
                result.ended = ENDED_GATE
                break
    return result

"""A real ONNX model whose activations dwarf its inputs, for memory-under-load tests.

The sample digits model needs a few KB per row, so no request of it can push the
agent near a cap. This one takes [-1, 96, 100] float32 (37.5 KiB a row: 128 rows are
a 4.9 MB binary body, as in issue 7) and expands every value 8 times before
reducing, so each row costs about 0.6 MB of runtime activations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import write_bundle

ROW_SHAPE = (96, 100)
EXPAND = 8
NAME = "wide"


def build_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, *ROW_SHAPE])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, ROW_SHAPE[0]])
    nodes = [
        helper.make_node("Unsqueeze", ["input", "axis_last"], ["x4"]),
        helper.make_node("Expand", ["x4", "wide_shape"], ["wide"]),
        helper.make_node("Mul", ["wide", "scale"], ["scaled"]),
        helper.make_node("ReduceSum", ["scaled", "axis_last"], ["summed"], keepdims=0),
        helper.make_node("ReduceMean", ["summed", "axis_last"], ["score"], keepdims=0),
    ]
    scale = np.linspace(0.5, 1.5, EXPAND, dtype=np.float32)
    inits = [
        helper.make_tensor("axis_last", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("wide_shape", TensorProto.INT64, [4], [1, 1, 1, EXPAND]),
        helper.make_tensor("scale", TensorProto.FLOAT, [EXPAND], scale.tolist()),
    ]
    graph = helper.make_graph(nodes, NAME, [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *ROW_SHAPE), dtype=np.float32)


def expected(x: np.ndarray) -> np.ndarray:
    scale = np.linspace(0.5, 1.5, EXPAND, dtype=np.float32)
    return (x.astype(np.float64) * float(scale.sum())).mean(axis=-1).astype(np.float32)


def make_wide_bundle(
    workdir: Path,
    key: Ed25519PrivateKey,
    version: str = "1.0.0",
    peak_memory_mb: float = 8.0,
    golden_rows: int = 4,
    zeros: bool = False,
    out: Path | None = None,
) -> Path:
    """A signed bundle of the wide model; `peak_memory_mb` is what its manifest claims.
    With `zeros` the golden rows are zeros, compressed: many rows in a small bundle."""
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(workdir / "model.onnx")
    x = np.zeros((golden_rows, *ROW_SHAPE), np.float32) if zeros else rows(golden_rows)
    np.savez_compressed(workdir / "inputs.npz", input=x)
    np.savez_compressed(workdir / "outputs-onnx.npz", score=expected(x))
    body: dict[str, Any] = {
        "name": NAME,
        "version": version,
        "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, *ROW_SHAPE]}],
        "outputs": [{"name": "score", "dtype": "float32", "shape": [-1, ROW_SHAPE[0]]}],
        "labels": [],
        "formats": {"onnx": "model.onnx"},
        "golden": {
            "inputs": "golden/inputs.npz",
            "outputs": {"onnx": "golden/outputs-onnx.npz"},
            "tolerance": {"atol": 1e-3, "rtol": 1e-4},
        },
        "figures": {"peak_memory_mb": {"onnxruntime": peak_memory_mb}},
    }
    files = {
        "model.onnx": model,
        "golden/inputs.npz": workdir / "inputs.npz",
        "golden/outputs-onnx.npz": workdir / "outputs-onnx.npz",
    }
    target = out or workdir / f"{NAME}-{version}.edgebundle"
    return write_bundle(target, json.loads(json.dumps(body)), files, key)

"""A real ONNX model whose weights take 8 MB: a leaked copy per swap shows in RSS.

The digits sample is so small (150 KB of weights) that 40 leaked sessions of it stay
under a MB; a swap test built on it could not catch a reload leak. This one is one
MatMul by a [512, 4096] float32 initializer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import write_bundle

NAME = "heavy"
IN, OUT = 512, 4096


def weights() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((IN, OUT), dtype=np.float32) / 32


def rows(n: int) -> np.ndarray:
    return np.random.default_rng(1).random((n, IN), dtype=np.float32)


def build_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, IN])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, OUT])
    w = numpy_helper.from_array(weights(), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["out"])], NAME,
                              [x], [y], initializer=[w])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_heavy_bundle(workdir: Path, key: Ed25519PrivateKey, version: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "model.onnx"
    if not model.exists():
        build_model(model)
    x = rows(4)
    np.savez_compressed(workdir / "inputs.npz", input=x)
    want = (x.astype(np.float64) @ weights().astype(np.float64)).astype(np.float32)
    np.savez_compressed(workdir / "outputs-onnx.npz", out=want)
    body: dict[str, Any] = {
        "name": NAME,
        "version": version,
        "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, IN]}],
        "outputs": [{"name": "out", "dtype": "float32", "shape": [-1, OUT]}],
        "labels": [],
        "formats": {"onnx": "model.onnx"},
        "golden": {
            "inputs": "golden/inputs.npz",
            "outputs": {"onnx": "golden/outputs-onnx.npz"},
            "tolerance": {"atol": 1e-3, "rtol": 1e-3},
        },
        "figures": {"peak_memory_mb": {"onnxruntime": 40.0}},
    }
    files = {
        "model.onnx": model,
        "golden/inputs.npz": workdir / "inputs.npz",
        "golden/outputs-onnx.npz": workdir / "outputs-onnx.npz",
    }
    return write_bundle(workdir / f"{NAME}-{version}.edgebundle", json.loads(json.dumps(body)),
                        files, key)  # fmt: skip

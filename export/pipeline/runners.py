"""Run exported models on the build machine with the runtimes devices use.

Evaluation runs in-process (fast, whole splits); the per-candidate latency that
gates and selection use is measured in a child process by `export.measure`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def onnx_session(path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(
    path: Path, inputs: Mapping[str, np.ndarray], batch_size: int = 256, threads: int = 1
) -> dict[str, np.ndarray]:
    session = onnx_session(path, threads)
    names = [o.name for o in session.get_outputs()]
    n = next(iter(inputs.values())).shape[0]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, n, batch_size):
        feed = {k: v[start : start + batch_size] for k, v in inputs.items()}
        for i, out in enumerate(session.run(names, feed)):
            parts[i].append(np.asarray(out))
    return {name: np.concatenate(p) for name, p in zip(names, parts, strict=True)}


class TfliteRunner:
    """LiteRT interpreter for a model whose batch axis the converter froze.

    Larger requests run in slices of the model's batch (the last slice padded),
    as the device agent does.
    """

    def __init__(self, path: Path, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=str(path), num_threads=threads)
        self.interp.allocate_tensors()
        self.ins = sorted(self.interp.get_input_details(), key=lambda d: d["index"])
        self.outs = sorted(self.interp.get_output_details(), key=lambda d: d["index"])
        self.batch = int(self.ins[0]["shape"][0])

    def _one(self, feed: list[np.ndarray]) -> list[np.ndarray]:
        for detail, value in zip(self.ins, feed, strict=True):
            self.interp.set_tensor(detail["index"], _quantize(value, detail))
        self.interp.invoke()
        return [_dequantize(self.interp.get_tensor(d["index"]), d) for d in self.outs]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        n = inputs[0].shape[0]
        parts: list[list[np.ndarray]] = [[] for _ in self.outs]
        for start in range(0, n, self.batch):
            chunk = [v[start : start + self.batch] for v in inputs]
            short = self.batch - chunk[0].shape[0]
            if short:
                chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
            for i, out in enumerate(self._one(chunk)):
                parts[i].append(out[: self.batch - short])
        return [np.concatenate(p) for p in parts]


def run_tflite(
    path: Path, inputs: Mapping[str, np.ndarray], input_order: list[str], output_names: list[str],
    threads: int = 1,
) -> dict[str, np.ndarray]:  # fmt: skip
    """TFLite renames tensors on conversion, so the recipe's order is the contract."""
    runner = TfliteRunner(path, threads)
    outs = runner.run([inputs[n] for n in input_order])
    return dict(zip(output_names, outs, strict=True))


def _quantize(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if array.dtype == dtype:
        return array
    scale, zero = detail.get("quantization", (0.0, 0))
    if dtype in (np.int8, np.uint8) and scale:
        info = np.iinfo(dtype)
        q: np.ndarray = np.clip(np.round(array / scale + zero), info.min, info.max).astype(dtype)
        return q
    converted: np.ndarray = array.astype(dtype)
    return converted


def _dequantize(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = detail.get("quantization", (0.0, 0))
    if array.dtype in (np.int8, np.uint8) and scale:
        real: np.ndarray = ((array.astype(np.float32) - zero) * scale).astype(np.float32)
        return real
    return array

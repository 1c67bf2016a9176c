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
    """A TFLite model run by the agent's own LiteRT runtime, so evaluation sees exactly
    what a device does (frozen-batch slicing, int8 quantize/dequantize).

    Inputs and outputs are positional, in tensor-index order: converters rename them.
    """

    def __init__(self, path: Path, threads: int = 1) -> None:
        from agent.runtimes.litert import LiteRTConfig, LiteRTRuntime
        from export.package import batch_on_axis_0, tflite_specs

        # A recipe's tensors count cases on axis 0 (TensorDecl); the converter froze that
        # axis, so it is declared dynamic here and the runtime runs slices of the frozen size.
        inputs, outputs = (batch_on_axis_0(specs) for specs in tflite_specs(path))
        self.runtime = LiteRTRuntime(path, inputs, outputs, LiteRTConfig(threads=threads))
        self.interp = self.runtime.interpreter
        index = {d["name"]: d["index"] for d in self.interp.get_input_details()}
        index.update({d["name"]: d["index"] for d in self.interp.get_output_details()})
        self.in_names = sorted((s.name for s in inputs), key=index.__getitem__)
        self.out_names = sorted((s.name for s in outputs), key=index.__getitem__)
        first = self.interp.get_input_details()[0]
        self.batch = self.runtime.fixed_batch or int(first["shape"][0])

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        out = self.runtime.run(dict(zip(self.in_names, inputs, strict=True)))
        return [out[name] for name in self.out_names]


def run_tflite(
    path: Path, inputs: Mapping[str, np.ndarray], input_order: list[str], output_names: list[str],
    threads: int = 1,
) -> dict[str, np.ndarray]:  # fmt: skip
    """TFLite renames tensors on conversion, so the recipe's order is the contract."""
    runner = TfliteRunner(path, threads)
    outs = runner.run([inputs[n] for n in input_order])
    return dict(zip(output_names, outs, strict=True))

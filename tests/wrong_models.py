"""Wrong models made from right ones, for the golden rule to refuse (real ONNX graphs)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def swapped_labels(model: onnx.ModelProto, a: int = 0, b: int = 1) -> onnx.ModelProto:
    """The same network answering label b for a and a for b: its output columns swapped."""
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    graph = wrong.graph
    out = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}__unswapped" if o == out else o for o in node.output]
    order = list(range(graph.output[0].type.tensor_type.shape.dim[1].dim_value))
    order[a], order[b] = order[b], order[a]
    graph.initializer.append(numpy_helper.from_array(np.array(order, np.int64), "swap_order"))
    graph.node.append(
        helper.make_node("Gather", [f"{out}__unswapped", "swap_order"], [out], axis=1)
    )
    return wrong


def perturbed_int8(model: onnx.ModelProto, levels: int, seed: int = 0) -> onnx.ModelProto:
    """Half of every int8 weight moved by up to `levels` quantization levels."""
    rng = np.random.default_rng(seed)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    dequantized = {n.input[0] for n in wrong.graph.node if n.op_type == "DequantizeLinear"}
    changed = 0
    for tensor in wrong.graph.initializer:
        if (
            tensor.name in dequantized
            and tensor.data_type == onnx.TensorProto.INT8
            and len(tensor.dims) > 1
        ):
            w = numpy_helper.to_array(tensor).astype(np.int32)
            noise = rng.integers(-levels, levels + 1, w.shape) * (rng.random(w.shape) < 0.5)
            w = np.clip(w + noise, -127, 127).astype(np.int8)
            tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
            changed += 1
    assert changed >= 3, "the sample's INT8 model has three weighted layers"
    return wrong


def perturbed_float(model: onnx.ModelProto, share: float, seed: int = 0) -> onnx.ModelProto:
    """Every float weight matrix plus Gaussian noise of `share` of its own spread."""
    rng = np.random.default_rng(seed)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    for tensor in wrong.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) > 1:
            w = numpy_helper.to_array(tensor)
            w = (w + rng.normal(0, share * float(w.std()), w.shape)).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    return wrong

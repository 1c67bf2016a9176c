"""Make the example bring-your-own model: an MLP trained with scikit-learn, written as ONNX.

    python models/byo/make_model.py      # writes models/byo/model.onnx

It stands for "a model someone already has as ONNX": no torch is involved, the
graph is built directly with onnx.helper (Gemm -> Relu -> Gemm).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from byo_data import load_splits
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier


def build(out: Path) -> Path:
    splits = load_splits()
    x, y = splits["train"]["inputs"], splits["train"]["labels"]
    mlp = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, random_state=0).fit(x, y)
    w1, w2 = (w.astype(np.float32) for w in mlp.coefs_)
    b1, b2 = (b.astype(np.float32) for b in mlp.intercepts_)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"]),
        ],
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                    (b2, "b2"))],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


if __name__ == "__main__":
    print(build(Path(__file__).resolve().parent / "model.onnx"))

"""Real candidate models for the trial and shadow tests: the digits model with a fault.

Each candidate is the sample's ONNX graph with a few nodes added after its logits, so
it answers like the served model except where its fault strikes. Faults strike only
on inputs chosen by value (a pixel sum above or below a threshold), and the bundle's
golden cases are inputs that do not trigger it, with the candidate's own answers as
golden outputs: the candidate passes every validation rule and breaks on live traffic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits

from agent.bundle import write_bundle
from agent.errors import ServingError
from agent.serving import ModelHost
from tests.helpers import SampleParts

Fault = Callable[[onnx.GraphProto, float], None]


def digits(classes: tuple[int, ...] = tuple(range(10))) -> np.ndarray:
    """sklearn's 8x8 digits of the given classes, as the bundle's [N, 1, 8, 8] input."""
    data = load_digits()
    keep = np.isin(data.target, classes)
    return (data.images[keep].astype(np.float32) / 16.0)[:, None, :, :]


def pixel_sums(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).sum(axis=1)


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _sums(graph: onnx.GraphProto) -> str:
    axes = _const(graph, "f_axes", np.array([1, 2, 3], np.int64))
    graph.node.append(helper.make_node("ReduceSum", ["input", axes], ["f_sum"], keepdims=0))
    return "f_sum"


def _add_zero_times(graph: onnx.GraphProto, column: str) -> None:
    """logits = raw + 0 * column ([N, 1]): the answer is the model's own unless the
    column is NaN (then NaN), and the column's work cannot be optimized away."""
    zero = _const(graph, "f_zero", np.zeros((), np.float32))
    graph.node.append(helper.make_node("Mul", [column, zero], ["f_zeroed"]))
    graph.node.append(helper.make_node("Add", ["raw", "f_zeroed"], ["logits"]))


def nan_below(graph: onnx.GraphProto, threshold: float) -> None:
    """NaN logits for inputs whose pixel sum is below `threshold` (sqrt of a negative)."""
    s = _sums(graph)
    t = _const(graph, "f_t", np.array(threshold, np.float32))
    one = _const(graph, "f_one", np.array([1], np.int64))
    graph.node.append(helper.make_node("Sub", [s, t], ["f_d"]))
    graph.node.append(helper.make_node("Sqrt", ["f_d"], ["f_root"]))
    graph.node.append(helper.make_node("Unsqueeze", ["f_root", one], ["f_col"]))
    _add_zero_times(graph, "f_col")


def fails_above(graph: onnx.GraphProto, threshold: float) -> None:
    """An out-of-range Gather (a runtime error) for inputs whose pixel sum is above it."""
    s = _sums(graph)
    t = _const(graph, "f_t", np.array(threshold, np.float32))
    table = _const(graph, "f_table", np.zeros((1,), np.float32))
    one = _const(graph, "f_one", np.array([1], np.int64))
    graph.node.append(helper.make_node("Greater", [s, t], ["f_over"]))
    graph.node.append(helper.make_node("Cast", ["f_over"], ["f_idx"], to=TensorProto.INT64))
    graph.node.append(helper.make_node("Gather", [table, "f_idx"], ["f_g"], axis=0))
    graph.node.append(helper.make_node("Unsqueeze", ["f_g", one], ["f_col"]))
    _add_zero_times(graph, "f_col")


def slow(graph: onnx.GraphProto, matmuls: float) -> None:
    """`matmuls` chained [1, 512] x [512, 512] products (an orthogonal matrix, so the
    values stay finite) on every request: real work, the same answer, many times slower."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((512, 512)))
    shape = _const(graph, "f_shape", np.array([-1, 64], np.int64))
    w1 = _const(graph, "f_w1", (rng.standard_normal((64, 512)) / 8).astype(np.float32))
    w = _const(graph, "f_w", q.astype(np.float32))
    axes = _const(graph, "f_axes1", np.array([1], np.int64))
    graph.node.append(helper.make_node("Reshape", ["input", shape], ["f_rows"]))
    # The mean over the batch: the same work whatever the rows (validation probes
    # run big batches; the cost that matters is per request).
    graph.node.append(helper.make_node("ReduceMean", ["f_rows"], ["f_flat"], axes=[0], keepdims=1))
    graph.node.append(helper.make_node("MatMul", ["f_flat", w1], ["f_a0"]))
    for i in range(int(matmuls)):
        graph.node.append(helper.make_node("MatMul", [f"f_a{i}", w], [f"f_a{i + 1}"]))
    graph.node.append(
        helper.make_node("ReduceSum", [f"f_a{int(matmuls)}", axes], ["f_col"], keepdims=1)
    )
    _add_zero_times(graph, "f_col")


def permuted(graph: onnx.GraphProto, shift: float) -> None:
    """Logits rolled by `shift` classes: well-formed answers, the wrong class."""
    perm = _const(graph, "f_perm", (np.arange(10, dtype=np.int64) + int(shift)) % 10)
    graph.node.append(helper.make_node("Gather", ["raw", perm], ["logits"], axis=1))


def grows_above(graph: onnx.GraphProto, threshold: float) -> None:
    """For inputs whose pixel sum is above `threshold`, a 16 MiB scratch tensor per
    pixel of excess, filled and reduced: the runtime's arena grows and keeps it."""
    s = _sums(graph)
    t = _const(graph, "f_t", np.array(threshold, np.float32))
    per = _const(graph, "f_per", np.array(4 << 20, np.float32))  # float32 elements
    first = _const(graph, "f_first", np.array([0], np.int64))
    one = _const(graph, "f_one", np.array([1], np.int64))
    graph.node.append(helper.make_node("Sub", [s, t], ["f_d"]))
    graph.node.append(helper.make_node("Relu", ["f_d"], ["f_excess"]))
    graph.node.append(helper.make_node("Ceil", ["f_excess"], ["f_units"]))
    graph.node.append(helper.make_node("Mul", ["f_units", per], ["f_n"]))
    graph.node.append(helper.make_node("ReduceMax", ["f_n"], ["f_nmax"], keepdims=1))
    graph.node.append(helper.make_node("Cast", ["f_nmax"], ["f_len"], to=TensorProto.INT64))
    graph.node.append(
        helper.make_node(
            "ConstantOfShape",
            ["f_len"],
            ["f_big"],
            value=numpy_helper.from_array(np.ones((1,), np.float32)),
        )
    )
    graph.node.append(helper.make_node("ReduceSum", ["f_big"], ["f_total"], keepdims=1))
    graph.node.append(helper.make_node("Gather", ["f_total", first], ["f_one_value"], axis=0))
    graph.node.append(helper.make_node("Unsqueeze", ["f_one_value", one], ["f_col"]))
    # f_col is [1, 1]: broadcast over the batch.
    _add_zero_times(graph, "f_col")


def faulty_model(base: Path, fault: Fault | None, arg: float, out: Path) -> Path:
    model = onnx.load(base)
    graph = model.graph
    if fault is not None:
        for node in graph.node:
            node.output[:] = ["raw" if o == "logits" else o for o in node.output]
        fault(graph, arg)
    onnx.checker.check_model(model)
    onnx.save(model, out)
    return out


@dataclass
class Candidate:
    bundle: Path
    model: Path


def build_candidate(
    parts: SampleParts,
    key: Ed25519PrivateKey,
    work: Path,
    version: str,
    fault: Fault | None = None,
    arg: float = 0.0,
    golden: np.ndarray | None = None,
) -> Candidate:
    """A signed bundle of the digits model with `fault(graph, arg)` applied; its golden
    cases are `golden` (inputs that do not trigger the fault) and its own answers."""
    work.mkdir(parents=True, exist_ok=True)
    model = faulty_model(parts.directory / "model.onnx", fault, arg, work / "model.onnx")
    if golden is None:
        with np.load(parts.directory / "golden/inputs.npz") as data:
            golden = data["input"]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": golden})
    assert np.isfinite(logits).all(), "golden inputs must not trigger the fault"
    np.savez(work / "inputs.npz", input=golden)
    np.savez(work / "outputs-onnx.npz", logits=logits)
    body = parts.body(
        version=version,
        formats={"onnx": "model.onnx"},
        golden={
            "inputs": "golden/inputs.npz",
            "outputs": {"onnx": "golden/outputs-onnx.npz"},
            "tolerance": {"atol": 1e-3, "rtol": 1e-3},
        },
    )
    body["figures"] = {
        k: v for k, v in body.get("figures", {}).items() if k not in ("peak_memory_mb",)
    }
    files = {
        "model.onnx": model,
        "golden/inputs.npz": work / "inputs.npz",
        "golden/outputs-onnx.npz": work / "outputs-onnx.npz",
    }
    bundle = write_bundle(work / f"digits-{version}.edgebundle", body, files, key)
    return Candidate(bundle, model)


@dataclass
class LiveTraffic:
    """Client threads sending single-image requests through ModelHost.infer."""

    host: ModelHost
    images: np.ndarray
    threads: int = 2
    pause_s: float = 0.002
    answered: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            i = int(rng.integers(len(self.images)))
            try:
                self.host.infer("digits", {"input": self.images[i : i + 1]})
            except ServingError as exc:
                with self._lock:
                    self.failed[exc.code] = self.failed.get(exc.code, 0) + 1
            else:
                with self._lock:
                    self.answered += 1
            self._stop.wait(self.pause_s)

    @contextmanager
    def running(self) -> Iterator[LiveTraffic]:
        workers = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(self.threads)
        ]
        for t in workers:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in workers:
                t.join(timeout=30)

"""Helpers shared by the benchmarks: a model of ~1 ms, an agent process, percentiles."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "models/digits/digits-1.0.0.edgebundle"
DEMO_KEY = ROOT / "models/keys/demo-INSECURE.key"
DEMO_PUB = ROOT / "models/keys/demo-INSECURE.pub"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def build_mlp_onnx(path: Path, width: int = 1024, layers: int = 8, seed: int = 0) -> Path:
    """A plain MLP (MatMul+Add+Relu) whose batch-1 latency is about 1 ms on one core."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "input"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        b = np.zeros(width, np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"] if i < layers - 1 else ["output"]),
        ]
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def build_frame_onnx(path: Path, height: int | str, width: int | str) -> Path:
    """A camera-frame model: uint8 [batch, H, W, 3] -> per-channel mean [batch, 3] of
    every 4th pixel of every 4th row (a thumbnail's statistics).

    About 1 ms for a 1920x1080 frame, so a round trip shows how the frame gets to the
    runtime (the mean of every pixel costs ~15 ms on this kind of machine, and would
    hide it). A str height/width makes that dimension dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, values: list[int]) -> onnx.NodeProto:
        tensor = numpy_helper.from_array(np.array(values, np.int64), name)
        return helper.make_node("Constant", [], [name], value=tensor)

    graph = helper.make_graph(
        [
            const("starts", [0, 0]), const("ends", [1 << 30, 1 << 30]),
            const("axes", [1, 2]), const("steps", [4, 4]),
            helper.make_node("Slice", ["image", "starts", "ends", "axes", "steps"], ["thumb"]),
            helper.make_node("Cast", ["thumb"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2], keepdims=0),
        ],
        "frame",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", height, width, 3])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def package_mlp(out_dir: Path) -> Path:
    from export.package import package_model

    onnx_path = build_mlp_onnx(out_dir / "mlp.onnx")
    x = np.random.default_rng(1).standard_normal((4, 1024)).astype(np.float32)
    return package_model(
        onnx_path=onnx_path, tflite_path=None, name="mlp", version="1.0.0",
        golden_inputs={"input": x}, key_path=DEMO_KEY, out_dir=out_dir, runs=20,
    )  # fmt: skip


@contextlib.contextmanager
def agent_process(
    bundle: Path | None,
    extra: str = "",
    env: dict[str, str] | None = None,
    api: str = "",
    model: str = "",
) -> Iterator[tuple[subprocess.Popen[bytes], Path, float]]:
    """Start `edge-agent run`; yield (process, socket, seconds from spawn to ready)."""
    from agent.api.client import ApiClient

    with tempfile.TemporaryDirectory(prefix="er-bench-", dir="/tmp") as tmp:
        t = Path(tmp)
        sock = t / "api.sock"
        model = f'[model]\nbundle = "{bundle}"\n{model}\n' if bundle else ""
        (t / "agent.toml").write_text(
            f'state_dir = "{t / "state"}"\n[trust]\npublic_keys = ["{DEMO_PUB}"]\n'
            f'[api]\nsocket = "{sock}"\n{api}\n{model}{extra}'
        )
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(t / "agent.toml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=ROOT,  # this checkout's agent, not an installed one
        )
        ready = None
        while time.perf_counter() - start < 60:
            if sock.exists():
                with contextlib.suppress(OSError), ApiClient(str(sock), timeout=5) as c:
                    if c.request("GET", "/v2/health/live")[0] == 200 and (
                        bundle is None or c.request("GET", "/v2/health/ready")[0] == 200
                    ):
                        ready = time.perf_counter() - start
                        break
            time.sleep(0.002)
        if ready is None:
            proc.kill()
            raise SystemExit("agent did not become ready")
        try:
            yield proc, sock, ready
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

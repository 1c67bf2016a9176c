"""Runtimes: ONNX Runtime and LiteRT on the real sample model, behind one interface."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.batching import MicroBatcher
from agent.bundle import load_unpacked
from agent.config.model import RuntimesConfig
from agent.errors import InputMismatchError, TooLargeError
from agent.runtimes import REGISTRY, availability, choose_runtime, load_runtime
from agent.runtimes.base import ModelLoadError, RuntimeUnavailableError
from agent.runtimes.litert import LiteRTConfig, LiteRTRuntime
from agent.runtimes.ort import OrtConfig, OrtRuntime
from agent.tensors import validate_feeds
from tests.helpers import SampleParts, samples
from tests.tolerance import assert_close


def test_registry_has_one_module_per_runtime() -> None:
    assert set(REGISTRY) == {"onnxruntime", "litert"}
    assert availability() == {"onnxruntime": None, "litert": None}


def test_onnxruntime_and_litert_agree_on_the_sample(sample_parts: SampleParts) -> None:
    # The sample carries the pipeline's picks: an INT8 ONNX and a float TFLite of one
    # network, so they agree on the answers and differ by the quantization error.
    manifest = load_unpacked(sample_parts.directory)
    images, labels = samples()
    ort = load_runtime("onnxruntime", manifest, sample_parts.directory, RuntimesConfig())
    lite = load_runtime("litert", manifest, sample_parts.directory, RuntimesConfig())
    a = ort.run({"input": images})["logits"]
    b = lite.run({"input": images})["logits"]
    assert a.shape == b.shape == (len(labels), 10)
    assert (a.argmax(1) == b.argmax(1)).all() and (a.argmax(1) == labels).all()
    step = manifest.golden_tolerance.for_format("onnx").outputs["logits"].quant_step
    assert step is not None
    # Static INT8 of a three-layer CNN: a few output steps at most, never a wrong answer.
    assert float(np.abs(a - b).max()) < 16 * step
    assert (a.argmax(1) == labels).mean() >= 0.9


def test_litert_runs_batches_larger_than_its_fixed_batch(sample_parts: SampleParts) -> None:
    manifest = load_unpacked(sample_parts.directory)
    rt = LiteRTRuntime(
        sample_parts.directory / "model.tflite",
        manifest.inputs,
        manifest.outputs,
        LiteRTConfig(threads=2),
    )
    images, _ = samples()
    whole = rt.run({"input": images})["logits"]
    one_by_one = np.concatenate(
        [rt.run({"input": images[i : i + 1]})["logits"] for i in range(len(images))]
    )
    assert_close(whole, one_by_one)
    assert rt.describe()["threads"] == 2 and rt.describe()["xnnpack"] is True


def test_litert_without_xnnpack(sample_parts: SampleParts) -> None:
    manifest = load_unpacked(sample_parts.directory)
    rt = LiteRTRuntime(
        sample_parts.directory / "model.tflite",
        manifest.inputs,
        manifest.outputs,
        LiteRTConfig(xnnpack=False),
    )
    images, labels = samples()
    assert (rt.run({"input": images})["logits"].argmax(1) == labels).mean() >= 0.9


def test_ort_settings_are_applied(sample_parts: SampleParts) -> None:
    manifest = load_unpacked(sample_parts.directory)
    cfg = OrtConfig(
        intra_op_threads=1,
        inter_op_threads=1,
        graph_optimization="basic",
        cpu_mem_arena=False,
        execution_mode="parallel",
    )
    rt = OrtRuntime(sample_parts.directory / "model.onnx", manifest.inputs, manifest.outputs, cfg)
    info = rt.describe()
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["intra_op_threads"] == 1 and info["cpu_mem_arena"] is False
    images, labels = samples()
    assert (rt.run({"input": images})["logits"].argmax(1) == labels).mean() >= 0.9


def test_ort_spinning_is_off_by_default_and_can_be_turned_on(sample_parts: SampleParts) -> None:
    manifest = load_unpacked(sample_parts.directory)
    path = sample_parts.directory / "model.onnx"
    off = OrtRuntime(path, manifest.inputs, manifest.outputs, OrtConfig())
    options = off.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    on = OrtRuntime(path, manifest.inputs, manifest.outputs, OrtConfig(allow_spinning=True))
    on_options = on.session.get_session_options()
    assert on_options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert on.describe()["allow_spinning"] is True and off.describe()["allow_spinning"] is False
    images, labels = samples()
    assert (off.run({"input": images})["logits"].argmax(1) == labels).mean() >= 0.9


def test_ort_same_as_requested_arena(sample_parts: SampleParts) -> None:
    manifest = load_unpacked(sample_parts.directory)
    rt = OrtRuntime(
        sample_parts.directory / "model.onnx",
        manifest.inputs,
        manifest.outputs,
        OrtConfig(arena_extend_strategy="same_as_requested"),
    )
    images, _ = samples()
    assert rt.run({"input": images})["logits"].shape == (len(images), 10)


def test_model_that_does_not_match_its_manifest_is_refused(
    sample_parts: SampleParts, tmp: Path
) -> None:
    manifest = load_unpacked(sample_parts.directory)
    bad = tmp / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ModelLoadError, match="onnxruntime refused bad.onnx"):
        OrtRuntime(bad, manifest.inputs, manifest.outputs)
    with pytest.raises(ModelLoadError, match="LiteRT refused"):
        LiteRTRuntime(bad, manifest.inputs, manifest.outputs)
    from agent.bundle import TensorSpec

    wrong = (TensorSpec("pixels", "float32", (-1, 1, 8, 8)),)
    with pytest.raises(ModelLoadError, match="differ from the manifest"):
        OrtRuntime(sample_parts.directory / "model.onnx", wrong, manifest.outputs)


def test_choose_runtime_explains_why_none_fits(sample_parts: SampleParts) -> None:
    manifest = load_unpacked(sample_parts.directory)
    assert choose_runtime(manifest, "auto", ["litert", "onnxruntime"]) == "litert"
    assert choose_runtime(manifest, "onnxruntime", ["litert"]) == "onnxruntime"
    onnx_only = type(manifest)(**{**manifest.__dict__, "formats": {"onnx": "model.onnx"}})
    with pytest.raises(RuntimeUnavailableError, match="litert: bundle has no tflite model"):
        choose_runtime(onnx_only, "litert", [])


def test_missing_runtime_library_is_reported_not_a_crash() -> None:
    # A real interpreter in which onnxruntime cannot be imported.
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from agent.runtimes import availability, choose_runtime\n"
        "from agent.bundle import verify_bundle\n"
        "from agent.signing import load_public_key\n"
        "from tests.helpers import SAMPLE_BUNDLE, DEMO_PUB\n"
        "print(availability()['onnxruntime'])\n"
        "m = verify_bundle(SAMPLE_BUNDLE, [load_public_key(DEMO_PUB)]).manifest\n"
        "print(choose_runtime(m, 'auto', ['onnxruntime', 'litert']))\n"
        "try:\n    choose_runtime(m, 'onnxruntime', [])\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    lines = out.stdout.strip().splitlines()
    assert "onnxruntime is not installed" in lines[0] and "edgerun[device]" in lines[0]
    assert lines[1] == "litert"  # falls back to the runtime that is there
    assert lines[2].startswith("RuntimeUnavailableError no runtime can serve this bundle")


# --------------------------------------------------------------------------- inputs


def test_inputs_are_checked_against_the_manifest(sample_parts: SampleParts) -> None:
    specs = load_unpacked(sample_parts.directory).inputs
    ok = np.zeros((3, 1, 8, 8), np.float32)
    assert validate_feeds(specs, {"input": ok}, 256) == 3
    cases = [
        ({"input": ok.astype(np.float64)}, "input 'input': expected dtype float32, got float64"),
        (
            {"input": np.zeros((3, 64), np.float32)},
            "expected shape [-1, 1, 8, 8] (-1 = any), got [3, 64]",
        ),
        ({"input": np.zeros((3, 1, 8, 9), np.float32)}, "got [3, 1, 8, 9]"),
        ({"pixels": ok}, "unknown input 'pixels'; the model takes input (float32 [-1, 1, 8, 8])"),
        ({}, "missing input input (float32 [-1, 1, 8, 8])"),
        ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "batch size is 0"),
    ]
    for feeds, message in cases:
        with pytest.raises(InputMismatchError) as info:
            validate_feeds(specs, feeds, 256)
        assert message in str(info.value)
    with pytest.raises(TooLargeError, match="batch size 300 is above the limit of 256"):
        validate_feeds(specs, {"input": np.zeros((300, 1, 8, 8), np.float32)}, 256)


# --------------------------------------------------------------------------- batching


def test_micro_batcher_gives_each_caller_its_own_rows(sample_parts: SampleParts) -> None:
    manifest = load_unpacked(sample_parts.directory)
    rt = load_runtime("onnxruntime", manifest, sample_parts.directory, RuntimesConfig())
    calls: list[int] = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(feeds["input"]))
        return rt.run(feeds)

    batcher = MicroBatcher(run, max_batch=16, max_wait_ms=50)
    images, _ = samples()
    expected = rt.run({"input": images})["logits"]
    results: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        results[i] = batcher.submit({"input": images[i : i + 1]}, 1)["logits"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for i in range(len(images)):
        assert_close(results[i][0], expected[i])
    assert sum(calls) == len(images)
    assert max(calls) > 1, f"no requests were batched together: {calls}"


def test_micro_batcher_keeps_shapes_apart_and_propagates_errors() -> None:
    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if feeds["x"].shape[1] == 3:
            raise ValueError("boom")
        return {"y": feeds["x"] * 2}

    batcher = MicroBatcher(run, max_batch=8, max_wait_ms=20)
    out: dict[str, object] = {}

    def good() -> None:
        out["good"] = batcher.submit({"x": np.ones((1, 2))}, 1)["y"]

    def bad() -> None:
        try:
            batcher.submit({"x": np.ones((1, 3))}, 1)
        except ValueError as exc:
            out["bad"] = exc

    threads = [threading.Thread(target=good), threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    np.testing.assert_array_equal(out["good"], np.full((1, 2), 2.0))
    assert isinstance(out["bad"], ValueError)


def test_availability_does_not_import_runtime_libraries() -> None:
    # A LiteRT agent answering /status must not load onnxruntime (RSS, and a build that
    # crashes on this CPU would take the agent down).
    code = (
        "import sys\nfrom agent.runtimes import availability\n"
        "print(availability(), 'onnxruntime' in sys.modules, 'ai_edge_litert' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{'onnxruntime': None, 'litert': None} False False"

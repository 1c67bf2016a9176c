"""The golden rule on real models: it accepts the right model however a family computes
it, and refuses a wrong one on every family's rule.

The models are the shipped sample's (an INT8 QDQ ONNX and a float TFLite built by the
pipeline) and the bring-your-own float ONNX in models/byo/. "How CUDA computes it" is
simulated here with real onnxruntime sessions (export.golden_rule): QDQ unfused (graph
optimizations off, as the CUDA provider has no fused integer kernels) and the operands
of every Conv/Gemm/MatMul rounded to TF32's 10-bit mantissa. On the shipped sample's
former float model this gave 0.0068 max abs diff on its 8 golden cases; the real H200
gave 0.00856 (/work/shared/GPU.md). The device's own replay (agent.golden) judges with
the family a runtime reports, so a runtime that computes the simulated model and
reports "cuda" runs the device's exact code path; the GPU tier (tests/gpu/) does it on
a real GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent import bundle as B
from agent.golden import check_golden, replay_golden
from agent.runtimes.litert import LiteRTConfig, LiteRTRuntime
from agent.runtimes.ort import OrtConfig, OrtRuntime
from agent.signing import load_public_key
from agent.tolerance import Tolerance, compare
from export.golden_rule import (
    GoldenRuleError,
    Replay,
    golden_rule,
    judge,
    onnx_quant_steps,
    reduced_precision,
    tflite_quant_steps,
)
from export.package import onnx_specs, package_model
from tests.helpers import ROOT, SampleParts
from tests.wrong_models import perturbed_float, perturbed_int8, swapped_labels

FAMILIES = ("cpu", "cuda", "tensorrt")
CPU_ONLY = ["CPUExecutionProvider"]


class AsFamily(OrtRuntime):
    """The agent's onnxruntime runtime, reporting the family whose arithmetic the model
    file it was given simulates: the device's replay then applies that family's rule."""

    def __init__(self, family: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._family = family

    def family(self) -> str:
        return self._family


@pytest.fixture(scope="module")
def sample(sample_parts: SampleParts) -> B.Manifest:
    return B.load_unpacked(sample_parts.directory)


def _golden(parts: SampleParts, fmt: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with (
        np.load(parts.directory / "golden/inputs.npz") as x,
        np.load(parts.directory / f"golden/outputs-{fmt}.npz") as y,
    ):
        return {k: x[k] for k in x.files}, {k: y[k] for k in y.files}


def _replay_as(
    family: str, model: onnx.ModelProto, manifest: B.Manifest, directory: Path, tmp: Path
) -> Any:
    """The device's golden replay of `manifest`'s ONNX goldens with `model` computing."""
    path = tmp / f"as-{family}.onnx"
    onnx.save(model, str(path))
    config = OrtConfig(providers=CPU_ONLY, graph_optimization="disable")
    runtime = AsFamily(family, path, manifest.inputs, manifest.outputs, config)
    try:
        return replay_golden(manifest, directory, runtime)
    finally:
        runtime.close()


def _as_computed(family: str, model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as `family` computes it (QDQ unfused in every case: optimizations off)."""
    if family == "cpu":
        return model
    return reduced_precision(model, everywhere=family == "tensorrt")


# --------------------------------------------------------------------------- the model


def test_the_int8_output_step_is_the_grid_its_values_lie_on(sample_parts: SampleParts) -> None:
    steps = onnx_quant_steps(sample_parts.directory / "model.onnx")
    assert set(steps) == {"logits"}
    _, want = _golden(sample_parts, "onnx")
    levels = (want["logits"].astype(np.float64) - want["logits"].min()) / steps["logits"]
    # Every golden logit is a whole number of steps from every other: the QDQ scale read
    # from the graph is the output's real resolution.
    assert np.abs(levels - np.round(levels)).max() < 1e-3
    assert len(np.unique(np.round(levels))) > 20
    # A float model has no grid.
    assert onnx_quant_steps(ROOT / "models/byo/model.onnx") == {}
    assert tflite_quant_steps(sample_parts.directory / "model.tflite", ["logits"]) == {}


def test_reduced_precision_rounds_what_tensor_cores_round() -> None:
    model = onnx.load(str(ROOT / "models/byo/model.onnx"))
    sim = reduced_precision(model, everywhere=False)
    matmuls = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Conv")]
    casts = [n for n in sim.graph.node if n.op_type == "Cast"]
    # One Cast pair per activation operand (the weights are rounded in place).
    assert len(casts) == 2 * len(matmuls) and matmuls
    for tensor in sim.graph.initializer:
        w = numpy_helper.to_array(tensor)
        if w.ndim > 1:
            assert np.array_equal(w, w.astype(np.float16).astype(np.float32))
    assert len(reduced_precision(model, everywhere=True).graph.node) > len(sim.graph.node)


# --------------------------------------------------------------------------- right models


@pytest.mark.parametrize("graph_optimization", ["all", "extended", "basic", "disable"])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_sample_validates_however_this_cpu_computes_it(
    sample: B.Manifest, sample_parts: SampleParts, graph_optimization: Any, threads: int
) -> None:
    config = OrtConfig(providers=CPU_ONLY, intra_op_threads=threads,
                       graph_optimization=graph_optimization)  # fmt: skip
    runtime = OrtRuntime(sample_parts.directory / "model.onnx", sample.inputs, sample.outputs,
                         config)  # fmt: skip
    try:
        assert check_golden(sample, sample_parts.directory, runtime)["logits"] <= 0.3
    finally:
        runtime.close()


@pytest.mark.parametrize("xnnpack", [True, False])
def test_the_sample_tflite_validates_with_and_without_xnnpack(
    sample: B.Manifest, sample_parts: SampleParts, xnnpack: bool
) -> None:
    runtime = LiteRTRuntime(sample_parts.directory / "model.tflite", sample.inputs,
                            sample.outputs, LiteRTConfig(threads=2, xnnpack=xnnpack))  # fmt: skip
    try:
        report = replay_golden(sample, sample_parts.directory, runtime)
        assert report is not None and report.ok
        # A float model's rule is rounding-sized, not an INT8 step (the ONNX one's).
        assert report.outputs["logits"].allowance < 0.01 < sample.golden_tolerance.atol
    finally:
        runtime.close()


@pytest.mark.parametrize("family", ["cuda", "tensorrt"])
def test_the_int8_sample_computed_as_a_gpu_does_validates_on_that_family(
    sample: B.Manifest, sample_parts: SampleParts, tmp: Path, family: str
) -> None:
    model = onnx.load(str(sample_parts.directory / "model.onnx"))
    report = _replay_as(family, _as_computed(family, model), sample, sample_parts.directory, tmp)
    assert report is not None and report.ok, report.failures
    logits = report.outputs["logits"]
    # It really is computed differently: a step flips somewhere, and the rule allows it.
    assert logits.steps is not None and 1 <= logits.steps <= logits.max_steps  # type: ignore[operator]
    # Judged by the CPU's rule alone it would pass too here, but not with less room: the
    # family's own bound is what a GPU's correct answer needs.
    assert logits.top1 == 1.0


def test_an_older_agent_reading_only_atol_rtol_still_accepts_the_sample(
    sample: B.Manifest, sample_parts: SampleParts
) -> None:
    legacy = Tolerance(atol=sample.golden_tolerance.atol, rtol=sample.golden_tolerance.rtol)
    for fmt, path, runtime_cls in (("onnx", "model.onnx", OrtRuntime),
                                   ("tflite", "model.tflite", LiteRTRuntime)):  # fmt: skip
        inputs, want = _golden(sample_parts, fmt)
        runtime = runtime_cls(sample_parts.directory / path, sample.inputs, sample.outputs)
        try:
            assert compare(legacy, "cpu", want, runtime.run(inputs)).ok
        finally:
            runtime.close()


# --------------------------------------------------------------------------- wrong models


def _device_verdicts(
    wrong: onnx.ModelProto, manifest: B.Manifest, directory: Path, tmp: Path
) -> dict[str, list[str]]:
    verdicts = {}
    for family in FAMILIES:
        report = _replay_as(family, _as_computed(family, wrong), manifest, directory, tmp)
        assert report is not None
        verdicts[family] = report.failures
    return verdicts


def test_swapped_labels_are_refused_on_every_family(
    sample: B.Manifest, sample_parts: SampleParts, tmp: Path
) -> None:
    wrong = swapped_labels(onnx.load(str(sample_parts.directory / "model.onnx")), 3, 8)
    verdicts = _device_verdicts(wrong, sample, sample_parts.directory, tmp)
    for family, failures in verdicts.items():
        assert any("top-1 agrees on" in f for f in failures), (family, failures)
        assert any("exceeds the " + family + " bound" in f for f in failures), failures


def test_perturbed_weights_that_keep_every_answer_are_still_refused_on_every_family(
    sample: B.Manifest, sample_parts: SampleParts, tmp: Path
) -> None:
    model = onnx.load(str(sample_parts.directory / "model.onnx"))
    wrong = perturbed_int8(model, levels=8)
    inputs, want = _golden(sample_parts, "onnx")
    path = tmp / "wrong.onnx"
    onnx.save(wrong, str(path))
    got = OrtRuntime(path, sample.inputs, sample.outputs).run(inputs)["logits"]
    # Subtly wrong: every golden answer unchanged, yet the logits moved by whole steps
    # (measured: the same perturbation costs 0.5 points of accuracy on the eval split).
    assert (got.argmax(1) == want["logits"].argmax(1)).all()
    verdicts = _device_verdicts(wrong, sample, sample_parts.directory, tmp)
    for family, failures in verdicts.items():
        assert failures and "exceeds the " + family + " bound" in failures[0], (family, failures)


# --------------------------------------------------------------------------- one rule


@pytest.fixture(scope="module")
def byo_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "models/byo"))
    try:
        from byo_data import load_splits  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    x = load_splits()["eval"]["inputs"][:16]
    out = tmp_path_factory.mktemp("byo")
    heard: list[tuple[str, bool]] = []
    path = package_model(
        onnx_path=ROOT / "models/byo/model.onnx", tflite_path=None, name="byo", version="1.0.0",
        golden_inputs={"input": x}, key_path=ROOT / "models/keys/demo-INSECURE.key",
        out_dir=out, labels=[str(i) for i in range(10)], runs=3,
        record=lambda label, report: heard.append((label, report.ok)),
    )  # fmt: skip
    return path, {"heard": heard, "x": x}


def test_package_writes_the_rule_it_derives_and_the_device_applies_it(
    byo_bundle: tuple[Path, dict[str, Any]], tmp: Path
) -> None:
    path, seen = byo_bundle
    verified = B.unpack_bundle(
        path, tmp / "u", [load_public_key(ROOT / "models/keys/demo-INSECURE.pub")]
    )
    manifest, directory = verified.manifest, tmp / "u"
    # The same derivation, from the bundle's own golden outputs, gives the same rule.
    _, want = (dict(np.load(directory / "golden/inputs.npz")),
               dict(np.load(directory / "golden/outputs-onnx.npz")))  # fmt: skip
    rule, _, _ = golden_rule({"onnx": ROOT / "models/byo/model.onnx"},
                             onnx_specs(ROOT / "models/byo/model.onnx"),
                             {"input": seen["x"]}, ["logits"], references={"onnx": want})  # fmt: skip
    assert manifest.golden_tolerance == rule
    assert json.loads(verified.manifest_bytes)["golden"]["tolerance"] == rule.to_json()
    assert manifest.golden_tolerance.top1 == {"logits": 1.0}
    assert seen["heard"] == [("onnx cpu", True), ("onnx cuda", True), ("onnx tensorrt", True)]
    assert set(manifest.figures["golden_replays"]["onnx"]) == set(FAMILIES)
    # The device: the right float model on each family's arithmetic passes, a perturbed one
    # (noise of 2% of each weight matrix's spread) fails on each.
    model = onnx.load(str(ROOT / "models/byo/model.onnx"))
    for family in FAMILIES:
        ok = _replay_as(family, _as_computed(family, model), manifest, directory, tmp)
        assert ok is not None and ok.ok, (family, ok.failures if ok else None)
    verdicts = _device_verdicts(perturbed_float(model, 0.02), manifest, directory, tmp)
    assert all(verdicts.values()), verdicts


def test_a_rule_that_refuses_the_model_on_a_cpu_is_never_written(
    byo_bundle: tuple[Path, dict[str, Any]],
) -> None:
    want = {"logits": np.linspace(-5, 5, 20, dtype=np.float32).reshape(2, 10)}
    rule = Tolerance(atol=1e-3, rtol=0.0)
    off = {"logits": want["logits"] + 0.01}
    with pytest.raises(GoldenRuleError, match=r"refuses the model computed another way on a CPU: "
                       r"onnx cpu \(unfused\): logits: max abs diff 0.01 exceeds the cpu bound"):  # fmt: skip
        judge(rule, {"onnx": want}, {"onnx": [Replay("cpu", "unfused", off)]})
    # On a GPU family it is recorded and the bundle still written (a device there refuses).
    heard: list[tuple[str, bool]] = []
    far = {"logits": want["logits"] + 0.5}  # beyond even the default widening for CUDA
    figures = judge(rule, {"onnx": want}, {"onnx": [Replay("cuda", "tf32", far)]},
                    lambda label, report: heard.append((label, report.ok)))  # fmt: skip
    assert heard == [("onnx cuda", False)] and figures["onnx"]["cuda"]["ok"] is False


def test_an_output_too_noisy_for_an_elementwise_bound_is_judged_by_its_l2_error() -> None:
    from export.golden_rule import derive_tolerance

    rng = np.random.default_rng(1)
    want = rng.normal(size=(8, 384))
    want /= np.linalg.norm(want, axis=1, keepdims=True)  # unit embeddings, peak ~0.2
    # A correct run another way, 3% relative L2 error per case but some values moving by
    # more than 10% of the peak (as dynamic-INT8 MiniLM does: DESIGN.md).
    noisy = want + 0.03 * rng.standard_t(2, size=want.shape) / np.sqrt(384)
    replays = {"onnx": [Replay("cpu", "unfused", {"e": noisy})]}
    rule = derive_tolerance({"onnx": {"e": want}}, {}, replays)
    bound = rule.outputs["e"].bound
    assert bound.norm_rtol is not None and 0.03 < bound.norm_rtol <= 0.25
    assert compare(rule, "cpu", {"e": want}, {"e": noisy}).ok
    assert not compare(rule, "cpu", {"e": want}, {"e": rng.permutation(want)}).ok
    # A quiet output keeps its elementwise rule.
    quiet = {"onnx": [Replay("cpu", "unfused", {"e": want + 1e-7})]}
    assert derive_tolerance({"onnx": {"e": want}}, {}, quiet).outputs["e"].bound.norm_rtol is None


def test_the_shipped_int8_and_float_models_differ_within_the_int8_rule(
    sample: B.Manifest, sample_parts: SampleParts
) -> None:
    """The real CPU differences between the sample's INT8 ONNX and its float TFLite (the
    same pruned network) on the golden cases: 1.5 output steps, every answer the same. The
    INT8 rule allows them on every family; the float rule, a rounding-sized bound, does not
    (which is why a bundle's formats each get their own rule)."""
    _, int8 = _golden(sample_parts, "onnx")
    _, floats = _golden(sample_parts, "tflite")
    int8_rule = sample.golden_tolerance.for_format("onnx")
    for family in FAMILIES:
        assert compare(int8_rule, family, floats, int8).ok, family
    assert not compare(sample.golden_tolerance.for_format("tflite"), "cpu", floats, int8).ok

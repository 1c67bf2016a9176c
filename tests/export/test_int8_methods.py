"""QAT and mixed precision against post-training INT8, and the multi-variant bundle.

The student (fixtures/tiny.py `Spiky`) carries one huge constant activation that the
float model ignores, the kind of outlier that makes per-tensor minmax calibration
useless: post-training static INT8 collapses and breaks a deliberately tight gate
(5 points below the teacher, the float student is ~3 below). Mixed precision keeps
the nodes around the outlier in float; QAT learns clipped ranges. The test asserts
only what the gates decided, never a figure from a particular run or a timing.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.signing import load_public_key
from export.pipeline.build import DEMO_KEY, Options, run_build
from export.pipeline.errors import GateError
from tests.export.pipeline_helpers import write_recipe

FAST = Options(runs=5, skip_tflite=True)
TIGHT = {
    'builder = "tiny:build_student"': 'builder = "tiny:build_spiky_student"',
    "[prune]\nenabled = true": "[prune]\nenabled = false",
    "max_accuracy_drop = 25.0": "max_accuracy_drop = 5.0",
}


def _recipe(folder: Path, quantize: str) -> Path:
    return write_recipe(folder, {**TIGHT, 'preset = "avx512_vnni"': quantize})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("int8")
    recipe = _recipe(folder / "recipe", 'preset = "auto"\nmixed_precision = true\n'
                     'extra_modes = ["qat", "dynamic"]\nqat_percentile = 99.0')  # fmt: skip
    result = run_build(recipe, folder / "out", DEMO_KEY, FAST)
    return result, folder


def test_static_int8_breaks_the_tight_gate_and_mixed_and_qat_pass(built) -> None:
    result, _ = built
    report = result.report
    gates = {g["stage"]: g for g in report["gates"] if g["gate"] == "accuracy"}
    assert gates["onnx float"]["passed"]
    assert not gates["onnx int8"]["passed"]  # post-training static INT8
    assert gates["onnx int8 mixed"]["passed"]
    assert gates["onnx int8 qat"]["passed"]
    rows = {r["stage"]: r for r in report["stages"]}
    assert rows["onnx int8 qat"]["metric"] > rows["onnx int8"]["metric"]
    assert rows["onnx int8 mixed"]["metric"] > rows["onnx int8"]["metric"]
    # The failed PTQ model is no candidate; the other methods are.
    assert "onnx int8" not in result.report["selected"].values()
    assert {v["id"] for v in report["variants"]} >= {"onnx-fp32", "onnx-int8-mixed",
                                                       "onnx-int8-qat"}  # fmt: skip


def test_mixed_precision_keeps_the_sensitive_nodes_float_and_says_why(built) -> None:
    result, folder = built
    mixed = result.report["mixed_precision"]
    assert mixed["passed"]
    kept = mixed["kept_float"]
    # The outlier lives between the Add that puts it in and the conv that reads it.
    assert any(n.endswith("/Add") for n in kept)
    assert any("features.6" in n for n in kept)
    assert len(kept) <= mixed["quantizable"] // 2  # quantize.mixed_max_float = 0.5
    errors = [s["error"] for s in mixed["sensitivity"]]
    assert errors == sorted(errors, reverse=True)
    assert [s["node"] for s in mixed["sensitivity"][: len(kept)]] == kept
    assert mixed["steps"][-1]["passed"] and not any(s["passed"] for s in mixed["steps"][:-1])
    md = (folder / "out" / "tiny-0.1.0.report.md").read_text()
    assert "## Mixed precision" in md and "## Quantization-aware training" in md
    assert "## Instruction set" in md and "Measured on: " in md


def test_qat_model_is_a_real_qdq_model_with_int8_weights(built, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    result, _ = built
    with tarfile.open(result.bundle) as tar:
        tar.extractall(tmp_path, filter="data")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = next(v for v in manifest["variants"] if v["id"] == "onnx-int8-qat")
    graph = onnx.load(str(tmp_path / entry["file"])).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    int8 = [t for t in graph.initializer  # weights, not the zero points
            if numpy_helper.to_array(t).dtype == np.int8 and len(t.dims) >= 2]  # fmt: skip
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert len(int8) == result.report["qat"]["onnx int8 qat"]["weights_folded"] == 4
    assert not any(name.endswith(".weight") for name in floats)  # float copies removed


def test_bundle_carries_every_passing_variant_with_its_golden(built, tmp_path: Path) -> None:
    import onnxruntime as ort

    from agent.tolerance import compare

    result, _ = built
    bundle = verify_bundle(result.bundle, [load_public_key(DEMO_KEY.with_suffix(".pub"))])
    parsed = {v.id: v for v in bundle.manifest.variants}  # the agent's own reading
    with tarfile.open(result.bundle) as tar:
        tar.extractall(tmp_path, filter="data")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # An agent that knows no variants reads the legacy keys: one model per format.
    assert manifest["formats"] == {"onnx": "model.onnx"}
    assert manifest["golden"]["outputs"] == {"onnx": "golden/outputs-onnx.npz"}
    ids = [v["id"] for v in manifest["variants"]]
    assert len(ids) == len(set(ids)) == len(parsed)
    legacy = [v for v in manifest["variants"] if v["file"] == "model.onnx"]
    assert len(legacy) == 1  # the selected model is a variant, not a second copy
    assert "tolerance" not in legacy[0]["golden"]  # the manifest's rule for its format
    inputs = np.load(tmp_path / manifest["golden"]["inputs"])
    for v in manifest["variants"]:
        assert v["format"] == "onnx" and v["file"] in manifest["files"]
        assert v["precision"] in ("fp32", "int8", "mixed")
        assert v["peak_memory_mb"]["onnxruntime"] > 0
        if v is not legacy[0]:
            assert "tolerance" in v["golden"]  # its own rule, derived on its own file
        if v["precision"] != "fp32":
            assert v["built_for"] == result.report["isa"]["preset"]
        session = ort.InferenceSession(str(tmp_path / v["file"]),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        got = {"logits": session.run(None, {"input": inputs["input"]})[0]}
        want = {"logits": np.load(tmp_path / v["golden"]["outputs"])["logits"]}
        report = compare(parsed[v["id"]].tolerance, "cpu", want, got)
        assert report.ok, (v["id"], report.failures)


def test_variant_bundle_is_served_by_a_real_agent(built, tmp_path: Path) -> None:
    from tests.helpers import base_config, running_agent, samples

    result, _ = built
    images, labels = samples()
    with running_agent(tmp_path, base_config(tmp_path, result.bundle)) as agent, \
            agent.client() as client:  # fmt: skip
        out = client.infer("tiny", {"input": images[:32]})
        top1 = np.argmax(out["logits"], axis=1)
        assert float(np.mean(top1 == labels[:32])) > 0.8
        assert client.get_json("/v2/models/tiny")["name"] == "tiny"
        # The device measured the variants it can load and says which one serves.
        model = client.get_json("/v2/edgerun/status")["model"]
        ids = {v["id"] for v in result.report["variants"]}
        assert model["variant"] in ids
        measured = {v["id"] for v in model["selection"]["variants"]}
        assert measured == ids


def test_without_mixed_precision_or_another_method_the_gate_fails(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "recipe", 'preset = "x86_64-vnni"')
    with pytest.raises(GateError) as err:
        run_build(recipe, tmp_path / "out", DEMO_KEY, FAST)
    assert (err.value.gate, err.value.stage) == ("accuracy", "onnx int8")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_report_warns_when_the_preset_targets_another_cpu(tmp_path: Path) -> None:
    """The bring-your-own recipe quantizes for a Raspberry Pi (arm64); built here, its
    INT8 figures are this machine's, and the report says so."""
    import shutil

    from export.pipeline.isa import detect_host, preset_for

    src = Path(__file__).resolve().parents[2] / "models" / "byo"
    shutil.copytree(src, tmp_path / "byo")
    result = run_build(tmp_path / "byo" / "recipe.toml", tmp_path / "out", DEMO_KEY,
                       Options(runs=3))  # fmt: skip
    isa = result.report["isa"]
    host = detect_host()
    assert isa["preset"] == "arm64" and isa["build_host"]["label"] == host.label
    warned = [n for n in result.report["notes"] if "targets aarch64" in n]
    if preset_for(host)[0] == "arm64":  # built on a Pi: nothing to warn about
        assert warned == []
    else:
        assert len(warned) == 1 and host.label in warned[0]
    md = next((tmp_path / "out").glob("*.report.md")).read_text()
    assert f"Measured on: {host.label}" in md

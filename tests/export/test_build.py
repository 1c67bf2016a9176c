"""End-to-end builds of the fast recipe: a real signed bundle, reports, and clean failures."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.signing import load_public_key
from export.pipeline.build import Options, main, run_build
from export.pipeline.errors import (
    CalibrationError,
    DatasetError,
    ExportFailedError,
    GateError,
    LoadError,
)
from tests.tolerance import assert_close

FAST = Options(runs=5)


def _assert_nothing_written(out: Path) -> None:
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, signing_key: tuple[Path, Path]):
    from tests.export.pipeline_helpers import write_recipe

    folder = tmp_path_factory.mktemp("build")
    # QAT as a second INT8 method: its ONNX and TFLite models are candidates too.
    recipe = write_recipe(folder / "recipe", {'preset = "avx512_vnni"':
                                              'preset = "avx512_vnni"\nextra_modes = ["qat"]'})  # fmt: skip
    out = folder / "out"
    result = run_build(recipe, out, signing_key[0], FAST)
    return result, out


def test_bundle_is_signed_and_complete(built, signing_key: tuple[Path, Path]) -> None:
    result, out = built
    assert result.bundle == out / "tiny-0.1.0.edgebundle"
    bundle = verify_bundle(result.bundle, [load_public_key(signing_key[1])])
    m = bundle.manifest
    assert set(m.formats) == {"onnx", "tflite"}
    for name in ("report.json", "report.md", "report.png", "recipe.toml", "model.onnx"):
        assert name in m.files, name
    assert m.labels == tuple(str(i) for i in range(10))
    assert m.inputs[0].name == "input" and m.inputs[0].shape == (-1, 1, 8, 8)
    assert m.outputs[0].name == "logits"
    figures = m.figures
    assert figures["metric"] == "accuracy" and figures["selected"] == result.report["selected"]
    # Nothing else in the out dir: bundle + its reports next to it, no work folder.
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["tiny-0.1.0.edgebundle"]
        + [f"tiny-0.1.0.{n}" for n in ("report.json", "report.md", "report.png", "recipe.toml")]
    )


def test_report_covers_every_stage(built) -> None:
    result, out = built
    report = json.loads((out / "tiny-0.1.0.report.json").read_text())
    stages = [row["stage"] for row in report["stages"]]
    assert stages == [
        "teacher", "student", "pruned", "teacher onnx", "onnx float", "onnx int8",
        "onnx int8 qat", "tflite float", "tflite int8", "tflite int8 qat",
    ]  # fmt: skip
    rows = {row["stage"]: row for row in report["stages"]}
    # Structured pruning really removed parameters and MACs.
    assert rows["pruned"]["params"] < rows["student"]["params"]
    assert report["prune"]["flops_after"] < report["prune"]["flops_before"]
    # INT8 models are smaller than their float versions.
    assert rows["onnx int8"]["size_bytes"] < rows["onnx float"]["size_bytes"]
    assert rows["tflite int8"]["size_bytes"] < rows["tflite float"]["size_bytes"]
    assert rows["tflite int8 qat"]["size_bytes"] < rows["tflite float"]["size_bytes"]
    assert rows["onnx int8 qat"]["size_bytes"] < rows["onnx float"]["size_bytes"]
    ids = {v["id"] for v in report["variants"]}
    assert ids == {"onnx-fp32", "onnx-int8-static", "onnx-int8-qat", "tflite-fp32",
                   "tflite-int8-static", "tflite-int8-qat"}  # fmt: skip
    for stage in ("teacher onnx", "onnx float", "onnx int8", "tflite float", "tflite int8"):
        assert rows[stage]["latency_ms"]["p50"] > 0, stage
    assert rows["onnx int8"]["int8_ops"].get("QuantizeLinear", 0) > 0
    gates = {(g["gate"], g["stage"]) for g in report["gates"]}
    assert ("parity", "onnx float") in gates and ("accuracy", "tflite int8") in gates
    assert all(g["passed"] for g in report["gates"])
    md = (out / "tiny-0.1.0.report.md").read_text()
    assert "| onnx int8 | onnx |" in md and "## Gates" in md
    png = (out / "tiny-0.1.0.report.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_the_golden_gate_is_the_rule_the_bundle_carries_and_the_device_applies(
    built, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    from agent.bundle import unpack_bundle
    from agent.golden import replay_golden
    from agent.runtimes.litert import LiteRTRuntime
    from agent.runtimes.ort import OrtRuntime

    result, out = built
    report = json.loads((out / "tiny-0.1.0.report.json").read_text())
    golden_gates = {g["stage"]: g for g in report["gates"] if g["gate"] == "golden"}
    chosen = set(report["selected"])
    assert set(golden_gates) == {f"{fmt} {family}" for fmt in chosen for family in
                                 (("cpu", "cuda", "tensorrt") if fmt == "onnx" else ("cpu",))}  # fmt: skip
    assert all(g["passed"] and g["value"] <= 1.0 for g in golden_gates.values()), golden_gates
    verified = unpack_bundle(result.bundle, tmp_path / "u", [load_public_key(signing_key[1])])
    raw = json.loads(verified.manifest_bytes)
    # One rule: the gate's, the bundle's, and what the device judges by.
    assert raw["golden"]["tolerance"] == report["golden_tolerance"]
    assert raw["golden"]["tolerance"]["top1"] == {"logits": 1.0}  # a classification recipe
    manifest = verified.manifest
    for fmt, cls in (("onnx", OrtRuntime), ("tflite", LiteRTRuntime)):
        runtime = cls(tmp_path / "u" / manifest.formats[fmt], manifest.inputs, manifest.outputs)
        try:
            replayed = replay_golden(manifest, tmp_path / "u", runtime)
        finally:
            runtime.close()
        assert replayed is not None and replayed.ok, (fmt, replayed)
        gate = golden_gates[f"{fmt} cpu"]["detail"]
        allowance = replayed.outputs["logits"].allowance
        assert f"of {allowance:.3g}" in gate, (gate, allowance)


def test_a_version_that_is_not_major_minor_patch_is_refused_before_building(
    built, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    from export.pipeline.errors import BuildError

    recipe = Path(built[0].files["recipe.toml"])
    with pytest.raises(BuildError, match=r"--version '1.0' must be MAJOR.MINOR.PATCH"):
        run_build(recipe, tmp_path / "out", signing_key[0], Options(version="1.0"))
    _assert_nothing_written(tmp_path / "out")


def test_bundle_models_reproduce_golden_outputs(built, tmp_path: Path) -> None:
    result, _ = built
    with tarfile.open(result.bundle) as tar:
        tar.extractall(tmp_path, filter="data")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    inputs = np.load(tmp_path / manifest["golden"]["inputs"])["input"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    got = session.run(None, {"input": inputs})[0]
    want = np.load(tmp_path / manifest["golden"]["outputs"]["onnx"])["logits"]
    assert_close(got, want)
    # The recipe inside the bundle is the one that built it.
    assert 'name = "tiny"' in (tmp_path / "recipe.toml").read_text()


def test_cli_main_builds_and_reports_errors(
    recipe_dir: Callable[..., Path], signing_key: tuple[Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    recipe = recipe_dir({'builder = "tiny:load_splits"': 'builder = "tiny:splits_wrong_shape"'})
    code = main([str(recipe), "--out", str(tmp_path / "out"), "--key", str(signing_key[0])])
    assert code == 2
    err = capsys.readouterr().err
    assert "[build.dataset]" in err and "split 'eval'" in err
    _assert_nothing_written(tmp_path / "out")


# ----------------------------------------------------------------- errors fail early


def _build(recipe: Path, tmp_path: Path, key: Path) -> None:
    run_build(recipe, tmp_path / "out", key, FAST)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (("tiny:build_teacher", "tiny_missing:build_teacher"), LoadError,
         r"teacher.builder = 'tiny_missing:build_teacher': cannot import module 'tiny_missing'"),
        (("tiny:build_student", "tiny:build_nothing"), LoadError,
         r"student.builder = 'tiny:build_nothing': module 'tiny' has no function 'build_nothing'"),
        (("tiny:build_student", "tiny:build_not_a_module"), LoadError,
         r"returned dict, expected a torch.nn.Module"),
        (("tiny:load_splits", "tiny:splits_wrong_shape"), DatasetError,
         r"input 'input' has shape \[300, 64\]; the recipe declares \[-1, 1, 8, 8\]"),
        (("tiny:load_splits", "tiny:splits_wrong_dtype"), DatasetError,
         r"split 'train': input 'input' is float64; the recipe declares float32"),
        (("tiny:load_splits", "tiny:splits_missing_eval"), DatasetError,
         r"lacks split\(s\) eval"),
        (("tiny:load_splits", "tiny:splits_raises"), DatasetError,
         r"raised FileNotFoundError: data/digits.npz"),
        (("tiny:load_splits", "tiny:splits_empty_calibration"), CalibrationError,
         r"calibration split is empty"),
    ],
)  # fmt: skip
def test_recipe_errors_fail_early_and_leave_nothing(
    recipe_dir: Callable[..., Path], signing_key: tuple[Path, Path], tmp_path: Path,
    change: tuple[str, str], error: type[Exception], match: str,
) -> None:  # fmt: skip
    recipe = recipe_dir(dict([change]))
    with pytest.raises(error, match=match):
        _build(recipe, tmp_path, signing_key[0])
    _assert_nothing_written(tmp_path / "out")


def test_checkpoint_that_does_not_fit(
    recipe_dir: Callable[..., Path], signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    import torch

    recipe = recipe_dir({'builder = "tiny:build_teacher"\n': 'builder = "tiny:build_teacher"\n'
                         'checkpoint = "wrong.pt"\n'})  # fmt: skip
    torch.save({"bogus": torch.zeros(3)}, recipe.parent / "wrong.pt")
    with pytest.raises(LoadError, match=r"teacher.checkpoint = 'wrong.pt' does not fit"):
        _build(recipe, tmp_path, signing_key[0])
    _assert_nothing_written(tmp_path / "out")


def test_model_that_does_not_export(
    recipe_dir: Callable[..., Path], signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    recipe = recipe_dir({
        "tiny:build_student": "tiny:build_unexportable",
        "[prune]\nenabled = true": "[prune]\nenabled = false",
    })  # fmt: skip
    with pytest.raises(ExportFailedError, match=r"torch.onnx.export failed: .*special_i0e") as err:
        _build(recipe, tmp_path, signing_key[0])
    _assert_nothing_written(tmp_path / "out")
    # It failed in the preflight export inside the torch stages, before any training.
    frames = [f.name for f in err.traceback]
    assert "torch_stages" in frames


def test_gate_failure_names_gate_stage_and_margin(
    recipe_dir: Callable[..., Path], signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    # One epoch at a tiny learning rate: the student is far below the teacher.
    recipe = recipe_dir({
        "epochs = 6\nlr = 0.01": "epochs = 1\nlr = 0.00001",
        "max_accuracy_drop = 25.0": "max_accuracy_drop = 0.5",
    })  # fmt: skip
    with pytest.raises(GateError) as err:
        _build(recipe, tmp_path, signing_key[0])
    assert err.value.gate == "accuracy" and err.value.stage == "distill"
    msg = str(err.value)
    assert "gate accuracy failed at distill" in msg and "budget" in msg and "exceeded by" in msg
    assert err.value.value < err.value.limit
    _assert_nothing_written(tmp_path / "out")


def test_bad_key_fails_before_any_work(recipe_dir: Callable[..., Path], tmp_path: Path) -> None:
    from export.pipeline.errors import BuildError

    with pytest.raises(BuildError, match=r"signing key: cannot read private key"):
        run_build(recipe_dir(), tmp_path / "out", tmp_path / "missing.key", FAST)

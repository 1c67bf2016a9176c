"""The shipped recipes, built for real (slow: training, conversion, measurement)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.bundle import verify_bundle
from agent.signing import load_public_key
from export.pipeline.build import Options, run_build

MODELS = Path(__file__).resolve().parents[2] / "models"
pytestmark = pytest.mark.slow


def _verify(bundle: Path, pub: Path) -> dict:
    verify_bundle(bundle, [load_public_key(pub)])
    return json.loads(bundle.with_suffix(".report.json").read_text())


def test_digits_recipe_meets_its_targets(tmp_path: Path, signing_key: tuple[Path, Path]) -> None:
    result = run_build(MODELS / "digits" / "recipe.toml", tmp_path, signing_key[0],
                       Options(runs=10))  # fmt: skip
    report = _verify(result.bundle, signing_key[1])
    rows = {r["stage"]: r for r in report["stages"]}
    teacher = rows["teacher"]["metric"]
    # The target: student INT8 within 1 point of the teacher.
    assert rows["onnx int8"]["metric"] >= teacher - 1.0
    assert rows["tflite int8"]["metric"] >= teacher - 1.0
    assert rows["pruned"]["params"] < rows["student"]["params"] < rows["teacher"]["params"] / 10
    assert set(report["selected"]) == {"onnx", "tflite"}


def test_byo_onnx_recipe_runs_quantize_gates_package(
    tmp_path: Path, signing_key: tuple[Path, Path]
) -> None:
    result = run_build(MODELS / "byo" / "recipe.toml", tmp_path, signing_key[0], Options(runs=5))
    report = _verify(result.bundle, signing_key[1])
    assert [r["stage"] for r in report["stages"]] == ["onnx float", "onnx int8"]
    assert report["selected"] == {"onnx": "onnx int8"}  # prefer = "int8"
    assert report["quantize"]["calibration_method"] == "percentile"


def test_minilm_recipe_with_optimum_on_the_real_weights(
    tmp_path: Path, signing_key: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reduced data (fewer sentences, fewer latency runs); same model, quantizer and gate."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "minilm"
    folder.mkdir()
    for name in ("minilm.py", "minilm_data.py"):
        shutil.copy(MODELS / "minilm" / name, folder / name)
    text = (MODELS / "minilm" / "recipe.toml").read_text()
    text = text.replace('"minilm_data:load_splits"', '"minilm_data:load_small_splits"')
    (folder / "recipe.toml").write_text(text)
    result = run_build(folder / "recipe.toml", tmp_path / "out", signing_key[0], Options(runs=5))
    report = _verify(result.bundle, signing_key[1])
    rows = {r["stage"]: r for r in report["stages"]}
    assert rows["onnx int8"]["metric"] >= 0.99  # mean cosine to the teacher
    assert rows["onnx int8"]["size_bytes"] <= 0.27 * rows["onnx float"]["size_bytes"]
    assert report["quantize"]["engine"] == "optimum"
    assert rows["onnx int8"]["int8_ops"].get("MatMulInteger", 0) > 0

"""Recipe validation: unknown keys, bad values and inconsistent settings, each named."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.pipeline.errors import RecipeError
from export.pipeline.recipe import load_recipe, parse_recipe
from tests.export.pipeline_helpers import FAST_RECIPE, write_recipe


def _load(tmp_path: Path, changes: dict[str, str] | None = None, text: str = FAST_RECIPE):
    return load_recipe(write_recipe(tmp_path, changes, text))


def test_fast_recipe_parses_with_defaults(tmp_path: Path) -> None:
    r = _load(tmp_path)
    assert r.name == "tiny" and r.task == "classification"
    assert r.distill.epochs == 6 and r.distill.temperature == 4.0  # default kept
    assert r.prune.method == "structured" and r.quantize.mode == "static"
    assert r.root == tmp_path.resolve() and not r.byo


def test_unknown_key_is_rejected_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _load(tmp_path, {"[prune]\n": "[prune]\nsparsity = 0.5\n"})
    assert "prune.sparsity: unknown key" in str(err.value)
    assert "ratio" in str(err.value)  # lists what is allowed there


def test_unknown_top_level_table_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"calibrate: unknown key"):
        _load(tmp_path, text=FAST_RECIPE + "\n[calibrate]\nmethod = 'minmax'\n")


def test_bad_preset_names_value_and_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _load(tmp_path, {'preset = "avx512_vnni"': 'preset = "x86"'})
    msg = str(err.value)
    assert "quantize.preset" in msg and "'x86'" in msg
    for allowed in ("'auto'", "'x86_64-vnni'", "'x86_64-avx2'", "'arm64'", "'arm64-dotprod'",
                    "'jetson-orin'", "'avx512_vnni'", "'jetson-tensorrt'"):  # fmt: skip
        assert allowed in msg


def test_int8_method_combinations_are_checked(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _load(tmp_path, {'preset = "avx512_vnni"': 'preset = "jetson-orin"\nmode = "qat"\n'
                         'extra_modes = ["dynamic", "qat"]\nmixed_precision = true'})  # fmt: skip
    msg = str(err.value)
    assert "quantize.mode: 'dynamic' is not allowed with preset 'jetson-orin'" in msg
    assert "quantize.extra_modes" in msg and "repeats a mode" in msg
    assert "quantize.mixed_precision: true needs a static INT8 model" in msg
    with pytest.raises(RecipeError, match=r"quantize.extra_modes\[0\]|'int4' is not allowed"):
        _load(tmp_path, {'preset = "avx512_vnni"': 'extra_modes = ["int4"]'})
    with pytest.raises(RecipeError, match=r"quantize.qat_percentile"):
        _load(tmp_path, {'preset = "avx512_vnni"': "qat_percentile = 20.0"})
    ok = _load(tmp_path, {'preset = "avx512_vnni"': 'preset = "auto"\nextra_modes = ["qat"]'})
    assert ok.quantize.extra_modes == ["qat"] and ok.quantize.preset == "auto"


def test_bad_calibration_method_and_prefer(tmp_path: Path) -> None:
    text = FAST_RECIPE.replace('preset = "avx512_vnni"', 'calibration_method = "kl"')
    text = text.replace("runs = 5", 'runs = 5\nprefer = "smallest"')
    with pytest.raises(RecipeError) as err:
        _load(tmp_path, text=text)
    msg = str(err.value)
    assert "quantize.calibration_method: 'kl' is not allowed" in msg and "'entropy'" in msg
    assert "select.prefer: 'smallest' is not allowed" in msg and "'fastest'" in msg


def test_out_of_range_numbers(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _load(tmp_path, {"ratio = 0.25": "ratio = 1.5", "lr = 0.01": "lr = -1"})
    msg = str(err.value)
    assert "prune.ratio: 1.5 is above the maximum 0.95" in msg
    assert "distill.lr: -1.0 is below the minimum" in msg


def test_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"distill.epochs: expected an integer, got '6'"):
        _load(tmp_path, {"epochs = 6": 'epochs = "6"'})


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"task: required key is missing"):
        _load(tmp_path, {'task = "classification"\n': ""})


def test_embedding_task_refuses_kd_loss(tmp_path: Path) -> None:
    text = FAST_RECIPE.replace('task = "classification"', 'task = "embedding"')
    text = text.replace('labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]\n', "")
    with pytest.raises(RecipeError) as err:
        _load(tmp_path, text=text)
    assert "distill.loss: 'kd' is not allowed for task 'embedding'" in str(err.value)
    assert "'cosine', 'mse'" in str(err.value)


def test_byo_onnx_recipe_refuses_torch_only_steps(tmp_path: Path) -> None:
    data = {
        "name": "byo", "version": "1.0.0", "task": "classification",
        "inputs": [{"name": "input", "shape": [-1, 4]}], "outputs": ["logits"],
        "onnx_model": {"path": "m.onnx"}, "dataset": {"builder": "d:f"},
        "prune": {"enabled": True},
    }  # fmt: skip
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, tmp_path)
    msg = str(err.value)
    assert "prune.enabled: true is not allowed with [onnx_model]" in msg
    assert "tflite.enabled: true is not allowed with [onnx_model]" in msg
    data["prune"] = {"enabled": False}
    data["tflite"] = {"enabled": False}
    assert parse_recipe(data, tmp_path).byo


def test_needs_exactly_one_model_source(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"exactly one of \[teacher\]"):
        _load(tmp_path, {'[teacher]\nbuilder = "tiny:build_teacher"\n': ""})


def test_batch_axis_and_name_and_version(tmp_path: Path) -> None:
    changes = {
        "shape = [-1, 1, 8, 8]": "shape = [1, 1, 8, 8]",
        'name = "tiny"': 'name = "tiny model"',
        'version = "0.1.0"': 'version = "1"',
    }
    with pytest.raises(RecipeError) as err:
        _load(tmp_path, changes)
    msg = str(err.value)
    assert "inputs[0].shape: [1, 1, 8, 8] must start with -1" in msg
    assert "name: 'tiny model'" in msg and "version: '1'" in msg


def test_builder_must_be_module_colon_function(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"teacher.builder: 'tiny.build_teacher' does not match"):
        _load(tmp_path, {'"tiny:build_teacher"': '"tiny.build_teacher"'})


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(RecipeError, match=r"is not valid TOML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"cannot read recipe"):
        load_recipe(tmp_path / "nope.toml")


def test_shipped_recipes_parse() -> None:
    root = Path(__file__).resolve().parents[2] / "models"
    for path in sorted(root.glob("*/recipe.toml")):
        recipe = load_recipe(path)
        assert recipe.name and recipe.version

"""The manifest's `variants`: every field bounded and typed, legacy bundles derived."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from agent import bundle as B

SHA = "0" * 64


def manifest(**changes: Any) -> dict[str, Any]:
    files = {
        name: {"sha256": SHA, "size": 1}
        for name in ("model.onnx", "int8.onnx", "model.tflite", "golden/in.npz",
                     "golden/fp32.npz", "golden/int8.npz", "golden/tfl.npz", "notes.txt")
    }  # fmt: skip
    body: dict[str, Any] = {
        "schema": B.SCHEMA,
        "name": "digits",
        "version": "1.0.0",
        "files": files,
        "formats": {"onnx": "model.onnx"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}],
        "golden": {"inputs": "golden/in.npz", "tolerance": {"atol": 1e-4, "rtol": 1e-3}},
        "variants": [
            {"id": "onnx-fp32", "format": "onnx", "file": "model.onnx", "precision": "fp32",
             "method": None, "golden": {"outputs": "golden/fp32.npz"}},
            {"id": "onnx-int8", "format": "onnx", "file": "int8.onnx", "precision": "int8",
             "method": "static", "built_for": "x86_64-avx512_vnni",
             "golden": {"outputs": "golden/int8.npz", "tolerance": {"atol": 0.05, "rtol": 0.01}},
             "peak_memory_mb": {"onnxruntime": 28.5}},
        ],
    }  # fmt: skip
    body.update(changes)
    return body


def parse(body: dict[str, Any]) -> B.Manifest:
    return B.parse_manifest(json.dumps(body).encode())


def test_variants_parse_with_their_own_golden_tolerance_and_memory() -> None:
    m = parse(manifest())
    assert [v.id for v in m.variants] == ["onnx-fp32", "onnx-int8"]
    fp32, int8 = m.variants
    assert (fp32.golden_atol, fp32.golden_rtol) == (1e-4, 1e-3)  # the manifest's default
    assert (int8.golden_atol, int8.golden_rtol) == (0.05, 0.01)
    assert int8.precision == "int8" and int8.method == "static"
    assert int8.built_for == "x86_64-avx512_vnni" and int8.peak_memory_mb == {"onnxruntime": 28.5}
    assert not fp32.legacy and m.variant("onnx-int8") is int8 and m.variant("x") is None
    assert set(m.golden_files) == {"golden/in.npz", "golden/fp32.npz", "golden/int8.npz"}


def test_a_variant_tolerance_takes_the_whole_rule_of_agent_tolerance() -> None:
    body = manifest()
    body["variants"][1]["golden"]["tolerance"] = {
        "atol": 0.01,
        "families": {"cuda": {"atol": 0.2}},
        "outputs": {"logits": {"quant_step": 0.05, "max_steps": 3}},
        "top1": {"logits": 0.9},
    }
    int8 = parse(body).variants[1]
    assert int8.tolerance.atol == 0.01 and "cuda" in int8.tolerance.families
    body["variants"][1]["golden"]["tolerance"]["outputs"] = {"probs": {"quant_step": 0.05}}
    with pytest.raises(B.SchemaError, match="probs"):
        parse(body)


def test_a_legacy_manifest_has_one_variant_per_format() -> None:
    body = manifest(
        formats={"onnx": "model.onnx", "tflite": "model.tflite"},
        golden={"inputs": "golden/in.npz", "outputs": {"onnx": "golden/fp32.npz",
                "tflite": "golden/tfl.npz"}, "tolerance": {"atol": 0.001}},
        figures={"peak_memory_mb": {"onnxruntime": 30}},
    )  # fmt: skip
    del body["variants"]
    m = parse(body)
    assert [(v.id, v.format, v.file, v.golden_outputs) for v in m.variants] == [
        ("onnx", "onnx", "model.onnx", "golden/fp32.npz"),
        ("tflite", "tflite", "model.tflite", "golden/tfl.npz"),
    ]
    assert all(v.legacy and v.golden_atol == 0.001 for v in m.variants)
    assert m.variants[0].peak_memory_mb == {"onnxruntime": 30.0}


def test_a_variants_only_manifest_derives_its_legacy_formats() -> None:
    body = manifest()
    del body["formats"]
    assert parse(body).formats == {"onnx": "model.onnx"}


def _edit(path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(manifest())
    keys = path.split(".")
    target: Any = body
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    last = keys[-1]
    if value is _DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return body


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("variants", [], "variants is empty"),
        ("variants", {"id": "x"}, "field variants is dict, expected list"),
        ("variants", [{"id": f"v{i}", "format": "onnx", "file": "model.onnx"} for i in
                      range(B.MAX_VARIANTS + 1)], "the cap is 16"),
        ("variants.0", "onnx", "variants[0] must be an object"),
        ("variants.0.id", "../x", "ASCII"),
        ("variants.0.id", 7, "variants[0].id is int"),
        ("variants.1.id", "onnx-fp32", "names id 'onnx-fp32' twice"),
        ("variants.0.format", "pt", "format 'pt' is not one of onnx, tflite"),
        ("variants.0.file", "missing.onnx", "not in files"),
        ("variants.1.file", "model.onnx", "also the file of variant 'onnx-fp32'"),
        ("variants.0.precision", "int4", "expected null or one of fp32, fp16, int8, mixed"),
        ("variants.0.method", "magic", "expected null or one of static, dynamic, qat, mixed"),
        ("variants.0.built_for", "x" * 65, "at most 64 printable"),
        ("variants.0.golden", "golden/fp32.npz", "golden is str, expected dict"),
        ("variants.0.golden.outputs", "notes.txt", "not a listed .npz file"),
        ("variants.0.golden.outputs", _DELETE, "missing field variants.onnx-fp32.golden.outputs"),
        ("variants.1.golden.tolerance.atol", -1, "must be a finite number in [0"),
        ("variants.1.golden.tolerance.rtol", 0.5, "variants.onnx-int8.golden.tolerance.rtol"),
        ("variants.1.peak_memory_mb", {"onnxruntime": 0.001}, "finite number in [1"),
        ("variants.1.peak_memory_mb", {"onnxruntime": "big"}, "must map runtime names"),
        ("variants.1.peak_memory_mb", {"a b": 10}, "runtime name"),
        ("variants.0.golden", _DELETE, "have no golden.outputs"),
        ("golden", None, "golden.inputs is missing"),
        ("formats", {"onnx": "notes.txt"}, "which is no variant's file"),
    ],
)  # fmt: skip
def test_variant_fields_are_refused_with_the_field_named(
    path: str, value: Any, message: str
) -> None:
    with pytest.raises(B.SchemaError, match="manifest") as info:
        parse(_edit(path, value))
    assert message in str(info.value)

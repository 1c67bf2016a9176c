"""Multi-variant bundles built from the sample digits model, for the variant-choice tests.

Variants: `onnx-fp32` (the sample's model.onnx), `onnx-int8` (the same model quantized
by onnxruntime's dynamic INT8 quantizer, built here once per directory), `tflite-fp32`
(the sample's model.tflite); each with golden outputs computed by its runtime on the
sample's golden inputs, except where a test asks for a deliberately wrong file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.helpers import SampleParts, make_bundle

INT8_TOLERANCE = {"atol": 0.05, "rtol": 0.01}


def int8_model(parts: SampleParts, directory: Path) -> Path:
    out = directory / "digits-int8-dynamic.onnx"
    if not out.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(parts.directory / "model.onnx", out, weight_type=QuantType.QInt8)
    return out


def onnx_outputs(model: Path, inputs: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with np.load(inputs) as data:
        feeds = {k: data[k] for k in data.files}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def variant_bundle(
    parts: SampleParts,
    key: Ed25519PrivateKey,
    directory: Path,
    version: str = "1.1.0",
    *,
    wrong: tuple[str, ...] = (),
    garbage: tuple[str, ...] = (),
    include: tuple[str, ...] = ("onnx-fp32", "onnx-int8", "tflite-fp32"),
    peak: dict[str, dict[str, float]] | None = None,
    label: str = "variants",
    **changes: Any,
) -> Path:
    """A signed bundle with the `include`d variants; those in `wrong` carry golden
    outputs shifted by 3.0 (they fail the replay), those in `garbage` a model file of
    random bytes (no runtime loads it); `peak` sets variants' `peak_memory_mb`."""
    directory.mkdir(parents=True, exist_ok=True)
    files = parts.files()
    inputs = files["golden/inputs.npz"]
    int8 = int8_model(parts, directory)
    golden_int8 = directory / "golden-int8.npz"
    if not golden_int8.exists():
        np.savez(golden_int8, **onnx_outputs(int8, inputs))  # type: ignore[arg-type]
    table = {
        "onnx-fp32": ("onnx", "model.onnx", files["model.onnx"], "golden/outputs-onnx.npz",
                      files["golden/outputs-onnx.npz"], "fp32", None, None),
        "onnx-int8": ("onnx", "variants/onnx-int8.onnx", int8, "golden/onnx-int8.npz",
                      golden_int8, "int8", "dynamic", INT8_TOLERANCE),
        "tflite-fp32": ("tflite", "model.tflite", files["model.tflite"],
                        "golden/outputs-tflite.npz", files["golden/outputs-tflite.npz"], "fp32",
                        None, None),
    }  # fmt: skip
    out_files = {"golden/inputs.npz": inputs}
    variants = []
    formats: dict[str, str] = {}
    legacy_golden: dict[str, str] = {}
    for vid in include:
        fmt, arc, src, g_arc, g_src, precision, method, tolerance = table[vid]
        if vid in garbage:
            bad = directory / f"garbage-{vid}.bin"
            bad.write_bytes(np.random.default_rng(7).bytes(4096))
            src = bad
        if vid in wrong:
            with np.load(g_src) as data:
                shifted = {k: np.asarray(data[k]) + np.float32(3.0) for k in data.files}
            g_src = directory / f"wrong-{vid}.npz"
            np.savez(g_src, **shifted)  # type: ignore[arg-type]
            g_arc = f"golden/wrong-{vid}.npz"
        out_files[arc] = src
        out_files[g_arc] = g_src
        golden: dict[str, Any] = {"outputs": g_arc}
        if tolerance is not None:
            golden["tolerance"] = tolerance
        variants.append({"id": vid, "format": fmt, "file": arc, "precision": precision,
                         "method": method, "golden": golden})  # fmt: skip
        if peak and vid in peak:
            variants[-1]["peak_memory_mb"] = peak[vid]
        if precision == "fp32" and fmt not in formats:
            formats[fmt] = arc
            legacy_golden[fmt] = g_arc
    if not formats:  # a bundle of INT8 variants only: the legacy view is the first one
        first = variants[0]
        formats[first["format"]] = first["file"]
        legacy_golden[first["format"]] = first["golden"]["outputs"]
    golden_doc = {"inputs": "golden/inputs.npz", "outputs": legacy_golden}
    out = directory / f"{label}-{version}.edgebundle"
    body = {"version": version, "formats": formats, "golden": golden_doc, "variants": variants}
    body.update(changes)
    return make_bundle(parts, out, key, files=out_files, **body)

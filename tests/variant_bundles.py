"""Multi-variant bundles built from the sample digits model, for the variant-choice tests.

The sample (built by the pipeline) carries a static INT8 QDQ ONNX model and a float
TFLite one. Variants: `onnx-int8` (the sample's model.onnx, its golden outputs and its
own ONNX rule), `onnx-fp32` (the same graph with every QuantizeLinear/DequantizeLinear
folded back to float: weights dequantized, activations unquantized; golden outputs
computed here by onnxruntime), `tflite-fp32` (the sample's model.tflite and its rule).
A test may ask for a deliberately wrong golden file or a model file of random bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.helpers import SampleParts, make_bundle

FLOAT_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}


def float_model(parts: SampleParts, directory: Path) -> Path:
    """The sample's QDQ model as float: DequantizeLinear of an initializer becomes the
    float initializer, a QuantizeLinear -> DequantizeLinear pair on an activation becomes
    the Clip to its int8 range (no rounding). Built once per directory."""
    out = directory / "digits-fp32.onnx"
    if out.exists():
        return out
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(parts.directory / "model.onnx")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_inits = []
    produced_by_q = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    kept = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            zp = (
                numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
                if len(node.input) > 2 and node.input[2]
                else np.zeros_like(scale)
            )
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and q.ndim > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            w = ((q - zp) * scale).astype(np.float32)
            new_inits.append(numpy_helper.from_array(w, node.output[0]))
        elif node.op_type == "DequantizeLinear" and node.input[0] in produced_by_q:
            # Quantizing an activation also clips it to the int8 range: keep the clip
            # (in float), drop the rounding.
            quant = produced_by_q[node.input[0]]
            scale = float(numpy_helper.to_array(inits[quant.input[1]]))
            zp_array = numpy_helper.to_array(inits[quant.input[2]])
            info = np.iinfo(zp_array.dtype)
            zp = float(zp_array)
            low, high = (info.min - zp) * scale, (info.max - zp) * scale
            name = node.output[0]
            bounds = [f"{name}_clip_min", f"{name}_clip_max"]
            new_inits += [numpy_helper.from_array(np.array(v, np.float32), b)
                          for v, b in zip((low, high), bounds, strict=True)]  # fmt: skip
            kept.append(helper.make_node("Clip", [quant.input[0], *bounds], [name]))
        elif node.op_type == "QuantizeLinear":
            continue
        else:
            kept.append(node)
    used = {name for n in kept for name in n.input}
    del graph.node[:]
    graph.node.extend(kept)
    remaining = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(remaining + [i for i in new_inits if i.name in used])
    onnx.checker.check_model(model)
    onnx.save(model, out)
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
    fp32 = float_model(parts, directory)
    golden_fp32 = directory / "golden-fp32.npz"
    if not golden_fp32.exists():
        np.savez(golden_fp32, **onnx_outputs(fp32, inputs))  # type: ignore[arg-type]
    # The sample's own rule per format (the pipeline derived it from the quant steps).
    rules = parts.manifest["golden"]["tolerance"].get("formats", {})
    table = {
        "onnx-fp32": ("onnx", "variants/onnx-fp32.onnx", fp32, "golden/onnx-fp32.npz",
                      golden_fp32, "fp32", None, FLOAT_TOLERANCE),
        "onnx-int8": ("onnx", "model.onnx", files["model.onnx"], "golden/outputs-onnx.npz",
                      files["golden/outputs-onnx.npz"], "int8", "static", rules.get("onnx")),
        "tflite-fp32": ("tflite", "model.tflite", files["model.tflite"],
                        "golden/outputs-tflite.npz", files["golden/outputs-tflite.npz"], "fp32",
                        None, rules.get("tflite")),
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
        if fmt not in formats:  # the legacy view: the first variant of each format
            formats[fmt] = arc
            legacy_golden[fmt] = g_arc
    golden_doc = {"inputs": "golden/inputs.npz", "outputs": legacy_golden}
    out = directory / f"{label}-{version}.edgebundle"
    body = {"version": version, "formats": formats, "golden": golden_doc, "variants": variants}
    body.update(changes)
    return make_bundle(parts, out, key, files=out_files, **body)

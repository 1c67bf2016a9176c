"""Package a model someone already has into a signed bundle (no torch needed).

The model is run in a child process with each runtime it targets: that records
the golden outputs the device will replay and the peak memory and latency it
will be admitted by.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import DTYPES, SUFFIX, TensorSpec, write_bundle
from agent.signing import load_private_key
from export.measure import probe

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-3
DEFAULT_RTOL = 1e-3
GOLDEN_MAX_CASES = 16

_ONNX_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}  # fmt: skip


class PackageError(ValueError):
    """The inputs to packaging are wrong; the message says which and how."""


def onnx_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PackageError(f"onnxruntime cannot load {path}: {exc}") from exc

    def spec(arg: Any) -> TensorSpec:
        dtype = _ONNX_TYPES.get(arg.type)
        if dtype is None:
            raise PackageError(f"tensor {arg.name} has type {arg.type}, which bundles don't carry")
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
        return TensorSpec(arg.name, dtype, shape)

    return (
        tuple(spec(i) for i in session.get_inputs()),
        tuple(spec(o) for o in session.get_outputs()),
    )


def tflite_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    from agent.runtimes.litert import _interpreter_class

    interpreter_cls, _ = _interpreter_class()
    try:
        interp = interpreter_cls(model_path=str(path))
    except (ValueError, RuntimeError) as exc:
        raise PackageError(f"LiteRT cannot load {path}: {exc}") from exc

    def spec(d: dict[str, Any]) -> TensorSpec:
        dtype = np.dtype(d["dtype"]).name
        scale, zero = d.get("quantization", (0.0, 0))
        quant = {"scale": float(scale), "zero_point": int(zero)} if scale else None
        if dtype in ("int8", "uint8") and quant:
            dtype = "float32"  # the runtime layer (de)quantizes; the API stays float
        shape = tuple(int(x) for x in d.get("shape_signature", d["shape"]))
        return TensorSpec(d["name"], dtype, tuple(x if x > 0 else -1 for x in shape), quant)

    return (
        tuple(spec(d) for d in interp.get_input_details()),
        tuple(spec(d) for d in interp.get_output_details()),
    )


def load_golden_inputs(path: Path, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """Read .npz (keyed by input name) or .npy (for a single-input model)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PackageError(f"cannot read golden inputs {path}: {exc}") from exc
    if isinstance(loaded, np.ndarray):
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise PackageError(
                f"{path} holds one array but the model has {len(specs)} inputs ({names}); "
                "use an .npz keyed by input name"
            )
        return {specs[0].name: loaded}
    with loaded:
        return {k: loaded[k] for k in loaded.files}


def check_golden(inputs: Mapping[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> None:
    names = {s.name for s in specs}
    if set(inputs) != names:
        raise PackageError(
            f"golden inputs are named {sorted(inputs)}; the model's inputs are {sorted(names)}"
        )
    batch = {v.shape[0] if v.ndim else 0 for v in inputs.values()}
    if len(batch) != 1 or 0 in batch:
        raise PackageError("golden inputs need the same non-zero batch size (axis 0) for all")
    for s in specs:
        arr = inputs[s.name]
        if arr.dtype.name != s.dtype:
            raise PackageError(
                f"golden input {s.name} is {arr.dtype.name}; the model wants {s.dtype}"
            )
        if len(arr.shape) != len(s.shape) or any(
            d not in (-1, a) for d, a in zip(s.shape[1:], arr.shape[1:], strict=False)
        ):
            raise PackageError(
                f"golden input {s.name} has shape {list(arr.shape)}; the model wants {list(s.shape)}"
            )


def package_model(
    *,
    onnx_path: Path | None,
    tflite_path: Path | None,
    name: str,
    version: str,
    golden_inputs: Mapping[str, np.ndarray],
    key_path: Path,
    out_dir: Path,
    extra_manifest: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    labels: list[str] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    threads: int = 1,
    runs: int = 50,
) -> Path:
    """Write `out_dir/NAME-VERSION.edgebundle`, signed with the key at `key_path`."""
    if onnx_path is None and tflite_path is None:
        raise PackageError("give at least one model: an ONNX file, a TFLite file or both")
    key = load_private_key(Path(key_path))
    for p in (onnx_path, tflite_path):
        if p is not None and not Path(p).is_file():
            raise PackageError(f"model file {p} does not exist")
    if onnx_path is not None:
        inputs, outputs = onnx_specs(Path(onnx_path))
    else:
        assert tflite_path is not None
        inputs, outputs = tflite_specs(Path(tflite_path))
    for s in inputs + outputs:
        if s.dtype not in DTYPES:
            raise PackageError(f"tensor {s.name} has dtype {s.dtype}")
    golden = {k: np.ascontiguousarray(v[:GOLDEN_MAX_CASES]) for k, v in golden_inputs.items()}
    check_golden(golden, inputs)

    figures: dict[str, Any] = {
        "size_bytes": {},
        "latency_ms": {},
        "peak_memory_mb": {},
        "runtimes": {},
    }
    formats: dict[str, str] = {}
    golden_outputs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="edgerun-package-") as tmp:
        work = Path(tmp)
        files: dict[str, Path] = {}
        np.savez(work / "inputs.npz", **golden)  # type: ignore[arg-type]
        files["golden/inputs.npz"] = work / "inputs.npz"
        targets = [("onnx", onnx_path, "onnxruntime", "model.onnx"),
                   ("tflite", tflite_path, "litert", "model.tflite")]  # fmt: skip
        for fmt, src, runtime, arcname in targets:
            if src is None:
                continue
            files[arcname] = Path(src)
            formats[fmt] = arcname
            measured, produced = probe(Path(src), runtime, golden, inputs, outputs, threads, runs)
            out_file = work / f"outputs-{fmt}.npz"
            np.savez(out_file, **produced)  # type: ignore[arg-type]
            files[f"golden/outputs-{fmt}.npz"] = out_file
            golden_outputs[fmt] = f"golden/outputs-{fmt}.npz"
            figures["size_bytes"][fmt] = Path(src).stat().st_size
            figures["latency_ms"][runtime] = measured["latency_ms"]
            figures["peak_memory_mb"][runtime] = measured["model_peak_mb"]
            figures["runtimes"][runtime] = {
                k: measured[k] for k in ("library", "threads", "load_ms", "baseline_rss_mb")
            }
        for arcname, path in (extra_files or {}).items():
            files[arcname] = Path(path)
        extra = dict(extra_manifest or {})
        figures.update(extra.pop("figures", {}))
        manifest: dict[str, Any] = {
            "name": name,
            "version": version,
            "formats": formats,
            "inputs": [s.to_json() for s in inputs],
            "outputs": [s.to_json() for s in outputs],
            "labels": labels or [],
            "figures": figures,
            "golden": {
                "inputs": "golden/inputs.npz",
                "outputs": golden_outputs,
                "tolerance": {
                    "atol": DEFAULT_ATOL if atol is None else atol,
                    "rtol": DEFAULT_RTOL if rtol is None else rtol,
                },
            },
            **extra,
        }
        out = Path(out_dir) / f"{name}-{version}{SUFFIX}"
        write_bundle(out, manifest, files, key)
    log.info("packaged %s: %s", out, json.dumps(figures["peak_memory_mb"]))
    return out

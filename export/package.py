"""Package a model someone already has into a signed bundle (no torch needed).

The model is run in a child process with each runtime it targets: that records
the golden outputs the device will replay and the peak memory and latency it
will be admitted by.
"""

from __future__ import annotations

import json
import logging
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent import bundle
from agent.bundle import DTYPES, SUFFIX, TensorSpec, legacy_batch_axis, write_bundle
from agent.names import is_name
from agent.runtimes import REGISTRY, runtime_for_format
from agent.signing import load_private_key
from agent.tensors import slice_feeds
from agent.tolerance import Tolerance, ToleranceReport
from export.golden_rule import (
    GoldenRuleError,
    classifier_outputs,
    fp16_overflow,
    golden_rule,
    judge,
)
from export.measure import probe

log = logging.getLogger(__name__)

GOLDEN_MAX_CASES = 16

_ONNX_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}  # fmt: skip


class PackageError(ValueError):
    """The inputs to packaging are wrong; the message says which and how."""


BatchAxes = Mapping[str, "int | None"]

# What a manifest's variants[] may say (agent.bundle validates them on the device);
# a variant built here always states its precision, and None is "not quantized".
PRECISIONS = bundle.PRECISIONS
METHODS = (None, *bundle.METHODS)


@dataclass(frozen=True)
class VariantSpec:
    """One build of the model in a multi-variant bundle (DESIGN.md "Variants").

    Every variant honours the manifest's inputs/outputs: a device may serve any of
    them without the API changing. `atol` None: the bundle's rule for its precision.
    """

    id: str
    path: Path
    precision: str = "fp32"
    method: str | None = None
    built_for: str | None = None
    atol: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def format(self) -> str:
        return "tflite" if Path(self.path).suffix == ".tflite" else "onnx"

    def check(self) -> None:
        # The device's name rule (agent.names), lower case only here: the id names the
        # bundle's variants/<id> and golden/<id>.npz files, and two ids that differ only
        # in case would be one file where the bundle is unpacked on a case-blind disk.
        if not (is_name(self.id) and self.id == self.id.lower()):
            raise PackageError(
                f"variant id {self.id!r}: 1-64 of a-z 0-9 . _ -, the first a letter or digit"
            )
        if self.precision not in PRECISIONS:
            raise PackageError(f"variant {self.id}: precision {self.precision!r} is not one of "
                               + ", ".join(PRECISIONS))  # fmt: skip
        if self.method not in METHODS:
            raise PackageError(f"variant {self.id}: method {self.method!r} is not one of "
                               + ", ".join(map(repr, METHODS)))  # fmt: skip
        if Path(self.path).suffix not in (".onnx", ".tflite"):
            raise PackageError(f"variant {self.id}: {self.path} is neither .onnx nor .tflite")
        if not Path(self.path).is_file():
            raise PackageError(f"variant {self.id}: model file {self.path} does not exist")


def parse_variant_arg(item: str) -> VariantSpec:
    """`ID=PATH[,precision=P][,method=M][,built_for=T]` (from --variant)."""
    head, *opts = item.split(",")
    vid, sep, path = head.partition("=")
    if not sep or not vid.strip() or not path.strip():
        raise PackageError(f"--variant {item!r}: expected ID=PATH[,precision=int8][,method=static]")
    fields: dict[str, Any] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        key = key.strip()
        if not sep or key not in ("precision", "method", "built_for"):
            raise PackageError(f"--variant {item!r}: {opt!r} is not precision=, method= or "
                               "built_for=")  # fmt: skip
        fields[key] = value.strip() or None
    spec = VariantSpec(vid.strip(), Path(path.strip()), **fields)
    spec.check()
    return spec


# Dynamic dimension names exporters give the batch: torch.onnx's dynamic_axes
# examples, tf2onnx's "N", Keras's "batch_size", hand-written "B".
_BATCH_DIM_NAMES = frozenset({"bs", "b", "n", "nbatch", "num_batch"})


def _is_batch_name(dim: object, long: bool) -> bool:
    if not isinstance(dim, str):
        return False
    name = dim.strip().lower()
    return name.startswith("batch") if long else name in _BATCH_DIM_NAMES


def parse_batch_axes(items: list[str] | None) -> dict[str, int | None]:
    """`NAME=AXIS` or `NAME=none` (from --batch-axis) -> {name: axis or None}."""
    axes: dict[str, int | None] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        if not sep or not name or not value:
            raise PackageError(
                f"--batch-axis {item!r}: expected NAME=AXIS (e.g. state=1) or NAME=none"
            )
        if name in axes:
            raise PackageError(f"--batch-axis names {name!r} twice")
        if value in ("none", "null", "-"):
            axes[name] = None
            continue
        try:
            axes[name] = int(value)
        except ValueError:
            raise PackageError(
                f"--batch-axis {item!r}: {value!r} is not an axis; give an integer >= 0 or none"
            ) from None
    return axes


def _resolve_axes(
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    dims: Mapping[str, list[object]],
    given: BatchAxes,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Each tensor's batch axis: given on the command line, else a dim named like the
    batch, else the legacy rule (0 when the first dim is dynamic). Refuses what
    cannot be told apart instead of guessing."""
    known = {s.name for s in inputs + outputs}
    unknown = sorted(set(given) - known)
    if unknown:
        raise PackageError(
            f"--batch-axis names {unknown[0]!r}, which the model does not have; its tensors "
            f"are {', '.join(sorted(known))}"
        )

    def resolve(spec: TensorSpec, kind: str) -> TensorSpec:
        shape = list(spec.shape)
        if spec.name in given:
            axis = given[spec.name]
            if axis is not None:
                if not 0 <= axis < len(shape):
                    raise PackageError(
                        f"--batch-axis {spec.name}={axis}: {kind} {spec.name} has shape {shape} "
                        f"(rank {len(shape)}); the axis must be in 0..{len(shape) - 1} or none"
                        if shape
                        else f"--batch-axis {spec.name}={axis}: {kind} {spec.name} is 0-d "
                        "(a scalar); it can only be none"
                    )
                if shape[axis] != -1:
                    raise PackageError(
                        f"--batch-axis {spec.name}={axis}: axis {axis} of {kind} {spec.name} "
                        f"{shape} is fixed at {shape[axis]}; the batch axis must be dynamic"
                    )
            return replace(spec, batch_axis=axis)
        names = dims.get(spec.name, [])
        # "batch..." beats the one-letter names: [batch, N] is a batch of N points.
        named = [i for i, d in enumerate(names) if _is_batch_name(d, long=True)] or [
            i for i, d in enumerate(names) if _is_batch_name(d, long=False)
        ]
        if len(named) > 1:
            raise PackageError(
                f"{kind} {spec.name} {shape} has several dims named like a batch (axes "
                f"{named}); pass --batch-axis {spec.name}=AXIS"
            )
        if named:
            return replace(spec, batch_axis=named[0])
        return replace(spec, batch_axis=legacy_batch_axis(spec.shape))

    ins = tuple(resolve(s, "input") for s in inputs)
    outs = tuple(resolve(s, "output") for s in outputs)
    if any(s.batch_axis is not None for s in ins):
        for kind, specs in (("input", ins), ("output", outs)):
            for s in specs:
                if s.batch_axis is None and s.name not in given and -1 in s.shape:
                    # A dynamic dim behind a fixed first one ([2, -1, 128]) may well be the
                    # batch; a wrong guess would only show on the device.
                    axes = [i for i, d in enumerate(s.shape) if d == -1]
                    raise PackageError(
                        f"{kind} {s.name} {list(s.shape)} has dynamic axes {axes} but none is "
                        "named like a batch and its first axis is fixed, so the packager "
                        f"cannot tell where its batch is; pass --batch-axis {s.name}={axes[0]} "
                        f"(the axis that counts cases) or --batch-axis {s.name}=none (shared "
                        "by all cases)"
                    )
    return ins, outs


def onnx_specs(
    path: Path, batch_axes: BatchAxes | None = None
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
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

    args = list(session.get_inputs()) + list(session.get_outputs())
    return _resolve_axes(
        tuple(spec(i) for i in session.get_inputs()),
        tuple(spec(o) for o in session.get_outputs()),
        {a.name: list(a.shape) for a in args},
        batch_axes or {},
    )


def tflite_specs(
    path: Path, batch_axes: BatchAxes | None = None
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
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

    given = dict(batch_axes or {})

    def unfreeze(s: TensorSpec) -> TensorSpec:
        # Converters freeze the batch; the agent runs larger requests in slices of the
        # frozen size, so a batch axis named on the command line is dynamic to callers.
        axis = given.get(s.name)
        if axis is None or not 0 <= axis < len(s.shape):
            return s
        return replace(s, shape=(*s.shape[:axis], -1, *s.shape[axis + 1 :]))

    # TFLite keeps no dimension names: the legacy rule or --batch-axis.
    return _resolve_axes(
        tuple(unfreeze(spec(d)) for d in interp.get_input_details()),
        tuple(unfreeze(spec(d)) for d in interp.get_output_details()),
        {},
        given,
    )


def batch_on_axis_0(specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    """Every (non-0-d) tensor counts cases on axis 0, made dynamic: a recipe's contract
    (TensorDecl), for TFLite files whose converter froze that axis."""
    return tuple(
        replace(s, shape=(-1, *s.shape[1:]), batch_axis=0) if s.shape else s for s in specs
    )


# What numpy raises for a file that is not a (whole) .npy/.npz: a truncated or foreign
# zip, an empty file, a pickled object (refused), a corrupt compressed member.
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def load_golden_inputs(path: Path, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """Read .npz (keyed by input name) or .npy (for a single-input model)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except _UNREADABLE as exc:
        raise PackageError(
            f"cannot read golden inputs {path}: {exc or type(exc).__name__}"
        ) from exc
    if isinstance(loaded, np.ndarray):
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise PackageError(
                f"{path} holds one array but the model has {len(specs)} inputs ({names}); "
                "use an .npz keyed by input name"
            )
        return {specs[0].name: loaded}
    with loaded:
        try:
            return {k: loaded[k] for k in loaded.files}
        except _UNREADABLE as exc:
            raise PackageError(
                f"cannot read golden inputs {path}: {exc or type(exc).__name__}"
            ) from exc


def _where(spec: TensorSpec) -> str:
    return "no batch axis" if spec.batch_axis is None else f"batch on axis {spec.batch_axis}"


def check_golden(inputs: Mapping[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> int:
    """Refuse golden inputs that don't fit the model; return how many cases they hold."""
    names = {s.name for s in specs}
    if set(inputs) != names:
        raise PackageError(
            f"golden inputs are named {sorted(inputs)}; the model's inputs are {sorted(names)}"
        )
    batch: tuple[int, TensorSpec] | None = None
    for s in specs:
        arr = inputs[s.name]
        if arr.dtype.name != s.dtype:
            raise PackageError(
                f"golden input {s.name} is {arr.dtype.name}; the model wants {s.dtype}"
            )
        if arr.ndim != len(s.shape) or any(
            d not in (-1, a) for d, a in zip(s.shape, arr.shape, strict=False)
        ):
            raise PackageError(
                f"golden input {s.name} has shape {list(arr.shape)}; the model wants "
                f"{list(s.shape)} (-1 = any, {_where(s)})"
            )
        if s.batch_axis is None:
            continue
        size = int(arr.shape[s.batch_axis])
        if size == 0:
            raise PackageError(
                f"golden input {s.name} holds no case (size 0 on its batch axis {s.batch_axis})"
            )
        if batch is None:
            batch = (size, s)
        elif size != batch[0]:
            other = batch[1]
            raise PackageError(
                f"golden input {s.name} has {size} cases on axis {s.batch_axis}; "
                f"{other.name} has {batch[0]} on axis {other.batch_axis}: they must agree"
            )
    return 1 if batch is None else batch[0]


def _check_output_axes(
    outputs: tuple[TensorSpec, ...], produced: Mapping[str, np.ndarray], batch: int
) -> None:
    """The model's own answer tells whether each output's batch axis is where we think."""
    for s in outputs:
        got = produced.get(s.name)
        if got is None or s.batch_axis is None:
            continue
        if got.ndim <= s.batch_axis or got.shape[s.batch_axis] != batch:
            fits = [i for i, n in enumerate(got.shape) if n == batch and s.shape[i] == -1]
            hint = (
                f"pass --batch-axis {s.name}={fits[0]}"
                if len(fits) == 1
                else f"pass --batch-axis {s.name}=AXIS or {s.name}=none"
            )
            raise PackageError(
                f"output {s.name} came out as {list(got.shape)} for {batch} golden case(s), "
                f"so its batch is not on axis {s.batch_axis}; {hint}"
            )


def _variant_entry(spec: VariantSpec, arcname: str, golden_file: str, runtime: str,
                   measured: Mapping[str, Any], rule: Tolerance | None) -> dict[str, Any]:  # fmt: skip
    """One `variants[]` entry of the manifest (DESIGN.md "Variants"); without `rule` the
    variant's tolerance is the manifest's golden rule (a legacy format's model)."""
    golden_entry: dict[str, Any] = {"outputs": golden_file}
    if rule is not None:
        golden_entry["tolerance"] = rule.to_json()
    entry: dict[str, Any] = {
        "id": spec.id, "format": spec.format, "file": arcname, "precision": spec.precision,
        "method": spec.method, "golden": golden_entry,
        "peak_memory_mb": {runtime: measured["model_peak_mb"]},
        "latency_ms": {runtime: measured["latency_ms"]},
        "size_bytes": Path(spec.path).stat().st_size,
    }  # fmt: skip
    if spec.built_for:
        entry["built_for"] = spec.built_for
    entry.update(spec.extra)
    return entry


def _same_contract(v: VariantSpec, inputs: tuple[TensorSpec, ...],
                   outputs: tuple[TensorSpec, ...]) -> None:  # fmt: skip
    """A variant must take and give what the manifest declares (names, dtypes, ranks);
    a TFLite file's frozen batch and renamed tensors are matched by position."""
    if v.format == "tflite":
        ins, outs = (batch_on_axis_0(x) for x in tflite_specs(Path(v.path)))
        pairs = list(zip(ins, inputs, strict=False)) + list(zip(outs, outputs, strict=False))
        same = (
            len(ins) == len(inputs)
            and len(outs) == len(outputs)
            and all(a.dtype == b.dtype and len(a.shape) == len(b.shape) for a, b in pairs)
        )
    else:
        ins, outs = onnx_specs(Path(v.path))

        def key(s: TensorSpec) -> tuple[str, str, int]:
            return (s.name, s.dtype, len(s.shape))

        same = [key(s) for s in ins] == [key(s) for s in inputs] and [
            key(s) for s in outs] == [key(s) for s in outputs]  # fmt: skip
    if not same:
        raise PackageError(
            f"variant {v.id} ({v.path}) does not take and give the bundle's tensors: it has "
            f"inputs {[(s.name, s.dtype, list(s.shape)) for s in ins]}, outputs "
            f"{[(s.name, s.dtype, list(s.shape)) for s in outs]}; every variant serves the "
            "same API"
        )


def _prefixed(
    record: Callable[[str, ToleranceReport], None], prefix: str
) -> Callable[[str, ToleranceReport], None]:
    """`record`, hearing each label as "PREFIX label" (a variant's replays)."""
    return lambda label, report: record(f"{prefix} {label}", report)


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
    batch_axes: BatchAxes | None = None,
    variants: list[VariantSpec] | None = None,
    int8_atol: float | None = None,
    record: Callable[[str, ToleranceReport], None] | None = None,
    tolerance: Tolerance | None = None,
) -> Path:
    """Write `out_dir/NAME-VERSION.edgebundle`, signed with the key at `key_path`.

    `batch_axes` overrides the batch axis the packager infers for a tensor (name ->
    axis, or None for a tensor all cases share). The golden tolerance rule is derived
    (export.golden_rule); `atol`/`rtol` replace its CPU bound. `record` is told how
    each replay of the golden cases fared under the rule ("onnx cuda", report).
    `tolerance` is a rule derived already (the build pipeline's golden gate): it is
    written as given and judged again on these golden outputs.

    `variants`: more builds of the same model (multi-variant bundle). `onnx_path` and
    `tflite_path` stay the legacy `formats` (what an agent that knows no variants
    serves); each is also a variant, so a variant-aware device measures them all.
    Variants must take and give the same tensors (names, dtypes, ranks) as the legacy
    model. Each other variant gets its own golden outputs and its own rule (derived
    the same way, on its own file; `int8_atol` replaces the CPU bound of INT8/mixed
    ones); the legacy ones use the bundle's rule.
    """
    variants = list(variants or [])
    if onnx_path is None and tflite_path is None:
        raise PackageError("give at least one model: an ONNX file, a TFLite file or both")
    for v in variants:
        v.check()
    ids = [v.id for v in variants]
    if len(set(ids)) != len(ids):
        raise PackageError(f"variant ids must be unique, got {ids}")
    key = load_private_key(Path(key_path))
    for p in (onnx_path, tflite_path):
        if p is not None and not Path(p).is_file():
            raise PackageError(f"model file {p} does not exist")
    if onnx_path is not None:
        inputs, outputs = onnx_specs(Path(onnx_path), batch_axes)
    else:
        assert tflite_path is not None
        inputs, outputs = tflite_specs(Path(tflite_path), batch_axes)
    for s in inputs + outputs:
        if s.dtype not in DTYPES:
            raise PackageError(f"tensor {s.name} has dtype {s.dtype}")
    cases = check_golden(golden_inputs, inputs)
    for v in variants:  # before anything is measured
        if not any(p is not None and Path(p).resolve() == Path(v.path).resolve()
                   for p in (onnx_path, tflite_path)):  # fmt: skip
            _same_contract(v, inputs, outputs)
    golden = {
        # (np.ascontiguousarray would turn a 0-d input into shape [1])
        k: np.asarray(v, order="C")
        for k, v in slice_feeds(inputs, golden_inputs, 0, GOLDEN_MAX_CASES).items()
    }
    cases = min(cases, GOLDEN_MAX_CASES)

    figures: dict[str, Any] = {
        "size_bytes": {},
        "latency_ms": {},
        "peak_memory_mb": {},
        "runtimes": {},
    }
    formats: dict[str, str] = {}
    golden_outputs: dict[str, str] = {}
    references: dict[str, dict[str, np.ndarray]] = {}
    models: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="edgerun-package-") as tmp:
        work = Path(tmp)
        files: dict[str, Path] = {}
        np.savez(work / "inputs.npz", **golden)  # type: ignore[arg-type]
        files["golden/inputs.npz"] = work / "inputs.npz"
        legacy: dict[str, str] = {}  # format -> variant id of the legacy model
        pending: list[tuple[VariantSpec, str, str, str, Mapping[str, Any], Any]] = []
        # One probe per registered runtime whose format was given (agent/runtimes).
        sources = {"onnx": onnx_path, "tflite": tflite_path}
        for runtime, cls in REGISTRY.items():
            fmt = cls.format
            src = sources.get(fmt)
            if src is None or fmt in formats:
                continue
            arcname = f"model.{fmt}"
            files[arcname] = Path(src)
            formats[fmt] = arcname
            measured, produced = probe(Path(src), runtime, golden, inputs, outputs, threads, runs)
            _check_output_axes(outputs, produced, cases)
            references[fmt] = produced
            models[fmt] = Path(src)
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
            same = next((v for v in variants if Path(v.path).resolve() == Path(src).resolve()),
                        None)  # fmt: skip
            if variants:
                spec = same or VariantSpec(fmt, Path(src))
                legacy[fmt] = spec.id
                pending.append((spec, arcname, golden_outputs[fmt], runtime, measured, None))
        classes = classifier_outputs(((s.name, s.shape) for s in outputs), labels)
        try:
            derived, refs, replays = golden_rule(
                models,
                (inputs, outputs),
                golden,
                classes,
                references=references,
                atol=atol,
                rtol=rtol,
            )
            rule = tolerance or derived
            figures["golden_replays"] = judge(rule, refs, replays, record)
        except GoldenRuleError as exc:
            raise PackageError(str(exc)) from exc
        # Variant id -> outputs that overflow FP16 (the variant then says FP16 is not allowed).
        overflow: dict[str, tuple[str, ...]] = {
            vid: fp16_overflow(replays.get(fmt, [])) for fmt, vid in legacy.items()
        }
        for v in variants:
            if v.id in legacy.values():
                continue
            try:
                runtime = runtime_for_format(v.format)
            except KeyError as exc:
                raise PackageError(f"variant {v.id}: {exc.args[0]}") from None
            measured, produced = probe(Path(v.path), runtime, golden, inputs, outputs, threads,
                                       runs)  # fmt: skip
            _check_output_axes(outputs, produced, cases)
            out_file = work / f"outputs-{v.id}.npz"
            np.savez(out_file, **produced)  # type: ignore[arg-type]
            arc = f"variants/{v.id}{Path(v.path).suffix}"
            files[arc] = Path(v.path)
            files[f"golden/{v.id}.npz"] = out_file
            bound = (
                int8_atol if v.precision in ("int8", "mixed") and int8_atol is not None else atol
            )
            try:
                own, vrefs, vreplays = golden_rule(
                    {v.format: Path(v.path)}, (inputs, outputs), golden, classes,
                    references={v.format: produced}, atol=bound, rtol=rtol,
                )  # fmt: skip
                figures.setdefault("variant_golden_replays", {})[v.id] = judge(
                    own, vrefs, vreplays,
                    None if record is None else _prefixed(record, v.id),
                )  # fmt: skip
            except GoldenRuleError as exc:
                raise PackageError(f"variant {v.id}: {exc}") from exc
            overflow[v.id] = fp16_overflow(vreplays.get(v.format, []))
            pending.append((v, arc, f"golden/{v.id}.npz", runtime, measured, own))
        entries = [_variant_entry(*item) for item in pending]
        for entry, (spec, *_) in zip(entries, pending, strict=True):
            over = overflow.get(spec.id, ())
            if not over:
                continue
            if spec.precision == "fp16":
                raise PackageError(
                    f"variant {spec.id} is precision fp16, but the model's activations "
                    f"overflow FP16: {', '.join(over)} come out non-finite with every tensor "
                    "rounded to FP16 (max 65504); ship it as fp32, or rescale the layers that "
                    "overflow (e.g. normalize inputs) and build again"
                )
            # The agent then never enables TensorRT's FP16 for it (agent.accelerator).
            entry["fp16_allowed"] = False
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
                "tolerance": rule.to_json(),
            },
            **extra,
        }
        if entries:
            manifest["variants"] = entries
        out = Path(out_dir) / f"{name}-{version}{SUFFIX}"
        write_bundle(out, manifest, files, key)
    log.info("packaged %s: %s", out, json.dumps(figures["peak_memory_mb"]))
    return out

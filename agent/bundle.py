"""The edgerun bundle: one signed archive holding a model and its evidence.

Layout and rules are in docs/DESIGN.md. Nothing before the signature is
trusted: the archive is a strict ustar subset read by agent.ustar with hard
limits, the manifest's size and nesting are bounded before it is parsed
(agent.strictjson), and only then is the signature checked. A validly signed
manifest is still type-checked field by field (a leaked key or a buggy builder
must not brick devices), every member is checked against it while it streams,
golden files' headers are read with caps before anything would allocate them
(agent.npz), and nothing is written outside the destination directory. Every
failure is a BundleError subclass with its stable code (agent.bundle_errors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent import __version__ as AGENT_VERSION
from agent import strictjson, ustar
from agent import tolerance as tolerance_rule
from agent.bundle_errors import (
    BundleError,
    BundleFormatError,
    GoldenFileError,
    HashMismatchError,
    IncompatibleAgentError,
    MissingFileError,
    MissingManifestError,
    OversizeError,
    SchemaError,
    SignatureError,
    SizeMismatchError,
    UnlistedFileError,
    UnpackError,
    UnsafeMemberError,
    UntrustedSignerError,
    VersionNotNewerError,
)
from agent.names import NameRuleError, check_name, path_problem, shown
from agent.npz import ArrayHeader, inspect_npz
from agent.schema_numbers import bounded_number
from agent.signing import key_id, sign, verify
from agent.tolerance import Tolerance, parse_tolerance
from agent.version import VersionFormatError, compare_versions, parse_version

log = logging.getLogger(__name__)

SCHEMA = "edgerun.bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SIGNATURE_BYTES = 64
SUFFIX = ".edgebundle"
FORMATS = ("onnx", "tflite")
DTYPES = (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64",
    "float16", "float32", "float64",
)  # fmt: skip
_CHUNK = 1 << 20

# Bounds of a manifest's fields (docs/DESIGN.md, "Bundle"). They are far above what
# any real bundle uses and far below what would hurt a device.
MAX_FILES = 10_000
MAX_TENSORS = 64
MAX_RANK = 16
MAX_DIM = 2**31 - 1
MAX_TENSOR_NAME = 256
MAX_LABELS = 100_000
MAX_LABEL = 256
MAX_SHORT_TEXT = 64  # created, key_id, runtime names
# The golden tolerance rule and its bounds live in agent.tolerance (one rule for the
# device, edge-export package and the build pipeline); re-exported for older callers.
MAX_ATOL = tolerance_rule.MAX_ATOL
MAX_RTOL = tolerance_rule.MAX_RTOL
ATOL_FLOOR = tolerance_rule.ALLOWANCE_FLOOR
ATOL_SHARE = tolerance_rule.ALLOWANCE_SHARE
MIN_PEAK_MB = 1.0  # loading any runtime library costs more than this
MAX_VARIANTS = 16  # each one is measured on the device at validation
PRECISIONS = ("fp32", "fp16", "int8", "mixed")
METHODS = ("static", "dynamic", "qat", "mixed")  # or null (not quantized)
MAX_PEAK_MB = float(1 << 20)  # 1 TiB

# The config keys behind Limits, named in refusals so a person knows what to raise.
_HINTS = {
    "bundle": "bundle_limits.max_bundle_mb",
    "member": "bundle_limits.max_member_mb",
    "members": "bundle_limits.max_members",
}


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Limits:
    """Caps applied while reading; defaults suit models for small devices."""

    max_bundle_bytes: int = 1 << 30
    max_member_bytes: int = 768 << 20
    max_manifest_bytes: int = 1 << 20
    max_members: int = 64
    max_golden_cases: int = 256  # edge-export writes 16
    max_golden_bytes: int = 64 << 20  # declared array bytes per golden file
    max_golden_arrays: int = 64


LEGACY_BATCH_AXIS = -1  # TensorSpec's default: apply legacy_batch_axis() to its shape


def legacy_batch_axis(shape: tuple[int, ...]) -> int | None:
    """The rule for manifests written before `batch_axis`: 0 when the first dim is dynamic."""
    return 0 if shape and shape[0] == -1 else None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 marks a dynamic dimension
    quantization: dict[str, Any] | None = None
    # The axis that counts cases (rows), or None for a tensor every case shares (a
    # 0-d sample rate, a lookup table). Left at LEGACY_BATCH_AXIS it follows the
    # legacy rule, so manifests and code that predate the field keep their meaning.
    batch_axis: int | None = LEGACY_BATCH_AXIS

    def __post_init__(self) -> None:
        if self.batch_axis == LEGACY_BATCH_AXIS:
            object.__setattr__(self, "batch_axis", legacy_batch_axis(self.shape))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "batch_axis": self.batch_axis,
        }
        if self.quantization is not None:
            out["quantization"] = self.quantization
        return out


@dataclass(frozen=True)
class Variant:
    """One build of the bundle's model: a file one runtime format reads, with its own
    golden outputs and tolerance. Every variant honours the manifest's inputs and
    outputs, so the served API does not change with the variant a device picks."""

    id: str
    format: str
    file: str
    precision: str | None = None  # fp32 | fp16 | int8 | mixed; None: not stated
    method: str | None = None  # static | dynamic | qat | mixed; None: not quantized
    built_for: str | None = None  # the preset/ISA it was built for, as the builder named it
    golden_outputs: str | None = None  # .npz of this variant's outputs on golden.inputs
    # The rule its golden outputs are judged by (agent.tolerance): its own
    # `golden.tolerance`, else the manifest's rule for its format.
    tolerance: Tolerance = field(default_factory=Tolerance)
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    legacy: bool = False  # derived from `formats` (no `variants` key)
    # False: the builder found its activations overflow FP16, so no runtime may compute
    # it in FP16 whatever its precision (TensorRT's FP16 stays off: agent.accelerator).
    fp16_allowed: bool = True

    @property
    def golden_atol(self) -> float:
        return self.tolerance.atol

    @property
    def golden_rtol(self) -> float:
        return self.tolerance.rtol

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "format": self.format,
            "file": self.file,
            "precision": self.precision,
            "method": self.method,
            "built_for": self.built_for,
        }


@dataclass(frozen=True)
class Manifest:
    raw: dict[str, Any]
    name: str
    version: str
    files: dict[str, tuple[str, int]]
    formats: dict[str, str]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    golden_inputs: str | None
    golden_outputs: dict[str, str]
    golden_tolerance: Tolerance
    peak_memory_mb: dict[str, float]
    min_agent_version: str
    key_id: str
    # Never empty: derived from `formats` (one variant per format, id = the format)
    # when the manifest has no `variants`.
    variants: tuple[Variant, ...] = ()

    def variant(self, variant_id: str) -> Variant | None:
        return next((v for v in self.variants if v.id == variant_id), None)

    @property
    def golden_files(self) -> tuple[str, ...]:
        """Every golden .npz the manifest names (inputs, legacy and per-variant outputs)."""
        paths = [self.golden_inputs, *self.golden_outputs.values()]
        paths += [v.golden_outputs for v in self.variants]
        return tuple(dict.fromkeys(p for p in paths if p is not None))

    @property
    def golden_atol(self) -> float:
        return self.golden_tolerance.atol

    @property
    def golden_rtol(self) -> float:
        return self.golden_tolerance.rtol

    @property
    def batchable(self) -> bool:
        """True when every tensor counts cases on axis 0: requests may then be stacked."""
        return all(t.batch_axis == 0 for t in self.inputs + self.outputs)

    @property
    def figures(self) -> dict[str, Any]:
        figures = self.raw.get("figures", {})
        return figures if isinstance(figures, dict) else {}


@dataclass
class VerifiedBundle:
    path: Path
    sha256: str
    manifest: Manifest
    manifest_bytes: bytes
    signer: str
    directory: Path | None = None  # set when unpacked


# --------------------------------------------------------------------------- manifest


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)


def _req(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise SchemaError(f"manifest: missing field {where}{key}")
    return _typed(obj[key], kind, f"{where}{key}")


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise SchemaError(
            f"manifest: field {where} is {type(value).__name__}, expected {_kind_name(kind)}"
        )
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return (kind,) if isinstance(kind, type) else kind


def _opt(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """An optional field: absent or null gives None, anything else must be `kind`."""
    value = obj.get(key)
    return None if value is None else _typed(value, kind, f"{where}{key}")


def _text(value: Any, where: str, limit: int) -> str:
    _typed(value, str, where)
    if len(value) > limit or not value.isprintable():
        raise SchemaError(
            f"manifest: field {where} {shown(value)} must be at most {limit} printable characters"
        )
    return str(value)


def _tensor_name(name: str, at: str) -> None:
    if not name or len(name) > MAX_TENSOR_NAME or not (name.isascii() and name.isprintable()):
        raise SchemaError(
            f"manifest: {at}name {shown(name)} must be 1-{MAX_TENSOR_NAME} printable ASCII"
        )


def _shape(shape: list[Any], at: str) -> None:
    if len(shape) > MAX_RANK or not all(
        isinstance(d, int) and not isinstance(d, bool) and -1 <= d <= MAX_DIM for d in shape
    ):
        raise SchemaError(
            f"manifest: {at}shape {shown(shape)} must be at most {MAX_RANK} integers "
            f"from -1 (dynamic) to {MAX_DIM}"
        )


def _quantization(quant: dict[str, Any], at: str) -> None:
    for key, value in quant.items():
        values = value if isinstance(value, list) else [value]
        if key not in ("scale", "zero_point") or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ):
            raise SchemaError(
                f"manifest: {at}quantization.{shown(key, 30)} must be scale/zero_point "
                "given as finite numbers"
            )


def _tensor_specs(items: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list) or not items:
        raise SchemaError(f"manifest: {where} must be a non-empty list of tensors")
    if len(items) > MAX_TENSORS:
        raise SchemaError(f"manifest: {where} lists {len(items)} tensors; the cap is {MAX_TENSORS}")
    specs = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        at = f"{where}[{i}]."
        if not isinstance(item, dict):
            raise SchemaError(f"manifest: {where}[{i}] must be an object")
        name = _req(item, "name", str, at)
        dtype = _req(item, "dtype", str, at)
        shape = _req(item, "shape", list, at)
        _tensor_name(name, at)
        if dtype not in DTYPES:
            raise SchemaError(
                f"manifest: {at}dtype {shown(dtype)} is not one of {', '.join(DTYPES)}"
            )
        _shape(shape, at)
        if name in seen:
            raise SchemaError(f"manifest: {where} names {name!r} twice")
        seen.add(name)
        quant = item.get("quantization")
        if quant is not None and not isinstance(quant, dict):
            raise SchemaError(f"manifest: {at}quantization must be an object or null")
        if quant is not None:
            _quantization(quant, at)
        axis = _batch_axis(item, tuple(shape), at)
        specs.append(TensorSpec(name, dtype, tuple(shape), quant, axis))
    return tuple(specs)


def _batch_axis(item: Mapping[str, Any], shape: tuple[int, ...], at: str) -> int | None:
    """`batch_axis`: absent = legacy rule; null = no batch axis; else a dynamic dim's index."""
    if "batch_axis" not in item:
        return legacy_batch_axis(shape)
    axis = item["batch_axis"]
    if axis is None:
        return None
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise SchemaError(
            f"manifest: {at}batch_axis is {type(axis).__name__}, expected an integer or null"
        )
    if not shape:
        raise SchemaError(
            f"manifest: {at}batch_axis is {axis} but the tensor is 0-d (a scalar); "
            "use null: a scalar has no batch axis"
        )
    if not 0 <= axis < len(shape):
        raise SchemaError(
            f"manifest: {at}batch_axis {axis} is outside the shape {list(shape)} "
            f"(rank {len(shape)}: 0..{len(shape) - 1}, or null for no batch axis)"
        )
    if shape[axis] != -1:
        raise SchemaError(
            f"manifest: {at}batch_axis {axis} names a fixed dimension of size {shape[axis]} "
            f"in {list(shape)}; the batch axis must be dynamic (-1)"
        )
    return axis


def _files(raw: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
    files_raw = _req(raw, "files", dict, "")
    if len(files_raw) > MAX_FILES:
        raise SchemaError(f"manifest: files lists {len(files_raw)} files; the cap is {MAX_FILES}")
    files: dict[str, tuple[str, int]] = {}
    for path, entry in files_raw.items():
        _check_member_name(path)
        if path in (MANIFEST, SIGNATURE):
            raise SchemaError(f"manifest: files must not list {path}")
        if not isinstance(entry, dict):
            raise SchemaError(f"manifest: files[{path!r}] must be an object")
        digest = _req(entry, "sha256", str, f"files[{path!r}].")
        size = _req(entry, "size", int, f"files[{path!r}].")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise SchemaError(f"manifest: files[{path!r}].sha256 is not 64 lowercase hex digits")
        if size < 0:
            raise SchemaError(f"manifest: files[{path!r}].size is negative")
        files[path] = (digest, size)
    # "a" and "a/b" cannot both be files once unpacked: refuse before writing either.
    for path in files:
        parts = path.split("/")
        for n in range(1, len(parts)):
            folder = "/".join(parts[:n])
            if folder in files:
                raise SchemaError(
                    f"manifest: files lists {folder!r} as a file and as the folder of {path!r}"
                )
    return files


def _golden(
    raw: Mapping[str, Any],
    files: Mapping[str, Any],
    formats: Mapping[str, str],
    outputs: tuple[TensorSpec, ...],
) -> tuple[str | None, dict[str, str], Tolerance]:
    golden = _opt(raw, "golden", dict, "")
    if golden is None:
        return None, {}, Tolerance()
    g_inputs = _opt(golden, "inputs", str, "golden.")
    g_outputs = _opt(golden, "outputs", dict, "golden.") or {}
    for path, where in [(g_inputs, "golden.inputs"), *((p, f"golden.outputs.{f}") for f, p in
                                                        g_outputs.items())]:  # fmt: skip
        if path is not None:
            _npz_file(path, files, where)
    for fmt in g_outputs:
        if fmt not in formats:
            raise SchemaError(
                f"manifest: golden.outputs.{shown(fmt, 30)} is not a format of this bundle"
            )
    # Both-or-neither of inputs and outputs is judged by parse_manifest: with `variants`
    # the outputs may all be the variants' own.
    tolerance = parse_tolerance(
        _opt(golden, "tolerance", dict, "golden."),
        "golden.tolerance",
        outputs=[s.name for s in outputs],
        formats=sorted(carried_formats(raw)),
    )
    return g_inputs, dict(g_outputs), tolerance


def carried_formats(raw: Mapping[str, Any]) -> set[str]:
    """The model formats a raw manifest carries: its `formats` and its variants' formats.

    Only what a per-format golden rule may name; the entries themselves are checked
    where they are parsed (an unknown variant format is refused there).
    """
    legacy = raw.get("formats")
    carried = {f for f in legacy if isinstance(f, str)} if isinstance(legacy, dict) else set()
    variants = raw.get("variants")
    for item in variants if isinstance(variants, list) else ():
        if isinstance(item, dict) and isinstance(item.get("format"), str):
            carried.add(item["format"])
    return carried


def without_absent_format_rules(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """`manifest` less the `golden.tolerance.formats` rules of known formats it does not carry.

    A builder that leaves a format out (a device-sized bundle, a test rig keeping only
    the ONNX model) keeps the rule of the manifest it started from; the reader refuses
    a rule for a format the bundle lacks, so the writer drops it. A name that is no
    known format stays, for the reader to refuse as the mistake it likely is.
    """
    body = dict(manifest)
    golden = body.get("golden")
    tolerance = golden.get("tolerance") if isinstance(golden, dict) else None
    rules = tolerance.get("formats") if isinstance(tolerance, dict) else None
    if (
        not isinstance(golden, dict)
        or not isinstance(tolerance, dict)
        or not isinstance(rules, dict)
    ):
        return body
    carried = carried_formats(body)
    kept = {f: r for f, r in rules.items() if f in carried or f not in FORMATS}
    if len(kept) == len(rules):
        return body
    log.info(
        "golden.tolerance: dropped the rules of formats the bundle does not carry: %s",
        ", ".join(sorted(set(rules) - set(kept))),
    )
    trimmed = {k: v for k, v in tolerance.items() if k != "formats"}
    if kept:
        trimmed["formats"] = kept
    body["golden"] = {**golden, "tolerance": trimmed}
    return body


def _npz_file(path: Any, files: Mapping[str, Any], where: str) -> str:
    if not isinstance(path, str) or path not in files or not path.endswith(".npz"):
        raise SchemaError(f"manifest: {where} names {shown(path)}, which is not a listed .npz file")
    return path


def _choice(value: Any, where: str, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in allowed:
        raise SchemaError(
            f"manifest: {where} is {shown(value)}; expected null or one of {', '.join(allowed)}"
        )
    return value


def _peak_map(value: Any, where: str) -> dict[str, float]:
    """`{runtime name: MB}` with the runtime-name rule and the MB bounds."""
    if value is None:
        return {}
    _typed(value, dict, where)
    out: dict[str, float] = {}
    for runtime, mb in value.items():
        at = f"{where}.{shown(runtime, 30)}"
        if not isinstance(mb, int | float) or isinstance(mb, bool):
            raise SchemaError(
                f"manifest: {at} is {type(mb).__name__}; {where} must map runtime names to numbers"
            )
        try:
            check_name(runtime, "runtime name")
        except NameRuleError as exc:
            raise SchemaError(f"manifest: {where}: {exc}") from None
        out[runtime] = bounded_number(mb, at, MIN_PEAK_MB, MAX_PEAK_MB)
    return out


def _variants(
    raw: Mapping[str, Any],
    files: Mapping[str, Any],
    default: Tolerance,
    outputs: tuple[TensorSpec, ...],
) -> tuple[Variant, ...]:
    """The `variants` list, every field bounded and type-checked (docs/DESIGN.md)."""
    items = _req(raw, "variants", list, "")
    if not items:
        raise SchemaError("manifest: variants is empty; omit it or list at least one variant")
    if len(items) > MAX_VARIANTS:
        raise SchemaError(
            f"manifest: variants lists {len(items)} variants; the cap is {MAX_VARIANTS}"
        )
    variants: list[Variant] = []
    ids: set[str] = set()
    used: dict[str, str] = {}
    for i, item in enumerate(items):
        at = f"variants[{i}]."
        if not isinstance(item, dict):
            raise SchemaError(f"manifest: variants[{i}] must be an object")
        vid = _req(item, "id", str, at)
        try:
            check_name(vid, f"manifest: {at}id")
        except NameRuleError as exc:
            raise SchemaError(str(exc)) from None
        if vid in ids:
            raise SchemaError(f"manifest: variants names id {vid!r} twice")
        ids.add(vid)
        at = f"variants.{vid}."
        fmt = _req(item, "format", str, at)
        if fmt not in FORMATS:
            raise SchemaError(
                f"manifest: {at}format {shown(fmt)} is not one of {', '.join(FORMATS)}"
            )
        path = _req(item, "file", str, at)
        if path not in files:
            raise SchemaError(f"manifest: {at}file names {shown(path)}, which is not in files")
        if path in used:
            raise SchemaError(
                f"manifest: {at}file {path!r} is also the file of variant {used[path]!r}"
            )
        used[path] = vid
        built_for = item.get("built_for")
        if built_for is not None:
            _text(built_for, f"{at}built_for", MAX_SHORT_TEXT)
        golden = _opt(item, "golden", dict, at)
        g_outputs = None
        # Without its own tolerance, the manifest's rule for the variant's format.
        tolerance = default.for_format(fmt)
        if golden is not None:
            g_outputs = _npz_file(_req(golden, "outputs", str, f"{at}golden."), files,
                                  f"{at}golden.outputs")  # fmt: skip
            raw_tolerance = _opt(golden, "tolerance", dict, f"{at}golden.")
            if raw_tolerance is not None:
                tolerance = parse_tolerance(
                    raw_tolerance, f"{at}golden.tolerance", outputs=[s.name for s in outputs]
                )
        variants.append(
            Variant(
                id=vid,
                format=fmt,
                file=path,
                precision=_choice(item.get("precision"), f"{at}precision", PRECISIONS),
                method=_choice(item.get("method"), f"{at}method", METHODS),
                built_for=built_for,
                golden_outputs=g_outputs,
                tolerance=tolerance,
                peak_memory_mb=_peak_map(item.get("peak_memory_mb"), f"{at}peak_memory_mb"),
                fp16_allowed=_flag(item.get("fp16_allowed", True), f"{at}fp16_allowed"),
            )
        )
    return tuple(variants)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise SchemaError(f"manifest: {where} must be true or false, got {value!r}")
    return value


def _legacy_variants(
    formats: Mapping[str, str],
    golden_outputs: Mapping[str, str],
    tolerance: Tolerance,
    peak: Mapping[str, float],
) -> tuple[Variant, ...]:
    """One variant per format, id = the format name: what a bundle without `variants` means."""
    return tuple(
        Variant(
            id=fmt,
            format=fmt,
            file=path,
            golden_outputs=golden_outputs.get(fmt),
            tolerance=tolerance.for_format(fmt),
            peak_memory_mb=dict(peak),
            legacy=True,
        )
        for fmt, path in formats.items()
    )


def _peak_memory(raw: Mapping[str, Any]) -> dict[str, float]:
    figures = _opt(raw, "figures", dict, "") or {}
    return _peak_map(figures.get("peak_memory_mb"), "figures.peak_memory_mb")


def parse_manifest(data: bytes) -> Manifest:
    """Validate the manifest's shape; raises SchemaError naming the field."""
    try:
        raw = strictjson.loads(data, MANIFEST)
    except strictjson.JsonRefusedError as exc:
        raise SchemaError(str(exc)) from None
    if not isinstance(raw, dict):
        raise SchemaError("manifest.json must hold a JSON object")
    schema = raw.get("schema")
    if schema != SCHEMA:
        raise SchemaError(
            f"manifest schema {shown(schema)} is not supported; this agent reads {SCHEMA!r}"
        )
    name = _req(raw, "name", str, "")
    try:
        check_name(name, "manifest: name")
    except NameRuleError as exc:
        raise SchemaError(str(exc)) from None
    version = _req(raw, "version", str, "")
    min_agent = raw.get("min_agent_version", "0.0.0")
    for key, value in (("version", version), ("min_agent_version", min_agent)):
        try:
            parse_version(value)
        except VersionFormatError as exc:
            raise SchemaError(f"manifest: {key}: {exc}") from None
    for key in ("created", "key_id"):
        if raw.get(key) is not None:
            _text(raw[key], key, MAX_SHORT_TEXT)

    files = _files(raw)
    has_variants = raw.get("variants") is not None
    # A bundle with `variants` may drop the legacy `formats` (then older agents refuse it).
    formats_raw = _req(raw, "formats", dict, "") if not has_variants else (
        _opt(raw, "formats", dict, "") or {}
    )  # fmt: skip
    if not formats_raw and not has_variants:
        raise SchemaError(f"manifest: formats is empty; expected one of {', '.join(FORMATS)}")
    formats: dict[str, str] = {}
    for fmt, path in formats_raw.items():
        if fmt not in FORMATS:
            raise SchemaError(f"manifest: format {shown(fmt)} is not one of {', '.join(FORMATS)}")
        if not isinstance(path, str) or path not in files:
            raise SchemaError(f"manifest: formats.{fmt} names {shown(path)}, which is not in files")
        formats[fmt] = path

    inputs = _tensor_specs(raw.get("inputs"), "inputs")
    outputs = _tensor_specs(raw.get("outputs"), "outputs")
    g_inputs, g_outputs, tolerance = _golden(raw, files, formats, outputs)
    peak = _peak_memory(raw)
    if has_variants:
        variants = _variants(raw, files, tolerance, outputs)
        files_of = {v.file for v in variants}
        for fmt, path in formats.items():
            if path not in files_of:
                raise SchemaError(
                    f"manifest: formats.{fmt} names {path!r}, which is no variant's file"
                )
        for v in variants:  # the legacy view of a variants-only bundle: first of each format
            formats.setdefault(v.format, v.file)
        with_golden = [v.id for v in variants if v.golden_outputs is not None]
        if g_inputs is None and (with_golden or g_outputs):
            raise SchemaError(
                f"manifest: variants {with_golden[:8]} have golden outputs but golden.inputs "
                "is missing"
            )
        if g_inputs is not None and len(with_golden) != len(variants):
            lacking = [v.id for v in variants if v.golden_outputs is None]
            raise SchemaError(
                f"manifest: golden.inputs is set but variants {lacking[:8]} have no "
                "golden.outputs: every variant needs its own reference outputs"
            )
    else:
        if (g_inputs is None) != (not g_outputs):
            raise SchemaError(
                "manifest: golden needs both inputs and outputs (or neither); "
                f"it has inputs {shown(g_inputs)} and outputs for {sorted(g_outputs)}"
            )
        variants = _legacy_variants(formats, g_outputs, tolerance, peak)

    labels = _opt(raw, "labels", list, "") or []
    if len(labels) > MAX_LABELS or not all(
        isinstance(x, str) and len(x) <= MAX_LABEL for x in labels
    ):
        raise SchemaError(
            f"manifest: labels must be a list of at most {MAX_LABELS} strings of at most "
            f"{MAX_LABEL} characters"
        )

    return Manifest(
        raw=raw,
        name=name,
        version=version,
        files=files,
        formats=formats,
        inputs=inputs,
        outputs=outputs,
        labels=tuple(labels),
        golden_inputs=g_inputs,
        golden_outputs=g_outputs,
        golden_tolerance=tolerance,
        peak_memory_mb=peak,
        min_agent_version=min_agent,
        key_id=str(raw.get("key_id", "")),
        variants=variants,
    )


def check_goldens(
    manifest: Manifest, headers: Mapping[str, Mapping[str, ArrayHeader]], limits: Limits
) -> None:
    """Cross-check golden files' array headers with the manifest's tensors and the caps."""
    if manifest.golden_inputs is None:
        return
    inputs = headers[manifest.golden_inputs]
    where = f"golden file {manifest.golden_inputs}"
    specs = {s.name: s for s in manifest.inputs}
    if set(inputs) != set(specs):
        raise GoldenFileError(
            f"{where} holds arrays {sorted(inputs)[:8]}; the model's inputs are {sorted(specs)}"
        )
    for name, head in inputs.items():
        spec = specs[name]
        fixed = all(d in (-1, h) for d, h in zip(spec.shape, head.shape, strict=False))
        if head.dtype != spec.dtype or len(head.shape) != len(spec.shape) or not fixed:
            raise GoldenFileError(
                f"{where}: {name!r} is {head.dtype} {list(head.shape)}; the model's input "
                f"is {spec.dtype} {list(spec.shape)}"
            )
        axis = spec.batch_axis
        cases = 1 if axis is None or axis >= len(head.shape) else head.shape[axis]
        if cases > limits.max_golden_cases:
            raise GoldenFileError(
                f"{where}: {name!r} holds {cases} golden cases; the cap is "
                f"{limits.max_golden_cases}"
            )
    outputs = {s.name for s in manifest.outputs}
    owners: list[tuple[str, str | None]] = [*manifest.golden_outputs.items()]
    owners += [(f"variant {v.id}", v.golden_outputs) for v in manifest.variants if not v.legacy]
    for owner, path in owners:
        if path is None or path not in headers:  # check_golden inspects only its own file
            continue
        unknown = sorted(set(headers[path]) - outputs)
        if unknown:
            raise GoldenFileError(
                f"golden file {path} ({owner}) holds {unknown[:8]}, which are not model outputs "
                f"({sorted(outputs)})"
            )


def tolerance_problem(tolerance: Tolerance, references: Mapping[str, np.ndarray]) -> str | None:
    """Why the rule lets some of these (finite) reference outputs move too far, or None."""
    return tolerance_rule.allowance_problem(tolerance, references)


# --------------------------------------------------------------------------- reading


def _check_member_name(name: str) -> None:
    problem = path_problem(name)
    if problem is not None:
        raise UnsafeMemberError(f"archive member {problem}")


class _Reader:
    """One pass over the archive, checking each member as it streams by."""

    def __init__(self, path: Path, keys: Iterable[Ed25519PublicKey], limits: Limits) -> None:
        self.path = path
        self.keys = list(keys)
        self.limits = limits

    def _check_size(self, size: int) -> None:
        if size > self.limits.max_bundle_bytes:
            raise OversizeError(
                f"bundle is {size} bytes; the cap is {self.limits.max_bundle_bytes} "
                f"({_HINTS['bundle']})"
            )

    def _stat(self) -> os.stat_result:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise BundleFormatError(f"cannot read bundle {self.path}: {exc.strerror}") from exc
        # A FIFO or a device (/dev/zero) would block or never end: before opening it.
        if not stat.S_ISREG(st.st_mode):
            raise BundleFormatError(f"bundle {self.path} is not a regular file")
        self._check_size(st.st_size)
        return st

    def digest(self) -> str:
        """sha256 of the whole file, after the size cap (the bundle's identity)."""
        self._stat()
        try:
            return _sha256_file(self.path)
        except OSError as exc:
            raise BundleFormatError(f"cannot read bundle {self.path}: {exc.strerror}") from exc

    def run(self, dest: Path | None, sha256: str | None = None) -> VerifiedBundle:
        """Check every rule; `sha256` is the file's digest when the caller has it."""
        sha = self.digest() if sha256 is None else sha256
        self._stat()
        try:
            fh = self.path.open("rb")
        except OSError as exc:
            raise BundleFormatError(f"cannot read bundle {self.path}: {exc.strerror}") from exc
        with fh:
            try:
                size = os.fstat(fh.fileno()).st_size
                self._check_size(size)  # again: the file may have grown since it was hashed
                reader = ustar.UstarReader(
                    fh,
                    size,
                    self.path.name,
                    self.limits.max_members,
                    self.limits.max_member_bytes,
                    _HINTS["member"],
                    _HINTS["members"],
                )
                return self._walk(reader, fh, sha, dest)
            except OSError as exc:
                raise BundleFormatError(
                    f"cannot read bundle {self.path}: {exc.strerror or exc}"
                ) from exc

    def _walk(
        self, reader: ustar.UstarReader, fh: BinaryIO, sha: str, dest: Path | None
    ) -> VerifiedBundle:
        manifest_bytes: bytes | None = None
        sig: bytes | None = None
        manifest: Manifest | None = None
        signer = ""
        seen: set[str] = set()
        goldens: dict[str, dict[str, ArrayHeader]] = {}
        while (member := reader.next()) is not None:
            name = member.name
            if name in seen:
                raise UnsafeMemberError(f"archive member {name!r} appears twice")
            seen.add(name)
            if name in (MANIFEST, SIGNATURE):
                if manifest is not None:
                    raise SchemaError(f"{name} must come before the files it lists")
                if name == MANIFEST:
                    manifest_bytes = self._read_manifest(reader, member)
                else:
                    sig = self._read_signature(reader, member)
                if manifest_bytes is not None and sig is not None:
                    signer = self._check_signature(manifest_bytes, sig)
                    manifest = parse_manifest(manifest_bytes)
                continue
            if manifest is None:
                raise MissingManifestError(
                    f"archive member {name!r} comes before a signed manifest.json and "
                    "manifest.sig; a bundle starts with both"
                )
            self._check_file(manifest, member, reader, dest)
            if name in manifest.golden_files:
                goldens[name] = inspect_npz(
                    fh,
                    member.data_offset,
                    member.size,
                    name,
                    self.limits.max_golden_arrays,
                    self.limits.max_golden_bytes,
                )
        if manifest_bytes is None:
            raise MissingManifestError("bundle has no manifest.json")
        if sig is None:
            raise SignatureError("bundle has no manifest.sig; unsigned bundles are refused")
        assert manifest is not None
        missing = sorted(set(manifest.files) - seen)
        if missing:
            shown_missing = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise MissingFileError(f"bundle lacks files its manifest lists: {shown_missing}")
        check_goldens(manifest, goldens, self.limits)
        if compare_versions(AGENT_VERSION, manifest.min_agent_version) < 0:
            raise IncompatibleAgentError(
                f"bundle needs agent {manifest.min_agent_version} or newer; this is {AGENT_VERSION}"
            )
        return VerifiedBundle(self.path, sha, manifest, manifest_bytes, signer, dest)

    def _read_manifest(self, reader: ustar.UstarReader, member: ustar.Member) -> bytes:
        if member.size > self.limits.max_manifest_bytes:
            raise OversizeError(
                f"{MANIFEST} is {member.size} bytes; the cap is {self.limits.max_manifest_bytes}"
            )
        return reader.read(member.size)

    def _read_signature(self, reader: ustar.UstarReader, member: ustar.Member) -> bytes:
        if member.size != SIGNATURE_BYTES:
            raise SignatureError(
                f"{SIGNATURE} is {member.size} bytes; an ed25519 signature is {SIGNATURE_BYTES}"
            )
        return reader.read(member.size)

    def _check_signature(self, manifest_bytes: bytes, sig: bytes) -> str:
        if not self.keys:
            raise UntrustedSignerError("no trusted public keys are configured")
        for key in self.keys:
            if verify(key, sig, manifest_bytes):
                return key_id(key)
        # Tell apart "signed by someone else" from "tampered": the manifest names its
        # signer. It is not trusted, so it is parsed with the same bounds and only shown.
        try:
            doc = strictjson.loads(manifest_bytes, MANIFEST)
            claimed = doc.get("key_id", "?") if isinstance(doc, dict) else "?"
        except strictjson.JsonRefusedError:
            claimed = "?"
        trusted = {key_id(k) for k in self.keys}
        if isinstance(claimed, str) and claimed in trusted:
            raise SignatureError(
                f"manifest signature does not verify with trusted key {claimed}: the manifest "
                "or its signature was altered"
            )
        raise UntrustedSignerError(
            f"manifest is not signed by a trusted key (it names key {shown(claimed, 40)}; "
            f"trusted: {', '.join(sorted(trusted))})"
        )

    def _check_file(
        self,
        manifest: Manifest,
        member: ustar.Member,
        reader: ustar.UstarReader,
        dest: Path | None,
    ) -> None:
        name = member.name
        if name not in manifest.files:
            raise UnlistedFileError(f"archive member {name!r} is not listed in the manifest")
        digest, size = manifest.files[name]
        if size > self.limits.max_member_bytes:
            raise OversizeError(
                f"manifest declares {name!r} as {size} bytes; the cap is "
                f"{self.limits.max_member_bytes} ({_HINTS['member']})"
            )
        if member.size != size:
            raise SizeMismatchError(
                f"{name!r} is {member.size} bytes in the archive; the manifest says {size}"
            )
        out = None if dest is None else _create(dest, name)
        h = hashlib.sha256()
        try:
            while chunk := reader.read(_CHUNK):
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
        except OSError as exc:
            raise UnpackError(f"cannot write {name!r}: {exc.strerror or exc}") from exc
        finally:
            if out is not None:
                out.close()
        if h.hexdigest() != digest:
            raise HashMismatchError(
                f"{name!r} has sha256 {h.hexdigest()}; the manifest says {digest}"
            )


def _create(dest: Path, name: str) -> IO[bytes]:
    target = dest / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.open("xb")
    except OSError as exc:
        raise UnpackError(
            f"cannot create {name!r} under {dest.parent}: {exc.strerror or exc}"
        ) from exc


def bundle_digest(path: Path, limits: Limits | None = None) -> str:
    """sha256 of a bundle file (its identity on a device), refusing files over the cap."""
    return _Reader(Path(path), [], limits or Limits()).digest()


def verify_bundle(
    path: Path,
    keys: Iterable[Ed25519PublicKey],
    limits: Limits | None = None,
    sha256: str | None = None,
) -> VerifiedBundle:
    """Check every rule without writing anything; raise a BundleError subclass if one fails.

    Pass `sha256` (from bundle_digest) to skip hashing the file a second time.
    """
    return _Reader(Path(path), keys, limits or Limits()).run(dest=None, sha256=sha256)


def unpack_bundle(
    path: Path,
    dest: Path,
    keys: Iterable[Ed25519PublicKey],
    limits: Limits | None = None,
    sha256: str | None = None,
) -> VerifiedBundle:
    """Verify and unpack into `dest` (must not exist). On any failure nothing is left behind.

    Files are unpacked into a sibling temporary directory, made read-only, then
    renamed into place, so `dest` either holds a complete verified bundle or nothing.
    """
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    except OSError as exc:
        raise UnpackError(f"cannot unpack into {dest.parent}: {exc.strerror or exc}") from exc
    try:
        bundle = _Reader(Path(path), keys, limits or Limits()).run(dest=tmp, sha256=sha256)
        try:
            (tmp / MANIFEST).write_bytes(bundle.manifest_bytes)
            _make_read_only(tmp)
            _fsync_tree(tmp)
            os.rename(tmp, dest)
            _fsync_dir(dest.parent)
        except OSError as exc:
            raise UnpackError(f"cannot unpack into {dest}: {exc.strerror or exc}") from exc
    except BaseException:
        _remove_tree(tmp)
        raise
    bundle.directory = dest
    return bundle


def load_unpacked(directory: Path) -> Manifest:
    """Read the manifest of a bundle this agent unpacked earlier (already verified).

    It is parsed by today's rules, so a bundle an older agent accepted and that
    these rules refuse raises SchemaError here instead of being served.
    """
    path = Path(directory) / MANIFEST
    try:
        with path.open("rb") as fh:
            data = fh.read(Limits.max_manifest_bytes + 1)
    except OSError as exc:
        raise BundleFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > Limits.max_manifest_bytes:
        raise OversizeError(f"{path} is over {Limits.max_manifest_bytes} bytes")
    return parse_manifest(data)


def _make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o444)
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o555)
    os.chmod(root, 0o555)


def _remove_tree(root: Path) -> None:
    if not root.exists():
        return
    for dirpath, dirnames, _ in os.walk(root):
        os.chmod(dirpath, 0o755)
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
    shutil.rmtree(root, ignore_errors=True)


def remove_unpacked(root: Path) -> None:
    _remove_tree(Path(root))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- writing


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _golden_headers(manifest: Manifest, files: Mapping[str, Path]) -> dict[str, Any]:
    limits = Limits()
    headers = {}
    for path in manifest.golden_files:
        src = Path(files[path])
        with src.open("rb") as fh:
            headers[path] = inspect_npz(
                fh,
                0,
                src.stat().st_size,
                path,
                limits.max_golden_arrays,
                limits.max_golden_bytes,
            )
    return headers


def write_bundle(
    out_path: Path,
    manifest: Mapping[str, Any],
    files: Mapping[str, Path],
    private_key: Ed25519PrivateKey,
) -> Path:
    """Write and sign a bundle. `manifest` holds everything but schema/files/key_id.

    The archive is exactly the strict ustar subset the reader accepts. It is
    written to a temporary file in the same directory and renamed into place, so
    a failed build never leaves half a bundle behind.
    """
    out_path = Path(out_path)
    listed: dict[str, dict[str, Any]] = {}
    for arcname, src in sorted(files.items()):
        _check_member_name(arcname)
        if arcname in (MANIFEST, SIGNATURE):
            raise ValueError(f"{arcname} is written by write_bundle itself")
        listed[arcname] = {"sha256": _sha256_file(Path(src)), "size": Path(src).stat().st_size}
    body = without_absent_format_rules(manifest)
    body.setdefault("created", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    body.setdefault("min_agent_version", AGENT_VERSION)
    body["schema"] = SCHEMA
    body["files"] = listed
    body["key_id"] = key_id(private_key.public_key())
    manifest_bytes = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    # Never write a bundle a device would refuse as malformed.
    parsed = parse_manifest(manifest_bytes)
    check_goldens(parsed, _golden_headers(parsed, files), Limits())
    for fmt, path in parsed.golden_outputs.items():
        with np.load(files[path], allow_pickle=False) as data:
            references = {k: data[k] for k in data.files}
        rules = [parsed.golden_tolerance, parsed.golden_tolerance.for_format(fmt)]
        problem = next(filter(None, (tolerance_problem(r, references) for r in rules)), None)
        if problem is not None:
            raise GoldenFileError(f"{path}: {problem}")
    for variant in parsed.variants:
        if variant.legacy or variant.golden_outputs is None:
            continue
        with np.load(files[variant.golden_outputs], allow_pickle=False) as data:
            references = {k: data[k] for k in data.files}
        problem = tolerance_problem(variant.tolerance, references)
        if problem is not None:
            raise GoldenFileError(f"{variant.golden_outputs} (variant {variant.id}): {problem}")
    signature = sign(private_key, manifest_bytes)
    mtime = int(datetime.now(UTC).timestamp())

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".bundle-", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for name, data in ((MANIFEST, manifest_bytes), (SIGNATURE, signature)):
                fh.write(ustar.header(name, len(data), mtime) + data + ustar.padding(len(data)))
            for arcname, src in sorted(files.items()):
                size = listed[arcname]["size"]
                fh.write(ustar.header(arcname, size, mtime))
                copied = 0
                with Path(src).open("rb") as data_fh:
                    while chunk := data_fh.read(min(_CHUNK, size - copied)):
                        fh.write(chunk)
                        copied += len(chunk)
                if copied != size:
                    raise OSError(f"{src} changed size while the bundle was written")
                fh.write(ustar.padding(size))
            fh.write(ustar.END)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    log.info("wrote bundle %s (%d files, signed by %s)", out_path, len(files), body["key_id"])
    return out_path


__all__ = [
    "DTYPES",
    "FORMATS",
    "MANIFEST",
    "MAX_VARIANTS",
    "METHODS",
    "PRECISIONS",
    "SCHEMA",
    "SIGNATURE",
    "SUFFIX",
    "BundleError",
    "BundleFormatError",
    "GoldenFileError",
    "HashMismatchError",
    "IncompatibleAgentError",
    "Limits",
    "Manifest",
    "MissingFileError",
    "MissingManifestError",
    "OversizeError",
    "SchemaError",
    "SignatureError",
    "SizeMismatchError",
    "TensorSpec",
    "UnlistedFileError",
    "UnpackError",
    "UnsafeMemberError",
    "UntrustedSignerError",
    "Variant",
    "VerifiedBundle",
    "VersionNotNewerError",
    "bundle_digest",
    "carried_formats",
    "check_goldens",
    "load_unpacked",
    "parse_manifest",
    "remove_unpacked",
    "tolerance_problem",
    "unpack_bundle",
    "verify_bundle",
    "without_absent_format_rules",
    "write_bundle",
]

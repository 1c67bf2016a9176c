"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor extension.

JSON is read and written with orjson (a required dependency, ~130 KB wheels for
x86_64, aarch64 and armv7l): at batch 32 `json.loads` of the body and Python's float
repr for the outputs were most of the agent's CPU per request (bench/peers.py). A body
orjson refuses is parsed again by `json.loads`, whose errors name what is wrong the way
they always did; what orjson accepts, `json.loads` accepts too. A flat `data` list
becomes its array through `struct` (one C loop, bit-equal to numpy's conversion), and
anything else through numpy. Outputs: orjson writes a numpy float32 with the shortest
repr that reads back to the same float32.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from typing import Any

import numpy as np
import orjson

from agent.api.bytecount import count_bytes
from agent.api.shm import Region, RegionAccess
from agent.bundle import TensorSpec
from agent.errors import BadRequestError

# KServe datatype <-> numpy dtype name
DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}  # fmt: skip
TO_DATATYPE = {v: k for k, v in DATATYPES.items()}
# Keyed by dtype objects: `dtype.name` is surprisingly slow on the hot path.
_DTYPE_TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items()}
HEADER_LENGTH = "inference-header-content-length"


def datatype(dtype: str) -> str:
    return TO_DATATYPE[dtype]


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": datatype(spec.dtype), "shape": list(spec.shape)}


MAX_JSON_DEPTH = 64
MAX_DIMENSIONS = 32  # numpy's own limit is 64; no model on a device has more than a few
MAX_DIMENSION = 1 << 62
_STRING = re.compile(rb'"(?:[^"\\]|\\[\s\S]?)*+"?')  # possessive: linear on any input
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = np.zeros(256, dtype=np.int8)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1


def json_depth(data: bytes | bytearray) -> int:
    """Deepest nesting of arrays and objects, counted in C and numpy (never recursing)."""
    if b"[" not in data and b"{" not in data:
        return 0
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    steps = _DEPTH_STEP[np.frombuffer(brackets, dtype=np.uint8)]
    deepest, level = 0, 0
    for start in range(0, len(steps), 1 << 20):  # bounded scratch memory for any body
        running = np.cumsum(steps[start : start + (1 << 20)], dtype=np.int32) + level
        if len(running):
            deepest = max(deepest, int(running.max()))
            level = int(running[-1])
    return deepest


def _refuse_constant(name: str) -> Any:
    raise BadRequestError(f"request JSON contains {name}, which is not valid JSON; send a number")


def loads_bounded(data: bytes | bytearray, what: str = "request body") -> Any:
    """json.loads with its depth checked first and JSON's own rules kept (no NaN)."""
    # Fewer openings than the limit cannot nest deeper: the usual request skips the scan.
    opens = count_bytes(data, b"[{")
    depth = json_depth(data) if opens > MAX_JSON_DEPTH else 0
    if depth > MAX_JSON_DEPTH:
        raise BadRequestError(
            f"{what} nests arrays/objects {depth} deep; the limit is {MAX_JSON_DEPTH} "
            "(send tensor data as a flat list with its shape)"
        )
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass  # refused: json.loads below says why (NaN, a number past a double, the syntax)
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except BadRequestError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"{what} is not valid JSON: {exc}") from exc
    except ValueError as exc:  # an integer over Python's 4300-digit conversion limit
        raise BadRequestError(f"{what} has a number that is too long: {str(exc)[:120]}") from exc
    except RecursionError as exc:  # pragma: no cover - the depth check comes first
        raise BadRequestError(f"{what} nests too deep") from exc


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIMENSION for d in value
    ):
        raise BadRequestError(f"{where}.shape must be a list of non-negative integers")
    if len(value) > MAX_DIMENSIONS:
        raise BadRequestError(
            f"{where}.shape has {len(value)} dimensions; the limit is {MAX_DIMENSIONS}"
        )
    return tuple(value)


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequestError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _flag(params: dict[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequestError(f"{where}.{key} must be true or false")
    return value


def _check_request(request: dict[str, Any]) -> None:
    """Every field besides the inputs, so later code can trust their types."""
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequestError('"id" must be a string')
    if rid is not None and not rid.isascii():
        # Echoed in the answer, which orjson writes: a lone surrogate ("\ud800", read
        # by the json.loads fallback) cannot be written as UTF-8, so refuse it now.
        try:
            rid.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequestError('"id" must be valid Unicode (it has a lone surrogate)') from None
    params = _object(request.get("parameters"), "parameters")
    _flag(params, "binary_data_output", "parameters")
    outputs = request.get("outputs")
    if outputs is None:
        return
    if not isinstance(outputs, list):
        raise BadRequestError('"outputs" must be a list of {"name": ...} objects')
    seen = set()
    for i, out in enumerate(outputs):
        where = f"outputs[{i}]"
        if not isinstance(out, dict):
            raise BadRequestError(f"{where} must be an object")
        name = out.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequestError(f"{where}.name must be a non-empty string")
        if name in seen:
            raise BadRequestError(f"output {name!r} is requested twice")
        seen.add(name)
        _flag(_object(out.get("parameters"), f"{where}.parameters"), "binary_data", where)


SHM_REGION = "shared_memory_region"


def decode_request(
    body: bytes | bytearray,
    header_length: int | None,
    regions: RegionAccess | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse an infer request; returns (the JSON header, input arrays by name).

    Inputs naming a shared-memory region are read from `regions` (views, no copy).
    Raises only ServingError (BadRequestError, or a `shm.*` refusal), whatever the bytes."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise BadRequestError(
                f"Inference-Header-Content-Length {header_length} is outside the body "
                f"of {len(body)} bytes"
            )
        # A view, not a copy (a camera frame is megabytes): a tensor that starts
        # misaligned for its type (the JSON head has any length) is copied alone below.
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, memoryview(b"")
    request = loads_bounded(head)
    if not isinstance(request, dict):
        raise BadRequestError("request body must be a JSON object")
    _check_request(request)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequestError('request needs "inputs": a non-empty list of tensors')
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise BadRequestError(f"{where} must be an object")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequestError(f"{where}.name must be a non-empty string")
        if name in arrays:
            raise BadRequestError(f"input {name!r} is given twice")
        dtname = tensor.get("datatype")
        if not isinstance(dtname, str) or dtname not in DATATYPES:
            raise BadRequestError(
                f"{where}.datatype {str(dtname)[:40]!r} is not one of {', '.join(DATATYPES)}"
            )
        dtype = np.dtype(DATATYPES[dtname])
        shape = _shape(tensor.get("shape"), where)
        count = math.prod(shape)
        params = _object(tensor.get("parameters"), f"{where}.parameters")
        size = params.get("binary_data_size")
        if SHM_REGION in params:
            if regions is None:
                raise BadRequestError(
                    f"{where}: shared memory is served on the local API only (not here)"
                )
            if size is not None or tensor.get("data") is not None:
                raise BadRequestError(
                    f"{where} names a shared-memory region and also carries data; send one"
                )
            array = regions.read(params, where, dtype, count).reshape(shape)
        elif size is not None:
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or size < 0
                or offset + size > len(binary)
            ):
                raise BadRequestError(
                    f"{where}.parameters.binary_data_size {str(size)[:40]} is not a byte count "
                    f"within the {len(binary) - offset} binary bytes left in the body"
                )
            if size != count * dtype.itemsize:
                raise BadRequestError(
                    f"input {name!r}: {size} binary bytes do not hold shape {list(shape)} "
                    f"of {dtname} ({count * dtype.itemsize} bytes)"
                )
            array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
            if not array.flags.aligned:
                array = array.copy()
            array = array.reshape(shape)
            offset += size
        else:
            array = _json_data(tensor.get("data"), name, where, dtname, dtype, shape, count)
        arrays[name] = array
    if offset != len(binary):
        raise BadRequestError(f"{len(binary) - offset} trailing binary bytes are not claimed")
    return request, arrays


def _json_data(
    data: Any,
    name: str,
    where: str,
    dtname: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    count: int,
) -> np.ndarray:
    if data is None:
        raise BadRequestError(f'{where} has no "data" and no binary_data_size')
    if not isinstance(data, list):
        raise BadRequestError(f"{where}.data must be a list of numbers")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            array = _integers(data, dtype) if dtype.kind in "iu" else _floats(data, dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequestError(f"input {name!r}: data is not {dtname}: {exc}") from exc
    if array is None:
        raise BadRequestError(f"input {name!r}: a value in data is out of the range of {dtname}")
    if array.size != count:
        raise BadRequestError(
            f"input {name!r}: {array.size} values do not fill shape {list(shape)} ({count} values)"
        )
    if dtype.kind == "f" and not np.isfinite(array).all():
        # JSON has no NaN or Infinity; a finite number became one: it is out of range.
        raise BadRequestError(f"input {name!r}: a value in data is out of the range of {dtname}")
    return array.reshape(shape)


_UINT8 = np.dtype(np.uint8)
_INT64 = np.dtype(np.int64)
# struct's codes for the float types: packing a flat list is one C loop that reads
# each Python number once (2-2.5x faster than np.asarray's per-element dispatch:
# 92 against 215 µs for batch-256 digits' 16,384 floats), and rounds exactly as numpy
# does (each double to the nearest float32/float16: tests/agent/test_kserve_json.py).
_PACK_CHUNK = 1 << 16  # values per struct call: bounded scratch (a 512 KB tuple)
_FLOAT_CODES = {np.dtype(np.float32): "f", np.dtype(np.float64): "d", np.dtype(np.float16): "e"}


def _packed(data: list[Any], code: str, dtype: np.dtype[Any]) -> np.ndarray | None:
    """A flat list of plain numbers as a writable array, or None when an element is
    anything else (a nested list, a string, an int beyond a double, a value the
    format cannot hold): the numpy path then reads it or says why."""
    buffer = bytearray(len(data) * dtype.itemsize)
    try:
        # In slices: the argument tuple of a whole list would be 8 bytes a value. struct
        # caches the compiled formats, so the slices cost nothing more.
        for start in range(0, len(data), _PACK_CHUNK):
            part = data[start : start + _PACK_CHUNK] if len(data) > _PACK_CHUNK else data
            struct.pack_into(f"{len(part)}{code}", buffer, start * dtype.itemsize, *part)
    except (struct.error, OverflowError, TypeError):
        return None
    return np.frombuffer(buffer, dtype=dtype)


def _floats(data: list[Any], dtype: np.dtype[Any]) -> np.ndarray:
    code = _FLOAT_CODES.get(dtype)
    packed = _packed(data, code, dtype) if code is not None else None
    return packed if packed is not None else np.asarray(data, dtype=dtype)


def _integers(data: list[Any], dtype: np.dtype[Any]) -> np.ndarray | None:
    """`data` as an integer array, or None when a value is outside `dtype`'s range.

    Checked explicitly rather than left to a cast, which wraps silently. Read as int64
    first (numpy raises OverflowError for any value beyond it, float or int: orjson
    reads an integer beyond 64 bits as a float), then exactly in Python if that fails.
    UINT8 (camera frames) first tries bytes(), a C loop ten times faster that refuses
    anything but integers in 0..255 (then the general path says why)."""
    if dtype == _UINT8:
        with contextlib.suppress(TypeError, ValueError):
            return np.frombuffer(bytes(data), dtype=_UINT8)
    # Plain ints (and bools, as 0/1 like numpy) into int64 in one C loop; a list with a
    # float in it goes to numpy, which truncates it the way it always did.
    packed = _packed(data, "q", _INT64)
    try:
        wide = packed if packed is not None else np.asarray(data, dtype=np.int64)
    except OverflowError:
        values = np.asarray(data, dtype=object)
        return _big_integers(values.shape, values.reshape(-1), dtype)
    if wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            return None
    return wide.astype(dtype, copy=False)


def _big_integers(
    shape: tuple[int, ...], values: np.ndarray, dtype: np.dtype[Any]
) -> np.ndarray | None:
    info = np.iinfo(dtype)
    exact = [int(v) for v in values.tolist()]  # Python ints are exact; floats truncate
    if any(v < info.min or v > info.max for v in exact):
        return None
    return np.array(exact, dtype=dtype).reshape(shape)


def wants_binary(request: dict[str, Any]) -> dict[str, bool]:
    """Which outputs the client asked for as binary (the tensor extension); `request`
    has passed decode_request, so its fields have their types."""
    wanted: dict[str, bool] = {}
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    for out in request.get("outputs") or []:
        binary = (out.get("parameters") or {}).get("binary_data")
        wanted[out["name"]] = default if binary is None else bool(binary)
    wanted["*"] = default
    return wanted


def shm_outputs(
    request: dict[str, Any], regions: RegionAccess
) -> dict[str, tuple[Region, int, int]]:
    """Outputs to be written into shared-memory regions: name -> (region, offset, size),
    checked before the model runs (the region exists, is writable, the span fits)."""
    targets: dict[str, tuple[Region, int, int]] = {}
    for i, out in enumerate(request.get("outputs") or []):
        params = out.get("parameters") or {}
        if SHM_REGION not in params:
            continue
        where = f"outputs[{i}]"
        if params.get("binary_data") is True:
            raise BadRequestError(f"{where} asks for binary data and for a shared-memory region")
        targets[out["name"]] = regions.target(params, where)
    return targets


def selected_outputs(request: dict[str, Any]) -> list[str]:
    return [out["name"] for out in request.get("outputs") or []]


# JSON has no NaN or Infinity. Non-finite outputs are written as the strings
# Python, numpy and tritonclient read back as floats (np.asarray(["NaN"], float32)).
NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


# dtypes orjson writes from the array itself (OPT_SERIALIZE_NUMPY), in C.
_ORJSON_DTYPES = frozenset(
    np.dtype(t) for t in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                          "uint64", "uint32", "uint16", "uint8", "bool")
)  # fmt: skip


def _json_values(array: np.ndarray) -> np.ndarray | list[Any]:
    flat = array.reshape(-1)
    if array.dtype.kind == "f" and not np.isfinite(flat).all():
        return [v if math.isfinite(v) else NONFINITE[str(v)] for v in flat.tolist()]
    if flat.dtype in _ORJSON_DTYPES and flat.dtype.isnative:
        return np.ascontiguousarray(flat)
    values: list[Any] = flat.tolist()
    return values


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    binary: dict[str, bool],
    selected: list[str] | None,
    written: dict[str, dict[str, Any]] | None = None,
) -> tuple[bytes, int | None]:
    """Return (body, header length for the binary extension or None).

    `written`: outputs already written into shared memory, with the parameters their
    entries carry instead of data."""
    names = selected if selected else list(outputs)
    tensors = []
    blobs = []
    for name in names:
        array = outputs[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": _DTYPE_TO_DATATYPE.get(array.dtype, "FP32"),
            "shape": list(array.shape),
        }
        if written and name in written:
            entry["parameters"] = written[name]
        elif binary.get(name, binary.get("*", False)):
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_values(array)
        tensors.append(entry)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": tensors,
    }
    if request_id is not None:
        response["id"] = request_id
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)

"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor extension."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

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


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise BadRequestError(f"{where}.shape must be a list of non-negative integers")
    return tuple(value)


def decode_request(
    body: bytes, header_length: int | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse an infer request; returns (the JSON header, input arrays by name)."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise BadRequestError(
                f"Inference-Header-Content-Length {header_length} is outside the body "
                f"of {len(body)} bytes"
            )
        head, binary = body[:header_length], body[header_length:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise BadRequestError("request body must be a JSON object")
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
        if dtname not in DATATYPES:
            raise BadRequestError(
                f"{where}.datatype {dtname!r} is not one of {', '.join(DATATYPES)}"
            )
        dtype = np.dtype(DATATYPES[dtname])
        shape = _shape(tensor.get("shape"), where)
        count = math.prod(shape)
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequestError(f"{where}.parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequestError(f"{where}.parameters.binary_data_size does not fit the body")
            if size != count * dtype.itemsize:
                raise BadRequestError(
                    f"input {name!r}: {size} binary bytes do not hold shape {list(shape)} "
                    f"of {dtname} ({count * dtype.itemsize} bytes)"
                )
            array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += size
        else:
            data = tensor.get("data")
            if data is None:
                raise BadRequestError(f'{where} has no "data" and no binary_data_size')
            try:
                array = np.asarray(data, dtype=dtype)
            except (ValueError, TypeError, OverflowError) as exc:
                raise BadRequestError(f"input {name!r}: data is not {dtname}: {exc}") from exc
            if array.size != count:
                raise BadRequestError(
                    f"input {name!r}: {array.size} values do not fill shape {list(shape)} "
                    f"({count} values)"
                )
            array = array.reshape(shape)
        arrays[name] = array
    if offset != len(binary):
        raise BadRequestError(f"{len(binary) - offset} trailing binary bytes are not claimed")
    return request, arrays


def wants_binary(request: dict[str, Any]) -> dict[str, bool]:
    """Which outputs the client asked for as binary (the tensor extension)."""
    wanted: dict[str, bool] = {}
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    for out in request.get("outputs") or []:
        if isinstance(out, dict) and isinstance(out.get("name"), str):
            params = out.get("parameters") or {}
            wanted[out["name"]] = bool(params.get("binary_data", default))
    wanted["*"] = default
    return wanted


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    binary: dict[str, bool],
    selected: list[str] | None,
) -> tuple[bytes, int | None]:
    """Return (body, header length for the binary extension or None)."""
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
        if binary.get(name, binary.get("*", False)):
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        tensors.append(entry)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": tensors,
    }
    if request_id is not None:
        response["id"] = request_id
    head = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)

"""KServe JSON tensors read and written by orjson: numbers exact, errors as before."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.api.kserve import decode_request, encode_response
from agent.errors import BadRequestError


def _body(data: object, datatype: str = "FP32", shape: list[int] | None = None) -> bytes:
    size = len(data) if isinstance(data, list) else 1
    tensor = {"name": "x", "datatype": datatype, "shape": shape or [size], "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


def _strict(body: bytes) -> dict[str, object]:
    """Parse as a strict JSON reader would: NaN/Infinity literals are an error."""

    def refuse(name: str) -> object:
        raise AssertionError(f"{name} literal in output JSON")

    out = json.loads(body, parse_constant=refuse)
    assert isinstance(out, dict)
    return out


def _edge_float32() -> np.ndarray:
    f = np.finfo(np.float32)
    rng = np.random.default_rng(7)
    special = np.array(
        [0.0, -0.0, f.max, -f.max, f.tiny, f.smallest_subnormal, -f.smallest_subnormal,
         1 / 3, 0.1, 16777217.0, 1e-30, 3.4e38],
        dtype=np.float32,
    )  # fmt: skip
    # Random bit patterns cover every exponent; drop the non-finite ones.
    bits = rng.integers(0, 2**32, 5000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([special, bits[np.isfinite(bits)]])


def test_float32_outputs_read_back_bit_for_bit() -> None:
    values = _edge_float32()
    body, hlen = encode_response("m", "1", "r", {"y": values.reshape(-1, 1)}, {"*": False}, None)
    assert hlen is None
    out = _strict(body)["outputs"][0]  # type: ignore[index]
    assert out["datatype"] == "FP32" and out["shape"] == [len(values), 1]
    back = np.asarray(out["data"], dtype=np.float32)
    assert back.tobytes() == values.tobytes()  # -0.0 and subnormals included
    # Shortest repr: no float64 noise such as 0.10000000149011612 for float32 0.1.
    assert b"0.1," in body and b"0.10000000149" not in body


def test_float32_inputs_read_bit_for_bit_and_match_the_json_module() -> None:
    values = _edge_float32()
    body = _body([float(v) for v in values])  # float64 reprs, as Python clients send
    _, arrays = decode_request(body, None)
    assert arrays["x"].dtype == np.float32 and arrays["x"].tobytes() == values.tobytes()
    # Shortest float32 reprs (what numpy/orjson clients send) read to the same values.
    short = encode_response("m", "1", None, {"x": values}, {"*": False}, None)[0]
    tensor = json.loads(short)["outputs"][0]
    tensor["datatype"] = "FP32"
    _, again = decode_request(json.dumps({"inputs": [tensor]}).encode(), None)
    assert again["x"].tobytes() == values.tobytes()


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [("float16", "FP16"), ("float64", "FP64"), ("int8", "INT8"), ("int16", "INT16"),
     ("int32", "INT32"), ("int64", "INT64"), ("uint8", "UINT8"), ("uint16", "UINT16"),
     ("uint32", "UINT32"), ("uint64", "UINT64"), ("bool", "BOOL")],
)  # fmt: skip
def test_every_datatype_round_trips_exactly(dtype: str, datatype: str) -> None:
    dt = np.dtype(dtype)
    rng = np.random.default_rng(3)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        values = np.concatenate(
            [np.array([info.min, info.max, 0], dtype=dt), rng.integers(info.min, info.max, 300, dt)]
        )
    elif dt.kind == "b":
        values = rng.integers(0, 2, 300).astype(bool)
    else:
        values = rng.standard_normal(300).astype(dt) * 1000
    body, _ = encode_response("m", "1", None, {"y": values}, {"*": False}, None)
    out = _strict(body)["outputs"][0]  # type: ignore[index]
    assert out["datatype"] == datatype
    back = np.asarray(out["data"], dtype=dt)
    assert back.tobytes() == values.tobytes()
    # And through the request reader.
    _, arrays = decode_request(_body(out["data"], datatype), None)
    assert arrays["x"].dtype == dt and arrays["x"].tobytes() == values.tobytes()


def test_non_finite_outputs_are_strings_and_strict_json() -> None:
    values = np.array([1.5, np.nan, np.inf, -np.inf], dtype=np.float32)
    body, _ = encode_response("m", "1", None, {"y": values}, {"*": False}, None)
    data = _strict(body)["outputs"][0]["data"]  # type: ignore[index]
    assert data == [1.5, "NaN", "Infinity", "-Infinity"]
    back = np.asarray(data, dtype=np.float32)
    assert back[0] == 1.5 and np.isnan(back[1]) and back[2] == np.inf and back[3] == -np.inf


def test_non_contiguous_and_big_endian_outputs_are_written_in_order() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    strided = base[:, ::2]
    swapped = base.astype(">f4")
    body, _ = encode_response("m", "1", None, {"a": strided, "b": swapped}, {"*": False}, None)
    outs = _strict(body)["outputs"]  # type: ignore[index]
    assert outs[0]["shape"] == [4, 3] and outs[0]["data"] == strided.reshape(-1).tolist()
    assert outs[1]["data"] == base.reshape(-1).tolist()


def test_binary_outputs_keep_their_header_length() -> None:
    values = np.arange(10, dtype=np.float32)
    body, hlen = encode_response("m", "1", "id-1", {"y": values}, {"*": True}, None)
    assert hlen is not None
    head = _strict(body[:hlen])
    assert head["id"] == "id-1"
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 40}  # type: ignore[index]
    assert np.frombuffer(body[hlen:], np.float32).tolist() == values.tolist()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
         "contains NaN, which is not valid JSON"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [-Infinity]}]}',
         "contains -Infinity"),
        (_body([1e300], "FP32"), "out of the range of FP32"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1e999]}]}',
         "out of the range of FP32"),
        (_body([2**63], "INT64"), "out of the range of INT64"),
        (_body([2**64], "UINT64"), "out of the range of UINT64"),
        (_body([10**30], "INT64"), "out of the range of INT64"),
        (_body([-1], "UINT8"), "out of the range of UINT8"),
        (_body([300], "INT8"), "out of the range of INT8"),
        (_body([1e20], "INT32"), "out of the range of INT32"),
        (_body(["a"], "INT32"), "data is not INT32"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [' + b"9" * 5000
         + b"]}]}", "number that is too long"),
        (b'{"id": "\\ud800", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], '
         b'"data": [1]}]}', '"id" must be valid Unicode'),
        (b'{"inputs": [1, 2', "not valid JSON"),
        (b'{"inputs": "\xff\xfe"}', "not valid JSON"),
    ],
)  # fmt: skip
def test_refusals_name_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError) as err:
        decode_request(body, None)
    assert message in err.value.message


def test_uint8_frames_take_the_bytes_path_and_its_refusals_stay_exact() -> None:
    frame = np.random.default_rng(5).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    _, arrays = decode_request(_body(frame.reshape(-1).tolist(), "UINT8", [2, 4, 5, 3]), None)
    assert arrays["x"].dtype == np.uint8 and np.array_equal(arrays["x"], frame)
    # What bytes() refuses goes the general way: floats truncate as before, bools count.
    _, arrays = decode_request(_body([1.0, True, 255], "UINT8"), None)
    assert arrays["x"].tolist() == [1, 1, 255]
    _, arrays = decode_request(_body([[1, 2], [3, 4]], "UINT8", [2, 2]), None)
    assert arrays["x"].tolist() == [[1, 2], [3, 4]]
    for bad, message in (([256], "out of the range"), ([-1], "out of the range"),
                         (["1x"], "data is not UINT8")):  # fmt: skip
        with pytest.raises(BadRequestError, match=message):
            decode_request(_body(bad, "UINT8"), None)


def test_integers_at_the_edges_are_accepted_exactly() -> None:
    _, arrays = decode_request(_body([2**64 - 1, 0], "UINT64"), None)
    assert arrays["x"].tolist() == [2**64 - 1, 0]
    _, arrays = decode_request(_body([-(2**63), 2**63 - 1, 2**53 + 1], "INT64"), None)
    assert arrays["x"].tolist() == [-(2**63), 2**63 - 1, 2**53 + 1]
    _, arrays = decode_request(_body([2**64 - 1, 2.0**63, 5], "UINT64"), None)
    assert arrays["x"].tolist() == [2**64 - 1, 2**63, 5]
    _, arrays = decode_request(_body([True, 2.0, 3], "INT8"), None)
    assert arrays["x"].tolist() == [1, 2, 3]


@pytest.mark.parametrize(("dtype", "datatype"), [("float16", "FP16"), ("float32", "FP32"),
                                                 ("float64", "FP64")])  # fmt: skip
def test_packed_float_path_rounds_exactly_as_numpy(dtype: str, datatype: str) -> None:
    """Flat float lists go through struct (a C loop); numpy's own conversion of the same
    values is the reference, to the bit: doubles, float32 reprs, ints (beyond 2**24 and
    2**53, where rounding shows), bools and subnormals."""
    rng = np.random.default_rng(11)
    big = float(np.finfo(np.dtype(dtype)).max)
    top = min(2**62, int(big))
    values: list[object] = [float(v) for v in rng.standard_normal(3000) * 100]
    values += [float(v) for v in rng.random(2000).astype(np.float32)]
    values += [int(v) for v in rng.integers(-top, top, 500)]
    values += [2**11 + 1, True, False, -0.0, 5e-324, 1e-45, 6e-8, big, -big]
    if dtype != "float16":
        values += [2**24 + 1, 2**53 + 1, -(2**63)]
    _, arrays = decode_request(_body(values, datatype), None)
    want = np.asarray(values, dtype=dtype)
    assert arrays["x"].dtype == want.dtype
    assert arrays["x"].tobytes() == want.tobytes()
    assert arrays["x"].flags.writeable  # as np.asarray's array was


def test_lists_the_packed_paths_cannot_take_read_as_before() -> None:
    # Nested rows (allowed by KServe) and ints beyond a double fall back to numpy.
    _, arrays = decode_request(_body([[1.5, 2], [3, 4]], "FP32", [2, 2]), None)
    assert arrays["x"].tolist() == [[1.5, 2.0], [3.0, 4.0]]
    _, arrays = decode_request(_body([[1, 2], [3, 4]], "INT64", [2, 2]), None)
    assert arrays["x"].tolist() == [[1, 2], [3, 4]]
    # A value the format cannot hold is refused as numpy's path refused it.
    for bad, datatype in (([70000.0, 1], "FP16"), ([1e39], "FP32"), ([2**63], "INT64")):
        with pytest.raises(BadRequestError, match=f"out of the range of {datatype}"):
            decode_request(_body(bad, datatype), None)
    _, arrays = decode_request(_body([1.9, -1.9, True], "INT32"), None)  # numpy truncates
    assert arrays["x"].tolist() == [1, -1, 1]


@pytest.mark.parametrize("count", [65535, 65536, 65537, 2 * 65536 + 3])
def test_packed_paths_across_their_slices(count: int) -> None:
    """Long lists are packed in slices of 65,536 values: every value lands in its place,
    and a bad value in the last slice still sends the list down numpy's path."""
    rng = np.random.default_rng(count)
    floats = [float(v) for v in rng.standard_normal(count)]
    _, arrays = decode_request(_body(floats, "FP32"), None)
    assert arrays["x"].tobytes() == np.asarray(floats, np.float32).tobytes()
    ints = [int(v) for v in rng.integers(-(2**40), 2**40, count)]
    _, arrays = decode_request(_body(ints, "INT64"), None)
    assert arrays["x"].tolist() == ints
    with pytest.raises(BadRequestError, match="data is not FP32"):
        decode_request(_body([*floats[:-1], "x"], "FP32"), None)
    mixed: list[object] = [*ints[:-1], 2.5]
    _, arrays = decode_request(_body(mixed, "INT64"), None)  # numpy truncates, as before
    assert arrays["x"][-1] == 2 and arrays["x"][0] == ints[0]

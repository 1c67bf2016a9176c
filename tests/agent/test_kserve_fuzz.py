"""Property tests: whatever bytes or JSON arrive, decoding refuses cleanly or succeeds."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.api.kserve import DATATYPES, decode_request, json_depth, selected_outputs, wants_binary
from agent.bundle import TensorSpec
from agent.errors import BadRequestError, ServingError
from agent.tensors import validate_feeds

SPECS = (TensorSpec("input", "float32", (-1, 1, 8, 8)),)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def check(body: bytes, header_length: int | None = None) -> None:
    try:
        _, arrays = decode_request(body, header_length)
    except BadRequestError as exc:
        assert exc.status == 400 and exc.message
        return
    for array in arrays.values():
        assert isinstance(array, np.ndarray)
    try:
        validate_feeds(SPECS, arrays, 256)
    except ServingError as exc:
        assert 400 <= exc.status < 500


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(body: bytes) -> None:
    check(body)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json(value: object) -> None:
    check(json.dumps(value).encode())


tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "x", ""]) | st.integers(),
        "datatype": st.sampled_from([*DATATYPES, "BYTES", "fp32"]),
        "shape": st.lists(st.integers(min_value=-2, max_value=9), max_size=5) | st.text(max_size=3),
    },
    optional={
        "data": st.lists(
            st.floats(allow_nan=False, width=32) | st.integers() | st.text(max_size=2), max_size=80
        ),
        "parameters": st.fixed_dictionaries(
            {"binary_data_size": st.integers(min_value=-5, max_value=300)}
        ),
    },
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(tensor, max_size=3),
    st.binary(max_size=300),
    st.integers(min_value=-3, max_value=400) | st.none(),
)
def test_inference_shaped_requests(
    inputs: list[dict[str, object]], blob: bytes, hlen: int | None
) -> None:
    head = json.dumps({"inputs": inputs}).encode()
    check(head + blob, len(head) if hlen is None else hlen)


def _reference_depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_reference_depth(v) for v in value.values()), default=0)
    return 0


tricky_text = st.text(alphabet='[]{}"\\ax', max_size=8)
nested = st.recursive(
    st.none() | st.integers() | tricky_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(tricky_text, children, max_size=4)
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(nested)
def test_json_depth_counts_nesting_not_brackets_in_strings(value: object) -> None:
    # Brackets, quotes and backslashes inside strings must not move the count.
    assert json_depth(json.dumps(value).encode()) == _reference_depth(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_json_depth_is_total_on_any_bytes(data: bytes) -> None:
    assert json_depth(data) >= 0


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_accepted_requests_have_well_typed_outputs(outputs: object, params: object) -> None:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1.0]}],
        "outputs": outputs,
        "parameters": params,
    }
    try:
        request, _ = decode_request(json.dumps(body).encode(), None)
    except BadRequestError:
        return
    names = selected_outputs(request)
    assert all(isinstance(n, str) and n for n in names)
    assert all(isinstance(v, bool) for v in wants_binary(request).values())

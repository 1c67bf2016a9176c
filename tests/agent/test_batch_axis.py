"""The per-tensor `batch_axis`: its manifest form, its legacy default and the request checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import bundle as B
from agent.bundle import TensorSpec
from agent.errors import InputMismatchError, TooLargeError
from agent.signing import load_public_key
from agent.tensors import batch_of, slice_feeds, validate_feeds
from tests.helpers import DEMO_PUB, SampleParts, make_bundle

VAD = (
    TensorSpec("input", "float32", (-1, -1), batch_axis=0),
    TensorSpec("state", "float32", (2, -1, 128), batch_axis=1),
    TensorSpec("sr", "int64", (), batch_axis=None),
)


def feeds(batch: int, state_batch: int | None = None) -> dict[str, np.ndarray]:
    return {
        "input": np.zeros((batch, 512), np.float32),
        "state": np.zeros((2, batch if state_batch is None else state_batch, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }


def test_the_sample_bundle_keeps_its_meaning_without_the_field(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    # As written before the field existed: the same manifest, batch_axis left out.
    legacy = {
        key: [{k: v for k, v in t.items() if k != "batch_axis"} for t in sample_parts.manifest[key]]
        for key in ("inputs", "outputs")
    }
    path = make_bundle(sample_parts, tmp / "legacy.edgebundle", demo_key, **legacy)
    verified = B.verify_bundle(path, [load_public_key(DEMO_PUB)])
    raw = json.loads(verified.manifest_bytes)
    assert all("batch_axis" not in t for t in raw["inputs"] + raw["outputs"])
    manifest = verified.manifest
    assert [t.batch_axis for t in manifest.inputs + manifest.outputs] == [0, 0]
    assert manifest.batchable


def test_legacy_rule_and_explicit_axes() -> None:
    assert TensorSpec("x", "float32", (-1, 3)).batch_axis == 0
    assert TensorSpec("x", "float32", (2, -1)).batch_axis is None
    assert TensorSpec("x", "int64", ()).batch_axis is None
    assert TensorSpec("x", "float32", (2, -1), batch_axis=1).to_json()["batch_axis"] == 1
    assert TensorSpec("x", "float32", (-1,), batch_axis=None).to_json()["batch_axis"] is None


@pytest.mark.parametrize(
    ("tensor", "pattern"),
    [
        ({"shape": [2, -1, 128], "batch_axis": 3}, r"inputs\[0\].batch_axis 3 is outside the shape \[2, -1, 128\] \(rank 3: 0..2"),
        ({"shape": [2, -1, 128], "batch_axis": -1}, r"batch_axis -1 is outside the shape"),
        ({"shape": [2, -1, 128], "batch_axis": 0}, r"batch_axis 0 names a fixed dimension of size 2 in \[2, -1, 128\]"),
        ({"shape": [], "batch_axis": 0}, r"batch_axis is 0 but the tensor is 0-d \(a scalar\); use null"),
        ({"shape": [-1], "batch_axis": True}, r"batch_axis is bool, expected an integer or null"),
        ({"shape": [-1], "batch_axis": "0"}, r"batch_axis is str, expected an integer or null"),
        ({"shape": [-1], "batch_axis": 1.0}, r"batch_axis is float, expected an integer or null"),
    ],
)  # fmt: skip
def test_bad_batch_axis_is_a_schema_error(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path, tensor: dict, pattern: str
) -> None:
    body = sample_parts.body()
    body["inputs"] = [{**body["inputs"][0], **tensor}]
    with pytest.raises(B.SchemaError, match=pattern):
        make_bundle(sample_parts, tmp / "b.edgebundle", demo_key, inputs=body["inputs"])
    assert not list(tmp.glob("*.edgebundle"))


def test_null_batch_axis_round_trips(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    inputs = [{**sample_parts.manifest["inputs"][0], "batch_axis": None}]
    path = make_bundle(sample_parts, tmp / "b.edgebundle", demo_key, inputs=inputs)
    m = B.verify_bundle(path, [load_public_key(DEMO_PUB)]).manifest
    assert m.inputs[0].batch_axis is None and not m.batchable


def test_requests_count_cases_on_each_inputs_axis() -> None:
    assert validate_feeds(VAD, feeds(3), max_batch=8) == 3
    assert batch_of(VAD, feeds(3)) == 3
    part = slice_feeds(VAD, feeds(3), 1, 2)
    assert part["input"].shape == (1, 512) and part["state"].shape == (2, 1, 128)
    assert part["sr"].shape == ()
    only_shared = (TensorSpec("sr", "int64", (), batch_axis=None),)
    assert validate_feeds(only_shared, {"sr": np.array(8000, np.int64)}, max_batch=1) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (feeds(2, 3), "input 'state' has batch size 3 on axis 1 (shape [2, 3, 128]); input 'input' has 2 on axis 0: the batch axes of all inputs must agree"),
        ({**feeds(2), "state": np.zeros((2, 2, 64), np.float32)}, "input 'state': expected shape [2, -1, 128] (-1 = any, batch on axis 1), got [2, 2, 64]"),
        ({**feeds(2), "sr": np.array([16000], np.int64)}, "input 'sr': expected a scalar (shape [], shared by all cases), got shape [1]"),
        ({**feeds(2), "sr": np.array([[16000]], np.int64)}, "expected a scalar (shape [], shared by all cases), got shape [1, 1]"),
        (feeds(0), "batch size is 0 (input 'input', axis 0); send at least one case"),
        ({k: v for k, v in feeds(1).items() if k != "sr"}, "missing input sr (int64 [], a scalar)"),
    ],
)  # fmt: skip
def test_wrong_axes_and_ranks_are_refused_naming_the_axis(
    change: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(InputMismatchError) as err:
        validate_feeds(VAD, change, max_batch=8)
    assert message in err.value.message


def test_batch_limit_counts_the_batch_axis() -> None:
    with pytest.raises(
        TooLargeError, match=r"batch size 9 is above the limit of 8 \(api.max_batch_size\)"
    ):
        validate_feeds(VAD, feeds(9), max_batch=8)

"""Golden replay on a real onnxruntime session: caps before numpy, NaN-aware comparison."""

from __future__ import annotations

import io
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent import bundle as B
from agent.config.model import AgentConfig
from agent.golden import GoldenMismatchError, check_golden
from agent.npz import DTYPES, inspect_npz
from agent.runtimes import load_runtime
from agent.runtimes.base import Runtime
from tests.helpers import SampleParts

INPUTS, OUTPUTS = "golden/inputs.npz", "golden/outputs-onnx.npz"


@pytest.fixture
def copy(sample_parts: SampleParts, tmp: Path) -> Path:
    """A writable copy of the unpacked sample, to change golden files in."""
    dest = tmp / "bundle"
    shutil.copytree(sample_parts.directory, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


@pytest.fixture
def runtime(sample_parts: SampleParts) -> Iterator[Runtime]:
    manifest = B.load_unpacked(sample_parts.directory)
    rt = load_runtime("onnxruntime", manifest, sample_parts.directory, AgentConfig().runtimes)
    yield rt
    rt.close()


@pytest.fixture
def float_runtime(sample_parts: SampleParts) -> Iterator[Runtime]:
    """The sample's float TFLite model: NaN in, NaN out (the INT8 ONNX model's
    QuantizeLinear turns NaN into a finite number, so it cannot show NaN handling)."""
    manifest = B.load_unpacked(sample_parts.directory)
    rt = load_runtime("litert", manifest, sample_parts.directory, AgentConfig().runtimes)
    yield rt
    rt.close()


def _manifest(directory: Path) -> B.Manifest:
    return B.load_unpacked(directory)


def _save(path: Path, **arrays: np.ndarray) -> None:
    with path.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def _inputs(directory: Path) -> np.ndarray:
    with np.load(directory / INPUTS) as data:
        return np.asarray(data["input"])


def test_the_sample_reproduces(copy: Path, runtime: Runtime) -> None:
    diffs = check_golden(_manifest(copy), copy, runtime)
    assert set(diffs) == {"logits"} and diffs["logits"] <= 1e-3


def test_a_model_that_outputs_nan_fails(copy: Path, float_runtime: Runtime) -> None:
    _save(copy / INPUTS, input=np.full_like(_inputs(copy), np.nan))
    with pytest.raises(GoldenMismatchError, match="NaN output"):
        check_golden(_manifest(copy), copy, float_runtime)


def test_one_nan_output_among_good_ones_fails(copy: Path, float_runtime: Runtime) -> None:
    images = _inputs(copy)
    images[3] = np.nan  # only case 3's logits become NaN
    _save(copy / INPUTS, input=images)
    with pytest.raises(GoldenMismatchError, match=r"10 NaN output value"):
        check_golden(_manifest(copy), copy, float_runtime)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_reference_that_is_not_finite_is_refused(
    copy: Path, runtime: Runtime, bad: float
) -> None:
    _save(copy / OUTPUTS, logits=np.full((8, 10), bad, np.float32))
    with pytest.raises(B.GoldenFileError, match="NaN/inf"):
        check_golden(_manifest(copy), copy, runtime)


def test_an_empty_reference_is_refused(copy: Path, runtime: Runtime) -> None:
    _save(copy / OUTPUTS)
    with pytest.raises(B.GoldenFileError, match="holds no arrays"):
        check_golden(_manifest(copy), copy, runtime)


def test_a_header_claiming_a_terabyte_is_refused_before_numpy_reads_it(
    copy: Path, runtime: Runtime
) -> None:
    # As if an older, laxer agent had unpacked it: check_golden inspects again itself.
    buf = io.BytesIO()
    np.save(buf, np.zeros((8, 1, 8, 8), np.float32))
    text = buf.getvalue()
    header_end = text.index(b"\n") + 1
    header = text[:header_end].replace(b"(8, 1, 8, 8)", b"(1000000000000, 1, 8, 8)")
    header = header[:8] + (len(header) - 10).to_bytes(2, "little") + header[10:]
    with zipfile.ZipFile(copy / INPUTS, "w") as zf:
        zf.writestr("input.npy", header + text[header_end:])
    with pytest.raises(B.GoldenFileError, match="1000000000000"):
        check_golden(_manifest(copy), copy, runtime)


@pytest.mark.parametrize("dtype", sorted(DTYPES.values()))
@pytest.mark.parametrize("compressed", [False, True])
def test_inspection_reads_what_numpy_writes(dtype: str, compressed: bool) -> None:
    arrays = {"a": np.zeros((3, 4), dtype), "b": np.ones(5, dtype), "scalar": np.array(1, dtype)}
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)  # type: ignore[operator]
    size = len(buf.getvalue())
    heads = inspect_npz(buf, 0, size, "x.npz", 64, 1 << 20)
    assert {k: (h.dtype, h.shape) for k, h in heads.items()} == {
        k: (v.dtype.name, v.shape) for k, v in arrays.items()
    }
    assert all(h.nbytes == arrays[k].nbytes for k, h in heads.items())


def test_inspection_refuses_pickled_objects_numpy_would_write() -> None:
    buf = io.BytesIO()
    np.savez(buf, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(B.GoldenFileError, match="dtype '\\|O'"):
        inspect_npz(buf, 0, len(buf.getvalue()), "x.npz", 64, 1 << 20)


def test_inspection_caps_arrays_and_bytes() -> None:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(1000, np.float64), b=np.zeros(1, np.uint8))
    size = len(buf.getvalue())
    with pytest.raises(B.GoldenFileError, match="holds 2 arrays; the cap is 1"):
        inspect_npz(buf, 0, size, "x.npz", 1, 1 << 20)
    with pytest.raises(B.GoldenFileError, match="the cap is 4000"):
        inspect_npz(buf, 0, size, "x.npz", 64, 4000)
    assert len(inspect_npz(buf, 0, size, "x.npz", 2, 8001)) == 2

"""edge-export keygen and package: an existing ONNX/TFLite model becomes a signed bundle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.signing import load_public_key
from export.package import PackageError, package_model
from tests.helpers import SampleParts, samples
from tests.tolerance import assert_close


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def keys(tmp: Path) -> tuple[Path, Path]:
    out = cli("keygen", "--name", "release", "--out", str(tmp / "keys"))
    assert out.returncode == 0, out.stderr
    assert "key id" in out.stdout
    private, public = tmp / "keys/release.key", tmp / "keys/release.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    again = cli("keygen", "--name", "release", "--out", str(tmp / "keys"))
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrite a key silently
    return private, public


def test_package_cli_makes_a_bundle_the_agent_accepts(
    sample_parts: SampleParts, keys: tuple[Path, Path], tmp: Path
) -> None:
    private, public = keys
    images, _ = samples()
    np.save(tmp / "cases.npy", images[:5])
    (tmp / "labels.txt").write_text("\n".join(str(i) for i in range(10)))
    out = cli(
        "package",
        str(sample_parts.directory / "model.onnx"),
        str(sample_parts.directory / "model.tflite"),
        "--name",
        "digits",
        "--version",
        "2.0.0",
        "--golden-inputs",
        str(tmp / "cases.npy"),
        "--key",
        str(private),
        "--out",
        str(tmp / "dist"),
        "--labels",
        str(tmp / "labels.txt"),
    )
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path == tmp / "dist/digits-2.0.0.edgebundle"
    verified = verify_bundle(path, [load_public_key(public)])
    m = verified.manifest
    assert m.version == "2.0.0" and m.labels == tuple(str(i) for i in range(10))
    assert set(m.formats) == {"onnx", "tflite"}
    assert set(m.golden_outputs) == {"onnx", "tflite"}
    figures = m.figures
    assert figures["peak_memory_mb"]["onnxruntime"] > 0 and figures["peak_memory_mb"]["litert"] > 0
    assert figures["latency_ms"]["onnxruntime"]["p50"] > 0
    assert figures["size_bytes"]["onnx"] == (sample_parts.directory / "model.onnx").stat().st_size
    # The recorded golden outputs are what the model gives on those inputs.
    import onnxruntime as ort

    session = ort.InferenceSession(str(sample_parts.directory / "model.onnx"))
    expected = session.run(None, {"input": images[:5]})[0]
    import tarfile

    with tarfile.open(path) as tar:
        member = tar.extractfile("golden/outputs-onnx.npz")
        assert member is not None
        (tmp / "g.npz").write_bytes(member.read())
    with np.load(tmp / "g.npz") as data:
        assert_close(data["logits"], expected)


def test_package_onnx_only_with_npz(
    sample_parts: SampleParts, keys: tuple[Path, Path], tmp: Path
) -> None:
    images, _ = samples()
    path = package_model(
        onnx_path=sample_parts.directory / "model.onnx",
        tflite_path=None,
        name="digits",
        version="0.1",
        golden_inputs={"input": images},
        key_path=keys[0],
        out_dir=tmp,
        atol=1e-4,
        runs=5,
    )
    m = verify_bundle(path, [load_public_key(keys[1])]).manifest
    assert set(m.formats) == {"onnx"} and m.golden_atol == 1e-4


def test_package_errors_are_clear(
    sample_parts: SampleParts, keys: tuple[Path, Path], tmp: Path
) -> None:
    onnx = sample_parts.directory / "model.onnx"
    images, _ = samples()
    with pytest.raises(
        PackageError, match="golden inputs are named .*'pixels'.*model's inputs are .*'input'"
    ):
        package_model(
            onnx_path=onnx,
            tflite_path=None,
            name="d",
            version="1",
            key_path=keys[0],
            golden_inputs={"pixels": images},
            out_dir=tmp,
        )
    with pytest.raises(PackageError, match=r"golden input input has shape \[10, 64\]"):
        package_model(
            onnx_path=onnx,
            tflite_path=None,
            name="d",
            version="1",
            key_path=keys[0],
            golden_inputs={"input": images.reshape(10, 64)},
            out_dir=tmp,
        )
    with pytest.raises(PackageError, match="is float64; the model wants float32"):
        package_model(
            onnx_path=onnx,
            tflite_path=None,
            name="d",
            version="1",
            key_path=keys[0],
            golden_inputs={"input": images.astype(np.float64)},
            out_dir=tmp,
        )
    with pytest.raises(PackageError, match="give at least one model"):
        package_model(
            onnx_path=None,
            tflite_path=None,
            name="d",
            version="1",
            key_path=keys[0],
            golden_inputs={},
            out_dir=tmp,
        )
    assert not list(tmp.glob("*.edgebundle"))
    bad = tmp / "bad.onnx"
    bad.write_bytes(b"nope")
    np.save(tmp / "cases.npy", images)
    out = cli(
        "package",
        str(bad),
        "--name",
        "d",
        "--version",
        "1",
        "--golden-inputs",
        str(tmp / "cases.npy"),
        "--key",
        str(keys[0]),
        "--out",
        str(tmp),
    )
    assert out.returncode == 2 and "onnxruntime cannot load" in out.stderr
    out = cli(
        "package",
        str(onnx),
        "--name",
        "d",
        "--version",
        "1",
        "--golden-inputs",
        str(tmp / "cases.npy"),
        "--key",
        str(keys[1]),
        "--out",
        str(tmp),
    )
    assert out.returncode == 2 and "not an unencrypted PEM private key" in out.stderr
    out = cli(
        "package",
        str(tmp / "model.pt"),
        "--name",
        "d",
        "--version",
        "1",
        "--golden-inputs",
        str(tmp / "cases.npy"),
        "--key",
        str(keys[0]),
    )
    assert out.returncode == 2 and "expected a .onnx or .tflite file" in out.stderr
    out = cli(
        "package",
        str(onnx),
        "--name",
        "d",
        "--version",
        "one",
        "--golden-inputs",
        str(tmp / "cases.npy"),
        "--key",
        str(keys[0]),
        "--out",
        str(tmp),
    )
    assert out.returncode == 2 and "version 'one'" in out.stderr
    assert not list(tmp.glob("*.edgebundle")) and not list(tmp.glob(".bundle-*"))


def test_packaged_manifest_states_every_batch_axis(
    sample_parts: SampleParts, keys: tuple[Path, Path], tmp: Path
) -> None:
    import json

    images, _ = samples()
    path = package_model(onnx_path=sample_parts.directory / "model.onnx", tflite_path=None,
                         name="digits", version="0.2", golden_inputs={"input": images[:3]},
                         key_path=keys[0], out_dir=tmp, runs=3)  # fmt: skip
    raw = json.loads(verify_bundle(path, [load_public_key(keys[1])]).manifest_bytes)
    # Written out, not left to the legacy rule: a reader need not know the rule.
    assert [t["batch_axis"] for t in raw["inputs"] + raw["outputs"]] == [0, 0]
    with pytest.raises(PackageError, match=r"axis 1 of output logits \[-1, 10\] is fixed at 10"):
        package_model(onnx_path=sample_parts.directory / "model.onnx", tflite_path=None,
                      name="digits", version="0.3", golden_inputs={"input": images[:3]},
                      key_path=keys[0], out_dir=tmp, batch_axes={"logits": 1})  # fmt: skip


def test_an_output_with_its_batch_behind_a_fixed_axis_needs_the_flag(
    keys: tuple[Path, Path], tmp: Path
) -> None:
    import onnx
    from onnx import TensorProto, helper

    # y = x transposed: x [B, 4] -> y [4, B], the output's batch on axis 1 (unnamed dims).
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])],
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp / "t.onnx")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    common = {"onnx_path": tmp / "t.onnx", "tflite_path": None, "name": "t", "version": "1",
              "golden_inputs": {"x": x}, "key_path": keys[0], "out_dir": tmp, "runs": 3}  # fmt: skip
    with pytest.raises(
        PackageError, match=r"output y \[4, -1\] has dynamic axes \[1\].*--batch-axis y=1"
    ):
        package_model(**common)
    path = package_model(**common, batch_axes={"y": 1})
    m = verify_bundle(path, [load_public_key(keys[1])]).manifest
    assert m.outputs[0].batch_axis == 1 and not m.batchable


def test_package_cli_writes_a_multi_variant_bundle(
    sample_parts: SampleParts, keys: tuple[Path, Path], tmp: Path
) -> None:
    """`--variant`: other builds of the same model ride along, each with its own golden."""
    import json
    import tarfile

    from onnxruntime.quantization import quantize_dynamic

    from tests.variant_bundles import float_model

    private, public = keys
    images, _ = samples()
    np.save(tmp / "cases.npy", images[:5])
    src = sample_parts.directory / "model.onnx"  # the sample's static INT8 QDQ model
    fp32 = float_model(sample_parts, tmp)  # the same graph folded back to float
    quantize_dynamic(str(fp32), str(tmp / "int8.onnx"))
    out = cli("package", str(src), str(sample_parts.directory / "model.tflite"),
              "--name", "digits", "--version", "2.1.0", "--golden-inputs", str(tmp / "cases.npy"),
              "--key", str(private), "--out", str(tmp / "dist"),
              "--variant", f"onnx-fp32={fp32},precision=fp32",
              "--variant", f"onnx-int8-dynamic={tmp / 'int8.onnx'},precision=int8,method=dynamic,"
              "built_for=x86_64-vnni", "--int8-atol", "0.05")  # fmt: skip
    assert out.returncode == 0, out.stderr
    bundle = Path(out.stdout.strip())
    verify_bundle(bundle, [load_public_key(public)])
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp / "x", filter="data")
    m = json.loads((tmp / "x" / "manifest.json").read_text())
    assert m["formats"] == {"onnx": "model.onnx", "tflite": "model.tflite"}
    by_id = {v["id"]: v for v in m["variants"]}
    assert set(by_id) == {"onnx", "tflite", "onnx-fp32", "onnx-int8-dynamic"}
    assert by_id["onnx-fp32"]["file"] == "variants/onnx-fp32.onnx"
    assert by_id["onnx-fp32"]["golden"]["tolerance"]["atol"] != 0.05  # its own float rule
    v = by_id["onnx-int8-dynamic"]
    assert v["file"] == "variants/onnx-int8-dynamic.onnx" and v["file"] in m["files"]
    assert (v["precision"], v["method"], v["built_for"]) == ("int8", "dynamic", "x86_64-vnni")
    assert v["golden"]["tolerance"]["atol"] == 0.05  # its own rule, --int8-atol as CPU bound
    assert by_id["onnx"]["golden"]["outputs"] == m["golden"]["outputs"]["onnx"]
    assert "tolerance" not in by_id["onnx"]["golden"]  # the manifest's rule for onnx
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp / "x" / v["file"])).run(None, {"input": images[:5]})[0]
    want = np.load(tmp / "x" / v["golden"]["outputs"])
    assert_close(got, want[next(iter(want.files))], what="int8 variant vs its golden")


def test_package_refuses_a_variant_with_another_contract(
    sample_parts: SampleParts, keys: tuple[Path, Path], tmp: Path
) -> None:
    import onnx
    from onnx import TensorProto, helper

    private, _ = keys
    images, _ = samples()
    np.save(tmp / "cases.npy", images[:5])
    other = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])],
    ), opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # fmt: skip
    onnx.save(other, str(tmp / "other.onnx"))
    base = ["package", str(sample_parts.directory / "model.onnx"), "--name", "digits",
            "--version", "2.1.0", "--golden-inputs", str(tmp / "cases.npy"), "--key",
            str(private), "--out", str(tmp / "dist")]  # fmt: skip
    out = cli(*base, "--variant", f"wrong={tmp / 'other.onnx'}")
    assert out.returncode == 2
    assert "variant wrong" in out.stderr and "same API" in out.stderr
    for bad, says in ((f"Bad={tmp / 'other.onnx'}", "variant id 'Bad'"),
                      (f"v={tmp / 'other.onnx'},precision=int4", "precision 'int4'"),
                      (f"v={tmp / 'missing.onnx'}", "does not exist"),
                      ("novalue", "expected ID=PATH")):  # fmt: skip
        out = cli(*base, "--variant", bad)
        assert out.returncode == 2 and says in out.stderr, (bad, out.stderr)
        assert "Traceback" not in out.stderr
    assert not (tmp / "dist").exists() or list((tmp / "dist").iterdir()) == []


def test_variant_checks_are_the_agents_rules(tmp_path: Path) -> None:
    """The packager states a variant's precision and method with the words the agent's
    manifest check takes (agent.bundle), and its ids are agent names: a share that
    drifts would build bundles every device refuses."""
    from agent.bundle import METHODS, PRECISIONS
    from agent.names import is_name
    from export.package import VariantSpec

    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read by check()")
    for precision in PRECISIONS:
        for method in (None, *METHODS):
            VariantSpec("v", model, precision=precision, method=method).check()
    for precision, method in (("int4", None), ("FP32", None), ("fp32", "ptq"), (None, None)):
        with pytest.raises(PackageError, match="is not one of"):
            VariantSpec("v", model, precision=precision, method=method).check()  # type: ignore[arg-type]
    # Ids: the agent's name rule, lower case only (bundle files named for them must not
    # differ only in case); every id the packager takes is one the device takes.
    for vid in ("onnx-int8", "v1.2_a", "0", "a" * 64):
        VariantSpec(vid, model).check()
        assert is_name(vid)
    for vid in ("Bad", "-x", ".x", "a" * 65, "é", "a b", "x\n", ""):
        with pytest.raises(PackageError, match="variant id"):
            VariantSpec(vid, model).check()

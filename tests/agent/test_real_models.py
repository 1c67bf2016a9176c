"""Real models whose inputs have no batch axis or have it elsewhere than axis 0.

silero-vad takes `input` [B, N], `state` [2, B, 128] (batch on axis 1) and a 0-d
int64 `sr`; PP-OCR's detector takes [B, 3, H, W]. Each is packaged with the real
`edge-export package`, verified, served by a real agent process and asked through
the local API; answers must equal onnxruntime's own on the same file, and requests
with the batch on the wrong axis or the wrong rank must be refused naming the axis.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.api.client import ApiError
from agent.bundle import verify_bundle
from agent.signing import load_public_key
from export.package import PackageError, onnx_specs, parse_batch_axes
from tests.helpers import DEMO_KEY, DEMO_PUB, base_config, running_agent
from tests.hostile import TRACEBACK_MARKERS
from tests.real_models import real_model
from tests.tolerance import assert_close

SR = np.array(16000, dtype=np.int64)  # silero-vad's own rate; 0-d, shared by all cases
CHUNK = 512  # samples per case at 16 kHz (what silero-vad is trained on)


def export_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def ort_run(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def silero_feeds(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    return {
        "input": (rng.standard_normal((batch, CHUNK)) * 0.1).astype(np.float32),
        "state": (rng.standard_normal((2, batch, 128)) * 0.1).astype(np.float32),
        "sr": SR,
    }


def axes(specs: tuple) -> dict[str, int | None]:
    return {s.name: s.batch_axis for s in specs}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-models")


@pytest.fixture(scope="module")
def silero_bundle(models: Path) -> Path:
    onnx = real_model("silero_vad", models)
    np.savez(models / "vad-cases.npz", **silero_feeds(np.random.default_rng(0), 3))
    out = export_cli(
        "package", str(onnx), "--name", "silero-vad", "--version", "6.2.3",
        "--sample", str(models / "vad-cases.npz"),
        "--batch-axis", "state=1", "--batch-axis", "stateN=1", "--batch-axis", "sr=none",
        "--key", str(DEMO_KEY), "--out", str(models / "dist"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- the packager


def test_packager_infers_batch_axes_from_dimension_names(models: Path) -> None:
    inputs, outputs = onnx_specs(real_model("silero_vad_named", models))
    assert axes(inputs) == {"input": 0, "sr": None, "state": 1}
    assert axes(outputs) == {"output": 0, "stateN": 1}
    inputs, outputs = onnx_specs(real_model("ppocr_det", models))
    assert axes(inputs) == {"x": 0} and inputs[0].shape == (-1, 3, -1, -1)
    assert axes(outputs) == {"sigmoid_0.tmp_0": 0}


def test_packager_asks_instead_of_guessing_an_unnamed_batch_axis(models: Path) -> None:
    onnx = real_model("silero_vad", models)  # its dims carry no names
    with pytest.raises(PackageError, match=r"input state \[2, -1, 128\].*--batch-axis state=1"):
        onnx_specs(onnx)
    inputs, outputs = onnx_specs(onnx, {"state": 1, "stateN": 1})
    assert axes(inputs) == {"input": 0, "state": 1, "sr": None}
    assert axes(outputs) == {"output": 0, "stateN": 1}
    for given, message in [
        ({"state": 3}, r"state=3: input state has shape \[2, -1, 128\] \(rank 3\)"),
        ({"state": 0}, r"state=0: axis 0 of input state \[2, -1, 128\] is fixed at 2"),
        ({"state": 1, "sr": 0}, r"sr=0: input sr is 0-d \(a scalar\); it can only be none"),
        ({"State": 1}, r"names 'State', which the model does not have; its tensors are"),
    ]:
        with pytest.raises(PackageError, match=message):
            onnx_specs(onnx, given)
    assert parse_batch_axes(["state=1", "sr=None"]) == {"state": 1, "sr": None}
    for bad, message in [
        (["state"], "expected NAME=AXIS"),
        (["state=one"], "'one' is not an axis"),
        (["state=1", "state=2"], "names 'state' twice"),
    ]:
        with pytest.raises(PackageError, match=message):
            parse_batch_axes(bad)


def test_packager_checks_output_axes_against_the_models_own_answer(models: Path) -> None:
    onnx = real_model("silero_vad", models)
    np.savez(models / "cases4.npz", **silero_feeds(np.random.default_rng(1), 4))
    common = ["--name", "v", "--version", "1", "--key", str(DEMO_KEY), "--out", str(models)]
    # stateN [-1, -1, -1] follows the legacy rule (axis 0) unless told: the probe's
    # answer [2, 4, 128] for 4 cases shows it is wrong and names the fix.
    out = export_cli("package", str(onnx), "--sample", str(models / "cases4.npz"),
                     "--batch-axis", "state=1", *common)  # fmt: skip
    assert out.returncode == 2
    assert "output stateN came out as [2, 4, 128] for 4 golden case(s)" in out.stderr
    assert "pass --batch-axis stateN=1" in out.stderr
    # Golden cases that disagree on the batch, the sample's own batch on the wrong axis,
    # an sr with a batch axis: refused with the axis named, never a traceback.
    cases = silero_feeds(np.random.default_rng(2), 4)
    for name, bad, message in [
        ("state", cases["state"][:, :3], "golden input state has 3 cases on axis 1; input has 4"),
        ("state", np.zeros((4, 2, 128), np.float32), "wants [2, -1, 128] (-1 = any, batch on axis 1)"),
        ("sr", np.array([16000], np.int64), "golden input sr has shape [1]; the model wants []"),
    ]:  # fmt: skip
        np.savez(models / "bad.npz", **{**cases, name: bad})
        out = export_cli("package", str(onnx), "--sample", str(models / "bad.npz"),
                         "--batch-axis", "state=1", "--batch-axis", "stateN=1", *common)  # fmt: skip
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert not any(m in out.stderr for m in TRACEBACK_MARKERS), out.stderr
    assert not list(models.glob("v-1.edgebundle"))


def test_silero_vad_bundle_records_axes_and_golden_outputs(
    silero_bundle: Path, models: Path
) -> None:
    m = verify_bundle(silero_bundle, [load_public_key(DEMO_PUB)]).manifest
    assert axes(m.inputs) == {"input": 0, "state": 1, "sr": None}
    assert axes(m.outputs) == {"output": 0, "stateN": 1}
    assert not m.batchable  # the micro-batcher stacks on axis 0: it must leave this alone
    raw = json.loads(verify_bundle(silero_bundle, [load_public_key(DEMO_PUB)]).manifest_bytes)
    assert [t["batch_axis"] for t in raw["inputs"]] == [0, 1, None]
    assert raw["figures"]["latency_ms"]["onnxruntime"]["p50"] > 0
    import tarfile

    with tarfile.open(silero_bundle) as tar:
        for member in ("golden/inputs.npz", "golden/outputs-onnx.npz"):
            data = tar.extractfile(member)
            assert data is not None
            (models / Path(member).name).write_bytes(data.read())
    with np.load(models / "inputs.npz") as g:
        golden = {k: g[k] for k in g.files}
    assert golden["sr"].shape == () and golden["state"].shape == (2, 3, 128)
    want = ort_run(real_model("silero_vad", models), golden)
    with np.load(models / "outputs-onnx.npz") as g:
        for name, value in want.items():
            assert_close(g[name], value, what=name)


def test_golden_cases_are_cut_on_each_inputs_axis(models: Path) -> None:
    from export.package import GOLDEN_MAX_CASES, package_model

    sample = silero_feeds(np.random.default_rng(6), GOLDEN_MAX_CASES + 4)
    path = package_model(onnx_path=real_model("silero_vad_named", models), tflite_path=None,
                         name="vad-named", version="1.0.0", golden_inputs=sample,
                         key_path=DEMO_KEY, out_dir=models / "cut", runs=3)  # fmt: skip
    import tarfile

    with tarfile.open(path) as tar:
        data = tar.extractfile("golden/inputs.npz")
        assert data is not None
        (models / "cut.npz").write_bytes(data.read())
    with np.load(models / "cut.npz") as g:
        assert g["input"].shape == (GOLDEN_MAX_CASES, CHUNK)
        assert g["state"].shape == (2, GOLDEN_MAX_CASES, 128)
        np.testing.assert_array_equal(g["state"], sample["state"][:, :GOLDEN_MAX_CASES])
        assert g["sr"].shape == () and int(g["sr"]) == 16000


# ----------------------------------------------------------------- served by a real agent


def test_silero_vad_served_by_the_agent_answers_like_onnxruntime(
    silero_bundle: Path, models: Path, tmp: Path
) -> None:
    onnx = real_model("silero_vad", models)
    rng = np.random.default_rng(3)
    # Micro-batching on: the agent must still serve this model one request at a time
    # (stacking `state` on axis 0 would feed onnxruntime a [4, 1, 128] state).
    config = base_config(tmp, bundle=silero_bundle, extra="[batching]\nenabled = true\n")
    with running_agent(tmp, config) as agent, agent.client() as client:
        for batch in (1, 5):
            feeds = silero_feeds(rng, batch)
            got = client.infer("silero-vad", feeds)
            want = ort_run(onnx, feeds)
            assert got["output"].shape == (batch, 1) and got["stateN"].shape == (2, batch, 128)
            for name in want:
                assert_close(got[name], want[name], what=name)
        binary = client.infer("silero-vad", silero_feeds(rng, 2), binary=True)
        assert binary["stateN"].shape == (2, 2, 128)

        ok = silero_feeds(rng, 2)
        for change, message in [
            ({"state": np.zeros((2, 3, 128), np.float32)},
             "input 'state' has batch size 3 on axis 1 (shape [2, 3, 128]); input 'input' has 2 on axis 0"),
            ({"state": np.zeros((3, 2, 128), np.float32)},
             "input 'state': expected shape [2, -1, 128] (-1 = any, batch on axis 1), got [3, 2, 128]"),
            ({"sr": np.array([16000], np.int64)},
             "input 'sr': expected a scalar (shape [], shared by all cases), got shape [1]"),
            ({"sr": np.array(16000.0, np.float32)}, "input 'sr': expected dtype int64, got float32"),
            ({"state": np.zeros((2, 0, 128), np.float32), "input": np.zeros((0, CHUNK), np.float32)},
             "batch size is 0 (input 'input', axis 0)"),
        ]:  # fmt: skip
            with pytest.raises(ApiError) as err:
                client.infer("silero-vad", {**ok, **change})
            assert err.value.code == "input.mismatch" and err.value.status == 400
            assert message in str(err.value), str(err.value)

        # Concurrent requests with batching enabled: each answer is its own.
        feeds = [silero_feeds(np.random.default_rng(10 + i), 1) for i in range(4)]
        wants = [ort_run(onnx, f) for f in feeds]
        answers: dict[int, dict[str, np.ndarray] | Exception] = {}

        def ask(i: int) -> None:
            try:
                with agent.client() as c:
                    for _ in range(5):
                        answers[i] = c.infer("silero-vad", feeds[i], binary=True)
            except Exception as exc:
                answers[i] = exc

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i, want in enumerate(wants):
            answer = answers.get(i)
            assert isinstance(answer, dict), f"request {i} failed: {answer!r}"
            for name in want:
                assert_close(answer[name], want[name], what=f"case {i} {name}")
        assert "micro-batching off for silero-vad" in agent.output()
    assert "Traceback" not in agent.output()


def test_ppocr_detector_and_classifier_served_by_the_agent(models: Path, tmp: Path) -> None:
    rng = np.random.default_rng(4)
    bundles = {}
    for key, name, shape in [("ppocr_det", "ppocr-det", (2, 3, 64, 64)),
                             ("ppocr_cls", "ppocr-cls", (2, 3, 48, 96))]:  # fmt: skip
        np.save(models / f"{key}.npy", rng.random(shape, dtype=np.float32))
        out = export_cli(
            "package", str(real_model(key, models)), "--name", name, "--version", "4.0.0",
            "--golden-inputs", str(models / f"{key}.npy"), "--key", str(DEMO_KEY),
            "--out", str(models / "dist"),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        bundles[key] = Path(out.stdout.strip().splitlines()[-1])
        m = verify_bundle(bundles[key], [load_public_key(DEMO_PUB)]).manifest
        assert m.inputs[0].batch_axis == 0 and m.batchable
    det = real_model("ppocr_det", models)
    (tmp / "det").mkdir()
    config = base_config(tmp / "det", bundle=bundles["ppocr_det"])
    with running_agent(tmp / "det", config) as agent, agent.client() as client:
        for shape in [(1, 3, 96, 128), (3, 3, 64, 32)]:
            x = rng.random(shape, dtype=np.float32)
            got = client.infer("ppocr-det", {"x": x}, binary=True)["sigmoid_0.tmp_0"]
            want = ort_run(det, {"x": x})["sigmoid_0.tmp_0"]
            assert got.shape == (shape[0], 1, *shape[2:])
            assert_close(got, want)
        for bad, message in [
            (np.zeros((3, 64, 64), np.float32), "expected shape [-1, 3, -1, -1] (-1 = any), got [3, 64, 64]"),
            (np.zeros((1, 4, 64, 64), np.float32), "got [1, 4, 64, 64]"),
        ]:  # fmt: skip
            with pytest.raises(ApiError) as err:
                client.infer("ppocr-det", {"x": bad})
            assert err.value.code == "input.mismatch" and message in str(err.value)
    cls = real_model("ppocr_cls", models)
    (tmp / "cls").mkdir()
    config = base_config(tmp / "cls", bundle=bundles["ppocr_cls"])
    with running_agent(tmp / "cls", config) as agent, agent.client() as client:
        x = rng.random((4, 3, 48, 192), dtype=np.float32)
        name = "save_infer_model/scale_0.tmp_1"
        got = client.infer("ppocr-cls", {"x": x}, binary=True)[name]
        assert_close(got, ort_run(cls, {"x": x})[name])


# ----------------------------------------------------------------- LiteRT slices on the axis


@pytest.mark.slow
def test_litert_runs_a_frozen_batch_on_axis_1_in_slices(models: Path, tmp: Path) -> None:
    """A TFLite model converted at batch 2 on axis 1, with an input all cases share:
    packaged with --batch-axis, served, and asked for 5 cases (slices 2 + 2 + 1 padded)."""
    import os

    import torch

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    import litert_torch

    class SeqFirst(torch.nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.tanh(x * w)  # x [3, B, 4]: the batch on axis 1; w [4]: shared
            return y, y.sum(dim=(0, 2)).reshape(1, -1)  # [3, B, 4] and [1, B]

    def reference(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = np.tanh(x * w)
        return y, y.sum(axis=(0, 2)).reshape(1, -1)

    path = models / "seq-first.tflite"
    litert_torch.convert(SeqFirst().eval(), (torch.randn(3, 2, 4), torch.randn(4))).export(
        str(path)
    )
    from export.package import package_model, tflite_specs

    names = {"serving_default_args_0": 1, "serving_default_args_1": None,
             "serving_default_output_0_output": 1, "serving_default_output_1_output": 1}  # fmt: skip
    inputs, outputs = tflite_specs(path, names)
    assert [s.shape for s in inputs] == [(3, -1, 4), (4,)]  # the frozen 2 is dynamic to callers
    rng = np.random.default_rng(5)
    w = rng.standard_normal(4).astype(np.float32)
    golden = {"serving_default_args_0": rng.standard_normal((3, 3, 4)).astype(np.float32),
              "serving_default_args_1": w}  # fmt: skip
    bundle = package_model(onnx_path=None, tflite_path=path, name="seq-first", version="1.0.0",
                           golden_inputs=golden, key_path=DEMO_KEY, out_dir=models, runs=5,
                           batch_axes=names)  # fmt: skip
    with running_agent(tmp, base_config(tmp, bundle=bundle)) as agent, agent.client() as client:
        x = rng.standard_normal((3, 5, 4)).astype(np.float32)
        got = client.infer("seq-first", {"serving_default_args_0": x, "serving_default_args_1": w})
        y, s = reference(x, w)
        assert_close(got["serving_default_output_0_output"], y)
        assert_close(got["serving_default_output_1_output"], s)
        with pytest.raises(ApiError) as err:
            client.infer("seq-first", {"serving_default_args_0": x[:, :, :3],
                                       "serving_default_args_1": w})  # fmt: skip
        assert err.value.code == "input.mismatch" and "batch on axis 1" in str(err.value)

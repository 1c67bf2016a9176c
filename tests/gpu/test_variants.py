"""The variant choice on a GPU machine: which variant a CUDA device picks, with figures.

Skipped where onnxruntime has no CUDAExecutionProvider. Run on the GPU machine with
`python -m pytest -q -s -p no:cacheprovider tests/gpu/test_variants.py`; the figures
are printed and, when $OUT is set, written to $OUT/variants-gpu.json for the report.
The bundles are bench/variants.py's (an 8x1024 MLP as fp32 / INT8 dynamic / INT8
static ONNX, and the digits sample's variants), their golden files recorded here on
the CPU provider: a GPU variant that does not reproduce them within its tolerance is
rejected with its reason, which is itself a figure (the tolerance families of
agent/tolerance.py are what lets a CUDA device accept float variants).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="onnxruntime has no CUDAExecutionProvider here (a CPU-only build or no GPU)",
)


@pytest.mark.parametrize("which", ["mlp", "digits"])
def test_a_cuda_device_measures_its_variants_and_serves_the_fastest_that_passes(
    which: str, tmp_path: Path
) -> None:
    from agent.config.loader import parse_config
    from agent.service import Agent
    from agent.variants.errors import NoVariantPassedError
    from bench.variants import digits_bundle, mlp_bundle
    from tests.helpers import DEMO_PUB

    (tmp_path / which).mkdir()
    bundle = mlp_bundle(tmp_path / which) if which == "mlp" else digits_bundle(tmp_path / which)
    figures: dict[str, Any] = {}
    for batch in (1, 32):
        config = parse_config(
            {
                "state_dir": str(tmp_path / f"state-{batch}"),
                "trust": {"public_keys": [str(DEMO_PUB)]},
                "api": {"socket": str(tmp_path / "api.sock")},
                "model": {"variant_batch": batch},
            },
            {},
        )
        agent = Agent(config)
        try:
            agent.admission.install(bundle)
        except NoVariantPassedError as exc:
            figures[str(batch)] = {"refused": str(exc), "failures": exc.failures}
            # Every variant was measured and each says why it failed on this GPU.
            assert exc.failures and all(exc.failures.values())
            continue
        model = agent.host.model
        assert model is not None and model.selection is not None
        selection = model.selection.to_json()
        selection["providers"] = model.runtime.describe().get("providers")
        selection["family"] = model.runtime.family()
        figures[str(batch)] = selection
        passed = [v for v in selection["variants"] if v["status"] in ("served", "passed")]
        served = [v for v in passed if v["status"] == "served"]
        assert len(served) == 1 and served[0]["id"] == selection["chosen"]
        assert served[0]["p50_ms"] == min(v["p50_ms"] for v in passed)
        if selection["runtime"] == "onnxruntime":
            assert "CUDAExecutionProvider" in (selection["providers"] or [])
        agent.host.close()
    print(json.dumps({which: figures}, indent=1))
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "variants-gpu.json"
        existing = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**existing, which: figures}, indent=1))

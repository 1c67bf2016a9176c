"""Per-variant latency and memory on this machine, and which variant the agent picks.

    python bench/variants.py [--batch 1 --batch 32] [--json]

Two bundles, each measured by the agent's own variant choice (agent/variants/), as a
device does at validation:
- `mlp`: an 8x1024 MLP (~1 ms a row, bench/_common.py) as onnx-fp32,
  onnx-int8-dynamic and onnx-int8-static (onnxruntime's quantizers, calibrated on
  random rows): where INT8 pays off depends on the CPU's instruction set (VNNI);
- `digits`: the sample model as onnx-fp32, onnx-int8 (dynamic) and tflite-fp32.
Every golden file is that variant's own output here, so all pass. Each choice runs
in a fresh process (spawned), as an agent start does. Prints per variant
p50 ms at each batch and peak MB (load + a run of that batch, agent.footprint), the
ratio of each to onnx-fp32 measured in the same process, the pick, and what the
choice costs at start: measuring vs a cache hit (a restart). Figures vary run to run;
compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import DEMO_KEY, DEMO_PUB, build_mlp_onnx


def _cpu() -> str:
    from agent.variants.fingerprint import hardware

    hw = hardware()
    return f"{hw['machine']} {hw['cpu']} ({hw['cpus']} cpus)"


def mlp_bundle(directory: Path, reverse: bool = False) -> Path:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from agent.bundle import write_bundle
    from agent.signing import load_private_key

    fp32 = build_mlp_onnx(directory / "mlp.onnx")
    dyn = directory / "mlp-int8-dynamic.onnx"
    quantize_dynamic(fp32, dyn, weight_type=QuantType.QInt8)
    rng = np.random.default_rng(3)

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [{"input": rng.standard_normal((8, 1024)).astype(np.float32)} for _ in range(8)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    static = directory / "mlp-int8-static.onnx"
    quantize_static(fp32, static, Rows(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    x = np.random.default_rng(1).standard_normal((4, 1024)).astype(np.float32)
    np.savez(directory / "inputs.npz", input=x)
    files = {"golden/inputs.npz": directory / "inputs.npz"}
    variants = []
    for vid, path, precision, method in (
        ("onnx-fp32", fp32, "fp32", None),
        ("onnx-int8-dynamic", dyn, "int8", "dynamic"),
        ("onnx-int8-static", static, "int8", "static"),
    ):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        golden = directory / f"golden-{vid}.npz"
        np.savez(golden, output=session.run(["output"], {"input": x})[0])
        files[f"variants/{vid}.onnx"] = path
        files[f"golden/{vid}.npz"] = golden
        variants.append({"id": vid, "format": "onnx", "file": f"variants/{vid}.onnx",
                         "precision": precision, "method": method,
                         "golden": {"outputs": f"golden/{vid}.npz"}})  # fmt: skip
    manifest = {
        "name": "mlp",
        "version": "1.0.0",
        "formats": {"onnx": "variants/onnx-fp32.onnx"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 1024]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, 1024]}],
        "golden": {"inputs": "golden/inputs.npz",
                   "outputs": {"onnx": "golden/onnx-fp32.npz"}},
        "variants": variants[::-1] if reverse else variants,
    }  # fmt: skip
    return write_bundle(directory / "mlp-1.0.0.edgebundle", manifest, files,
                        load_private_key(DEMO_KEY))  # fmt: skip


def digits_bundle(directory: Path, reverse: bool = False) -> Path:
    from agent.signing import load_private_key
    from tests.helpers import unpack_sample
    from tests.variant_bundles import variant_bundle

    parts = unpack_sample(directory / "sample")
    order = ("onnx-fp32", "onnx-int8", "tflite-fp32")
    return variant_bundle(parts, load_private_key(DEMO_KEY), directory / "built", "1.0.0",
                          include=order[::-1] if reverse else order)  # fmt: skip


def choose(bundle: Path, state: Path, batch: int) -> tuple[dict[str, Any], float]:
    """Install `bundle` in a fresh in-process agent; (its selection, seconds it took)."""
    from agent.config.loader import parse_config
    from agent.service import Agent

    config = parse_config(
        {
            "state_dir": str(state),
            "trust": {"public_keys": [str(DEMO_PUB)]},
            "api": {"socket": str(state.parent / "api.sock"), "max_batch_size": 4096},
            "model": {"variant_batch": batch},
        },
        {},
    )
    agent = Agent(config)
    started = time.perf_counter()
    if agent.store.link("current") is not None:
        agent.admission.serve_current()  # a restart: the cached choice
    else:
        agent.admission.install(bundle)
    took = time.perf_counter() - started
    model = agent.host.model
    assert model is not None and model.selection is not None
    selection = model.selection.to_json()
    agent.host.close()
    return selection, took


def fresh_process(bundle: Path, state: Path, batch: int) -> tuple[dict[str, Any], float]:
    """`choose` in a new process, as an agent starts: RSS figures are then not hidden by
    heap that building the bundles freed in this one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(choose, bundle, state, batch).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, action="append", default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--reverse", action="store_true",
                        help="measure the variants in the reverse order (a check that the "
                        "order, one after another, does not decide the pick)")  # fmt: skip
    args = parser.parse_args()
    batches = args.batch or [1, 32]
    report: dict[str, Any] = {"cpu": _cpu(), "python": platform.python_version(), "bundles": {}}
    with tempfile.TemporaryDirectory(prefix="er-variants-", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "mlp").mkdir()
        bundles = {
            "mlp": mlp_bundle(root / "mlp", args.reverse),
            "digits": digits_bundle(root / "digits", args.reverse),
        }
        for name, bundle in bundles.items():
            per_batch = {}
            for batch in batches:
                state = root / f"state-{name}-{batch}"
                measured, cold_s = fresh_process(bundle, state, batch)
                cached, warm_s = fresh_process(bundle, state, batch)
                assert cached["cached"] and cached["chosen"] == measured["chosen"]
                per_batch[batch] = {"selection": measured, "measure_s": round(cold_s, 3),
                                    "cached_s": round(warm_s, 3)}  # fmt: skip
            report["bundles"][name] = per_batch
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"variant choice on {report['cpu']}")
    for name, per_batch in report["bundles"].items():
        for batch, entry in per_batch.items():
            sel = entry["selection"]
            base = next((v["p50_ms"] for v in sel["variants"] if v["id"] == "onnx-fp32"), None)
            print(f"\n{name} batch {batch}: picks {sel['chosen']} ({sel['runtime']}); "
                  f"start with measuring {entry['measure_s']:.2f} s, cached {entry['cached_s']:.2f} s")  # fmt: skip
            print(f"  {'variant':<20} {'status':<8} {'p50 ms':>9} {'x fp32':>7} {'peak MB':>8}")
            for v in sel["variants"]:
                p50 = v["p50_ms"]
                ratio = f"{p50 / base:.2f}" if p50 and base else "-"
                p50s = f"{p50:.4f}" if p50 is not None else "-"
                peak = f"{v['peak_mb']:.1f}" if v["peak_mb"] is not None else "-"
                print(f"  {v['id']:<20} {v['status']:<8} {p50s:>9} {ratio:>7} {peak:>8}")


if __name__ == "__main__":
    main()

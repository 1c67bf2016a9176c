"""How much room the golden rule leaves a right model, and how far a wrong one lands.

    python bench/golden_tolerance.py [BUNDLE ...]      (default: the shipped sample)

For each bundle's ONNX model: the golden cases computed as each family computes them
(export.golden_rule: unfused QDQ on the CPU, TF32 and FP16 roundings simulated with real
onnxruntime sessions), then wrong models made from it (two labels swapped, int8 or float
weights perturbed), each judged by the bundle's own rule per family. Prints the worst
output's difference as a share of what the rule allows (<= 1 passes) and the verdict:
the right model's ratios are the margin, the wrong models' the distance to refusal.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from _common import DEMO_PUB, SAMPLE

from agent import bundle as B
from agent.runtimes.ort import OrtConfig, OrtRuntime
from agent.signing import load_public_key
from agent.tolerance import compare
from export.golden_rule import reduced_precision
from tests.wrong_models import perturbed_float, perturbed_int8, swapped_labels

FAMILIES = ("cpu", "cuda", "tensorrt")


def _run(model: onnx.ModelProto, manifest: B.Manifest, inputs: dict[str, np.ndarray],
         work: Path, optimize: bool) -> dict[str, np.ndarray]:  # fmt: skip
    path = work / "m.onnx"
    onnx.save(model, str(path))
    config = OrtConfig(providers=["CPUExecutionProvider"], intra_op_threads=1,
                       graph_optimization="all" if optimize else "disable")  # fmt: skip
    runtime = OrtRuntime(path, manifest.inputs, manifest.outputs, config)
    try:
        return runtime.run(inputs)
    finally:
        runtime.close()


def _row(label: str, manifest: B.Manifest, model: onnx.ModelProto, inputs: dict[str, np.ndarray],
         want: dict[str, np.ndarray], work: Path) -> None:  # fmt: skip
    rule = manifest.golden_tolerance.for_format("onnx")
    cells = []
    for family in FAMILIES:
        computed = model if family == "cpu" else reduced_precision(model, family == "tensorrt")
        got = _run(computed, manifest, inputs, work, optimize=False)
        report = compare(rule, family, want, got)
        ratios = []
        for r in report.outputs.values():
            if r.norm_error is not None:
                bound, _ = rule.layer(r.name, family)
                ratios.append(r.norm_error / (bound.norm_rtol or 1.0))
            else:
                ratios.append(r.max_abs_diff / r.allowance if r.allowance else float("inf"))
        cells.append(f"{max(ratios):7.3f} {'pass' if report.ok else 'REFUSED':7s}")
    print(f"  {label:34s} " + " | ".join(cells))


def main(paths: list[Path]) -> None:
    for bundle in paths:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            verified = B.unpack_bundle(bundle, work / "u", [load_public_key(DEMO_PUB)])
            m, directory = verified.manifest, work / "u"
            with np.load(directory / str(m.golden_inputs)) as x:
                inputs = {k: x[k] for k in x.files}
            with np.load(directory / m.golden_outputs["onnx"]) as y:
                want = {k: y[k] for k in y.files}
            model = onnx.load(str(directory / m.formats["onnx"]))
            print(f"{bundle.name}: worst diff / allowance per family (<= 1 passes)")
            print(f"  {'':34s} " + " | ".join(f"{f:15s}" for f in FAMILIES))
            _row("right model", m, model, inputs, want, work)
            int8 = any(n.op_type == "DequantizeLinear" for n in model.graph.node)
            wrong = [("labels 3 and 8 swapped", swapped_labels(model, 3, 8))] if len(
                m.labels) > 8 else []  # fmt: skip
            if int8:
                wrong += [(f"int8 weights +-{n} levels", perturbed_int8(model, n))
                          for n in (1, 2, 4, 8)]  # fmt: skip
            else:
                wrong += [(f"float weights + {s:.1%} noise", perturbed_float(model, s))
                          for s in (0.005, 0.01, 0.02, 0.05)]  # fmt: skip
            for label, bad in wrong:
                _row(label, m, bad, inputs, want, work)


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]] or [SAMPLE])

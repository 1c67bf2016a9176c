"""Build the shipped recipes and print, per stage: quality, parameters, file size and latency.

    python bench/export_recipes.py [digits] [minilm] [minilm-student] [spiky] [--runs 20]

`spiky` is the tests' tiny digits student with one huge activation outlier
(tests/export/fixtures/tiny.py) under a tight gate: post-training static INT8 fails
there, mixed precision and QAT are what pass; it prints their accuracy side by side.
Every INT8 method the recipe builds (static, dynamic, QAT, mixed) is a row, as it
is a variant of the bundle.

Latency is the median of `runs` timed calls after warm-up, in this process, at
batch 1 and batch 32: onnxruntime with 1 and 2 intra-op threads, LiteRT with 1
thread. LiteRT models have a frozen batch of 1 (litert-torch), so "batch 32"
there is 32 calls, as a device runs it. Ratios are against the float teacher
and the float student (ONNX, same batch and threads); minilm-student also quantizes the
6-layer teacher the recipe's way and times the student INT8 against it. Figures only: nothing is
asserted, this machine is shared and noisy. The issue's targets are checked and
printed at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from export.pipeline.build import Options, run_build  # noqa: E402
from export.pipeline.runners import TfliteRunner, onnx_session  # noqa: E402


def _median_ms(fn: Any, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _feeds(inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    n = next(iter(inputs.values())).shape[0]
    idx = np.arange(batch) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}


def latency(path: Path, inputs: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    out: dict[str, float] = {}
    if path.suffix == ".onnx":
        for threads in (1, 2):
            session = onnx_session(path, threads)
            for batch in (1, 32):
                feed = _feeds(inputs, batch)
                out[f"ort{threads}_b{batch}"] = _median_ms(lambda s=session, f=feed: s.run(None, f),
                                                           runs)  # fmt: skip
    else:
        runner = TfliteRunner(path, threads=1)
        names = list(inputs)
        for batch in (1, 32):
            feed = _feeds(inputs, batch)
            arrays = [feed[n] for n in names]
            out[f"lite1_b{batch}"] = _median_ms(lambda a=arrays: runner.run(a), runs)
    return out


COLUMNS = ("ort1_b1", "ort2_b1", "lite1_b1", "ort1_b32", "ort2_b32", "lite1_b32")


def bench(recipe: str, runs: int, key: Path | None) -> dict[str, Any]:
    from export.pipeline.loader import load_splits
    from export.pipeline.recipe import load_recipe

    path = ROOT / "models" / recipe / "recipe.toml"
    with tempfile.TemporaryDirectory(prefix=f"bench-{recipe}-") as tmp:
        if recipe == "minilm-student":  # the 3-layer student, through its 0.95 gate
            path = ROOT / "models" / "minilm" / "student.toml"
        if recipe == "spiky":
            path = _spiky_recipe(Path(tmp) / "recipe")
        t0 = time.monotonic()
        result = run_build(path, Path(tmp), key, Options(keep_workdir=True, runs=runs))
        build_s = time.monotonic() - t0
        inputs = {k: v[:64] for k, v in load_splits(load_recipe(path)).eval.inputs.items()}
        rows = {r["stage"]: r for r in result.report["stages"]}
        measured: dict[str, dict[str, float]] = {}
        for stage, model in result.models.items():
            measured[stage] = latency(model, inputs, runs)
        if "teacher onnx" in result.models and "onnx int8" in result.models:
            # A student build: the 6-layer teacher made INT8 the same way, to compare with.
            row = teacher_int8(path, result.models["teacher onnx"], result.report)
            rows[row["stage"]] = row
            measured[row["stage"]] = latency(Path(row.pop("path")), inputs, runs)
        work = next(iter(result.models.values())).parent
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    teacher = "teacher onnx" if "teacher onnx" in measured else "onnx float"
    order = [r["stage"] for r in result.report["stages"] if r["stage"] in measured]
    if "teacher int8" in measured:  # not a build stage: the bench's own comparison row
        order.insert(order.index("teacher onnx") + 1, "teacher int8")
    metric = result.report["metric"]
    isa = result.report.get("isa", {})
    print(f"\n## {recipe}: built in {build_s:.1f} s; selected {result.report['selected']}")
    if isa:
        print(f"instruction set: {isa['build_host']['label']}; preset {isa['preset']} "
              f"({isa['preset_reason']})")  # fmt: skip
    failed = [g for g in result.report["gates"] if not g["passed"]]
    for g in failed:
        print(f"left out: {g['stage']} ({g['detail']})")
    mixed = result.report.get("mixed_precision")
    if mixed:
        print(f"mixed precision: kept float {mixed['kept_float']} of {mixed['quantizable']} "
              "nodes; steps " + ", ".join(f"{len(s['kept_float'])} float -> {s['metric']:.4g}"
                                          for s in mixed["steps"]))  # fmt: skip
    print("torch stages: " + ", ".join(
        f"{r['stage']} {metric} {r['metric']:.4g} ({r.get('params') or 0:,} params)"
        for r in result.report["stages"] if r["format"] == "torch"))  # fmt: skip
    head = f"{'stage':18} {metric:>9} {'params':>10} {'size':>10} " + " ".join(
        f"{c:>10}" for c in COLUMNS
    )
    print(head + "   (ms, median)")
    for stage in order:
        r, lat = rows[stage], measured[stage]
        params = r.get("params") or rows.get("pruned", rows.get("student", {})).get("params", 0)
        if stage == "teacher onnx":
            params = rows["teacher"]["params"]
        size = r["size_bytes"] / 1024
        cells = " ".join(f"{lat[c]:>10.3f}" if c in lat else f"{'-':>10}" for c in COLUMNS)
        print(f"{stage:18} {r['metric']:>9.4g} {params or 0:>10,} {size:>8.1f}KB {cells}")
    for base_name, base in (("float teacher", teacher), ("float student", "onnx float")):
        print(f"ratios vs {base_name} ({base}), latency per column / size:")
        for stage in order:
            lat, ref = measured[stage], measured[base]
            cells = []
            for c in COLUMNS:
                ref_col = c.replace("lite1", "ort1")
                cells.append(f"{lat[c] / ref[ref_col]:>10.2f}" if c in lat else f"{'-':>10}")
            size = rows[stage]["size_bytes"] / rows[base]["size_bytes"]
            print(f"  {stage:16} {' '.join(cells)}   size {size:.3f}")
    return {"rows": rows, "measured": measured, "teacher": teacher}


def teacher_int8(recipe_path: Path, teacher: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Quantize the float teacher with the recipe's INT8 settings; its cosine to the teacher."""
    from export.pipeline.loader import load_splits
    from export.pipeline.quantize import QuantizeConfig, quantize_onnx
    from export.pipeline.recipe import load_recipe
    from export.pipeline.runners import run_onnx
    from export.pipeline.torchrun import score

    recipe = load_recipe(recipe_path)
    q = recipe.quantize
    cfg = QuantizeConfig(mode=q.mode, preset=q.preset, calibration_method=q.calibration_method,
                         per_channel=q.per_channel, engine=q.engine, operators=tuple(q.operators),
                         batch_size=min(recipe.dataset.batch_size, 64))  # fmt: skip
    splits = load_splits(recipe)
    n = recipe.dataset.calibration_samples
    out = quantize_onnx(teacher, teacher.with_name("teacher-int8.onnx"), cfg,
                        splits.calibration.take(n) if n else splits.calibration)  # fmt: skip
    bs = recipe.dataset.batch_size
    ref = run_onnx(teacher, splits.eval.inputs, bs)
    metric = score(recipe.task, run_onnx(out, splits.eval.inputs, bs), None, ref)
    params = next(r["params"] for r in report["stages"] if r["stage"] == "teacher")
    return {"stage": "teacher int8", "metric": metric, "size_bytes": out.stat().st_size,
            "params": params, "path": str(out)}  # fmt: skip


def _spiky_recipe(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.export.pipeline_helpers import write_recipe

    return write_recipe(folder, {
        'builder = "tiny:build_student"': 'builder = "tiny:build_spiky_student"',
        "[prune]\nenabled = true": "[prune]\nenabled = false",
        "max_accuracy_drop = 25.0": "max_accuracy_drop = 5.0",
        'preset = "avx512_vnni"': 'preset = "auto"\nmixed_precision = true\n'
                                  'extra_modes = ["qat", "dynamic"]\nqat_percentile = 99.0',
    })  # fmt: skip


def targets(name: str, res: dict[str, Any]) -> None:
    rows, m = res["rows"], res["measured"]
    if name == "minilm-student" and "teacher int8" in m:
        s, t = m["onnx int8"], m["teacher int8"]
        print(
            f"\nTARGET minilm student: INT8 student mean cosine {rows['onnx int8']['metric']:.4f} "
            f"[>= 0.95] (6-layer INT8: {rows['teacher int8']['metric']:.4f}); student INT8 / "
            f"6-layer INT8 latency, onnxruntime 2 threads: batch 1 "
            f"{s['ort2_b1']:.3f} / {t['ort2_b1']:.3f} ms = {s['ort2_b1'] / t['ort2_b1']:.3f}, "
            f"batch 32 {s['ort2_b32']:.3f} / {t['ort2_b32']:.3f} ms = "
            f"{s['ort2_b32'] / t['ort2_b32']:.3f}; 1 thread: batch 1 "
            f"{s['ort1_b1'] / t['ort1_b1']:.3f}, batch 32 {s['ort1_b32'] / t['ort1_b32']:.3f}; "
            f"size {rows['onnx int8']['size_bytes'] / rows['teacher int8']['size_bytes']:.3f}"
        )
        return
    if name == "minilm":
        lat = m["onnx int8"]["ort1_b32"] / m["onnx float"]["ort1_b32"]
        lat2 = m["onnx int8"]["ort2_b32"] / m["onnx float"]["ort2_b32"]
        size = rows["onnx int8"]["size_bytes"] / rows["onnx float"]["size_bytes"]
        cos = rows["onnx int8"]["metric"]
        print(f"\nTARGET minilm: INT8/float latency at batch 32 = {lat:.3f} (1 thread), "
              f"{lat2:.3f} (2 threads) [<= 0.45]; size {size:.3f} [<= 0.27]; "
              f"mean cosine {cos:.4f} [>= 0.99]")  # fmt: skip
    if name == "digits":
        teacher_acc = rows["teacher"]["metric"]
        t = res["teacher"]
        for stage in [s for s in m if "int8" in s]:
            col = "lite1_b32" if stage.startswith("tflite") else "ort1_b32"
            speed = m[t]["ort1_b32"] / m[stage][col]
            speed2 = (m[t]["ort2_b32"] / m[stage]["ort2_b32"]) if "ort2_b32" in m[stage] else None
            extra = f", {speed2:.1f}x (2 threads)" if speed2 else ""
            print(f"TARGET digits {stage}: accuracy {rows[stage]['metric']:.2f}% vs teacher "
                  f"{teacher_acc:.2f}% (drop {teacher_acc - rows[stage]['metric']:.2f} "
                  f"[<= 1]); {speed:.1f}x faster than the teacher at batch 32, 1 thread{extra} "
                  "[>= 3]")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=["digits", "minilm"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--key", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in args.recipes:
        targets(name, bench(name, args.runs, args.key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

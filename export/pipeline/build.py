"""`edge-export build RECIPE.toml --out DIR`: the whole pipeline, start to signed bundle.

Order matters for failing early: the recipe, the signing key, the builders and
the dataset (shapes, empty splits) are all checked before any training starts.
Everything is produced in a temporary folder inside DIR; only a finished build
moves its report files and, last, its bundle into DIR, so a failure at any
step leaves nothing half-written there.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent.tolerance import Tolerance
from export.pipeline.errors import (
    BuildError,
    CalibrationError,
    ExportFailedError,
    GateError,
    ParityError,
)
from export.pipeline.gates import Gates
from export.pipeline.loader import Split, Splits, load_model, load_splits
from export.pipeline.recipe import Recipe, load_recipe
from export.pipeline.report import write_reports

log = logging.getLogger(__name__)

GOLDEN_ROWS = 16
REPO = Path(__file__).resolve().parents[2]
DEMO_KEY = REPO / "models" / "keys" / "demo-INSECURE.key"


@dataclass
class BuildResult:
    bundle: Path
    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    # Intermediate model files by stage; only when Options.keep_workdir (they live there).
    models: dict[str, Path] = field(default_factory=dict)


@dataclass
class Options:
    skip_tflite: bool = False
    runs: int | None = None  # latency runs per candidate (None: the recipe's)
    threads: int | None = None
    keep_workdir: bool = False
    # The bundle's version instead of the recipe's (a rebuild of a released version,
    # such as the sample models/digits/digits-1.0.0.edgebundle).
    version: str | None = None
    # select.prefer per format instead of the recipe's ({"onnx": "int8"}): a build that
    # must not depend on this machine's latency noise (the sample).
    prefer: dict[str, str] | None = None


class _Build:
    def __init__(self, recipe: Recipe, recipe_path: Path, out_dir: Path, key: Path,
                 opts: Options, work: Path) -> None:  # fmt: skip
        self.r = recipe
        self.recipe_path = recipe_path
        self.out_dir = out_dir
        self.key = key
        self.opts = opts
        self.work = work
        self.in_names = [t.name for t in recipe.inputs]
        self.out_names = list(recipe.outputs)
        self.gates = Gates(recipe.task, recipe.gates.max_accuracy_drop, recipe.gates.min_cosine)
        self.stages: list[dict[str, Any]] = []
        self.candidates: dict[str, Path] = {}  # stage name -> model file
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.report: dict[str, Any] = {}
        self.reference: dict[str, np.ndarray] | None = None  # teacher outputs on eval

    # ------------------------------------------------------------------ helpers

    @property
    def threads(self) -> int:
        return self.opts.threads or self.r.select.threads

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = round(time.monotonic() - start, 2)

    def _score(self, outputs: dict[str, np.ndarray], splits: Splits) -> float:
        from export.pipeline.torchrun import score

        return score(self.r.task, outputs, splits.eval.labels, self.reference)

    def _row(self, stage: str, fmt: str, metric: float | None, **extra: Any) -> dict[str, Any]:
        row = {"stage": stage, "format": fmt, "metric": metric, **extra}
        if "params" not in row and stage != "teacher onnx":
            # Exported candidates carry the parameters of the model they were made from.
            source = next((r for r in reversed(self.stages) if r.get("params")
                           and r["stage"] != "teacher onnx"), None)  # fmt: skip
            if source is not None:
                row["params"] = source["params"]
                if source.get("flops"):
                    row["flops"] = source["flops"]
        self.stages.append(row)
        return row

    # ------------------------------------------------------------------ torch side

    def torch_stages(self, splits: Splits) -> Any:
        import torch

        from export.pipeline.distill import DistillConfig, distill
        from export.pipeline.prune import (
            MaskKeeper,
            count_flops,
            prune_magnitude,
            prune_structured,
        )
        from export.pipeline.torchrun import as_tensors, count_params, predict

        r = self.r
        torch.manual_seed(r.seed)
        assert r.teacher is not None
        teacher = load_model(r.teacher, "teacher", r.root)
        student = load_model(r.student, "student", r.root) if r.student is not None else None
        sample = as_tensors(splits.eval.take(2).inputs, self.in_names)
        bs = r.dataset.batch_size
        t = time.monotonic()
        ref = predict(teacher, splits.eval, self.in_names, self.out_names, bs, "teacher")
        self.reference = ref
        baseline = self._score(ref, splits)
        self.gates.set_baseline(baseline)
        self._row("teacher", "torch", baseline, params=count_params(teacher),
                  flops=count_flops(teacher, sample))  # fmt: skip
        self._timed("teacher_eval", t)

        model = student if student is not None else copy.deepcopy(teacher)
        if r.distill_on or r.prune_on:
            # Fail before minutes of training, not after: export the untrained model once.
            from export.pipeline.onnx_export import export_onnx

            t = time.monotonic()
            export_onnx(model, splits.eval, r.inputs, self.out_names,
                        self.work / "preflight.onnx", r.onnx.opset)  # fmt: skip
            (self.work / "preflight.onnx").unlink()
            self._timed("preflight_export", t)
        cfg = DistillConfig(
            epochs=r.distill.epochs, lr=r.distill.lr, temperature=r.distill.temperature,
            alpha=r.distill.alpha, loss=r.distill.loss, batch_size=bs,
            weight_decay=r.distill.weight_decay, seed=r.seed,
        )  # fmt: skip
        if r.distill_on:
            t = time.monotonic()
            distill(model, teacher, splits.train, self.in_names, self.out_names, cfg)
            self._timed("distill", t)
            metric = self._score(predict(model, splits.eval, self.in_names, self.out_names, bs),
                                 splits)  # fmt: skip
            self._row("student", "torch", metric, params=count_params(model),
                      flops=count_flops(model, sample))  # fmt: skip
            self.gates.check("distill", metric)
        elif student is not None:
            metric = self._score(predict(model, splits.eval, self.in_names, self.out_names, bs),
                                 splits)  # fmt: skip
            self._row("student", "torch", metric, params=count_params(model))
            self.gates.check("student", metric)

        if r.prune_on:
            t = time.monotonic()
            p = r.prune
            if p.method == "structured":
                stats = prune_structured(model, sample, p.ratio, p.ignore)
                keeper = None
            else:
                stats = prune_magnitude(model, sample, p.ratio, p.ignore)
                keeper = MaskKeeper(model)
            if p.finetune_epochs:
                ft = DistillConfig(**{**asdict(cfg), "epochs": p.finetune_epochs,
                                      "lr": p.finetune_lr})  # fmt: skip
                distill(model, teacher, splits.train, self.in_names, self.out_names, ft,
                        desc="prune fine-tune",
                        after_step=None if keeper is None else keeper.apply)  # fmt: skip
            self._timed("prune", t)
            metric = self._score(predict(model, splits.eval, self.in_names, self.out_names, bs),
                                 splits)  # fmt: skip
            self.report["prune"] = {"method": p.method, "ratio": p.ratio, **asdict(stats)}
            self._row("pruned", "torch", metric, params=stats.params_after,
                      nonzero=stats.nonzero_after, flops=stats.flops_after)  # fmt: skip
            self.gates.check("prune", metric)
        return teacher, model

    def export_onnx(self, teacher: Any, model: Any, splits: Splits) -> Path:
        from export.pipeline.onnx_export import check_parity, export_onnx
        from export.pipeline.runners import run_onnx
        from export.pipeline.torchrun import count_params

        r = self.r
        t = time.monotonic()
        held_out = splits.eval.take(r.onnx.parity_samples)
        if model is not teacher and (r.distill_on or r.prune_on or r.student is not None):
            # The float teacher as ONNX: the "what we started with" latency and size.
            tpath = export_onnx(teacher, held_out, r.inputs, self.out_names,
                                self.work / "teacher.onnx", r.onnx.opset)  # fmt: skip
            self._row("teacher onnx", "onnx", self.stages[0]["metric"],
                      params=count_params(teacher), size_bytes=tpath.stat().st_size,
                      measure=str(tpath))  # fmt: skip
        path = export_onnx(model, held_out, r.inputs, self.out_names, self.work / "float.onnx",
                           r.onnx.opset)  # fmt: skip
        diffs = check_parity(model, path, held_out, self.in_names, self.out_names, r.onnx.atol,
                             r.dataset.batch_size)  # fmt: skip
        self.gates.record_parity("onnx float", diffs, r.onnx.atol)
        metric = self._score(run_onnx(path, splits.eval.inputs, r.dataset.batch_size), splits)
        self._row("onnx float", "onnx", metric, params=count_params(model),
                  size_bytes=path.stat().st_size, parity_max_abs_diff=diffs)  # fmt: skip
        self.candidates["onnx float"] = path
        self.gates.check("onnx float", metric)
        self._timed("onnx_export", t)
        return path

    def byo_onnx(self, splits: Splits) -> Path:
        from export.pipeline.onnx_export import check_single_file
        from export.pipeline.runners import run_onnx

        assert self.r.onnx_model is not None
        src = (self.r.root / self.r.onnx_model.path).resolve()
        if not src.is_file():
            raise BuildError(f"onnx_model.path = {self.r.onnx_model.path!r}: {src} not found")
        path = self.work / "float.onnx"
        shutil.copy(src, path)
        check_single_file(path)
        try:
            ref = run_onnx(path, splits.eval.inputs, self.r.dataset.batch_size)
        except Exception as exc:
            raise BuildError(f"onnxruntime cannot run {src.name} on the eval split: {exc}") from exc
        missing = [n for n in self.out_names if n not in ref]
        if missing:
            raise BuildError(f"outputs = {self.out_names}: {src.name} has outputs {sorted(ref)}")
        ref = {n: ref[n] for n in self.out_names}
        self.reference = ref
        baseline = self._score(ref, splits)
        self.gates.set_baseline(baseline)
        self._row("onnx float", "onnx", baseline, size_bytes=path.stat().st_size,
                  params=_onnx_params(path))  # fmt: skip
        self.candidates["onnx float"] = path
        return path

    # ------------------------------------------------------------------ INT8 + TFLite

    def quantize(self, float_path: Path, splits: Splits, teacher: Any = None,
                 model: Any = None) -> None:  # fmt: skip
        """Every INT8 method the recipe asks for (`mode`, then `extra_modes`), each its own
        candidate. A method that fails its gate is left out with a note while another
        passes (static INT8 may first be rescued by mixed precision); none passing
        fails the build with the first failure."""
        from export.pipeline.isa import detect_host, preset_for
        from export.pipeline.quantize import (
            PRESETS,
            QuantizeConfig,
            resolve_preset,
            settings_summary,
        )

        q = self.r.quantize
        t = time.monotonic()
        host = detect_host()
        preset, why = resolve_preset(q.preset, host)
        target = PRESETS[preset].target if preset in PRESETS else ""
        host_preset = preset_for(host)[0]
        self.report["isa"] = {
            "build_host": host.to_json(), "preset": preset, "preset_reason": why,
            "preset_target": target,
            "note": "every latency and INT8 accuracy figure in this report was measured on "
                    f"the build host ({host.label})",
        }  # fmt: skip
        if preset not in ("none", host_preset):
            self.notes.append(
                f"quantize.preset {preset!r} targets {target}, but this build host is "
                f"{host.label} (its preset: {host_preset!r}): INT8 accuracy and latency here "
                "are the build host's, not the target's; the device measures its own"
            )
        try:
            cfg = QuantizeConfig(
                mode="static", preset=preset, calibration_method=q.calibration_method,
                per_channel=q.per_channel, engine=q.engine, operators=tuple(q.operators),
                batch_size=min(self.r.dataset.batch_size, 64),
            )  # fmt: skip
        except ValueError as exc:
            raise BuildError(f"quantize: {exc}") from exc
        main = replace(cfg, mode="dynamic" if q.mode == "dynamic" else "static")
        self.report["quantize"] = {**settings_summary(main, q.operators), "mode": q.mode,
                                   "modes": [q.mode, *q.extra_modes],
                                   "mixed_precision": q.mixed_precision}  # fmt: skip
        failures: list[GateError] = []
        passed_any = False
        for i, mode in enumerate([q.mode, *q.extra_modes]):
            stage = "onnx int8" if i == 0 else f"onnx int8 {mode}"
            try:
                ok = self._int8(stage, mode, replace(cfg, mode=mode if mode != "qat" else "static"),
                                float_path, splits, teacher, model)  # fmt: skip
            except GateError as exc:
                failures.append(exc)
                ok = False
            passed_any = passed_any or ok
        self._timed("quantize", t)
        if not passed_any:
            raise failures[0]
        for failed in failures:
            self.notes.append(f"left out ({failed.stage}): {failed}")

    def _int8(self, stage: str, mode: str, cfg: Any, float_path: Path, splits: Splits,
              teacher: Any, model: Any) -> bool:  # fmt: skip
        """Build, score and gate one INT8 method; True if a candidate came out of it."""
        from export.pipeline.quantize import check_int8, quantize_onnx
        from export.pipeline.runners import run_onnx

        q = self.r.quantize
        calibration = self._calibration(splits)
        path = self.work / f"{stage.replace(' ', '-')}.onnx"
        extra: dict[str, Any] = {"method": mode}
        if mode == "qat":
            from export.pipeline.qat import QatConfig, train_and_export

            if model is None or teacher is None:  # pragma: no cover - the recipe check
                raise BuildError("quantize: 'qat' needs the torch model")
            qcfg = QatConfig(epochs=q.qat_epochs, lr=q.qat_lr, percentile=q.qat_percentile,
                             symmetric_activations=cfg.settings.activation_symmetric)  # fmt: skip
            path, info = train_and_export(model, teacher, splits, self.r, qcfg, path)
            self.report.setdefault("qat", {})[stage] = info
        else:
            quantize_onnx(float_path, path, cfg, calibration)
        ops = check_int8(path, stage)
        metric = self._score(run_onnx(path, splits.eval.inputs, self.r.dataset.batch_size), splits)
        self._row(stage, "onnx", metric, size_bytes=path.stat().st_size, int8_ops=ops, **extra)
        result = self.gates.check(stage, metric, soft=True)
        if result.passed:
            self.candidates[stage] = path
            return True
        if mode == "static" and q.mixed_precision:
            if self._mixed(stage, cfg, float_path, splits):
                self.notes.append(f"{stage}: {result.detail}; mixed precision passed instead")
                return True
            try:
                self.gates.raise_for(result)
            except GateError as exc:  # says why mixed precision did not rescue it either
                raise GateError(exc.gate, exc.stage, exc.value, exc.limit,
                                f"{exc}; {self.notes[-1]}") from None  # fmt: skip
        self.gates.raise_for(result)
        return False  # pragma: no cover - raise_for raised

    def _mixed(self, stage: str, cfg: Any, float_path: Path, splits: Splits) -> bool:
        from export.pipeline.mixed import ENDED_LATENCY, search
        from export.pipeline.quantize import check_int8
        from export.pipeline.runners import run_onnx

        bs = self.r.dataset.batch_size
        mixed_stage = f"{stage} mixed"
        path = self.work / f"{mixed_stage.replace(' ', '-')}.onnx"

        def evaluate(model_path: Path) -> tuple[float, bool]:
            metric = self._score(run_onnx(model_path, splits.eval.inputs, bs), splits)
            return metric, self.gates.would_pass(metric)

        # Each step timed as measure() times the candidates (same inputs, threads, runs).
        golden = {k: v[:GOLDEN_ROWS] for k, v in splits.eval.inputs.items()}
        runs = self.opts.runs or self.r.select.runs

        def latency(model_path: Path) -> float:
            from export.measure import measure_latency

            ins, outs = self._specs(model_path)
            p50: float = measure_latency(model_path, "onnxruntime", golden, ins, outs,
                                         threads=self.threads, runs=runs)["p50"]  # fmt: skip
            return p50

        q = self.r.quantize
        result = search(float_path, path, cfg, self._calibration(splits),
                        lambda m, split: run_onnx(m, split.inputs, bs), evaluate,
                        q.mixed_max_float, latency, q.mixed_min_speedup)  # fmt: skip
        self.report["mixed_precision"] = result.to_json()
        if not result.passed or result.path is None:
            if result.ended == ENDED_LATENCY:
                last = result.steps[-1]
                why = (f"the latency gain was gone with {len(last['kept_float'])} node(s) "
                       f"float ({last['latency_ms']:.4g} ms p50 against the float model's "
                       f"{result.float_latency_ms:.4g} ms: {last['speedup']:.3g}x, below "
                       f"quantize.mixed_min_speedup = {q.mixed_min_speedup:g})")  # fmt: skip
            else:
                why = (f"no mix passed the gate with up to "
                       f"{int(q.mixed_max_float * result.quantizable)} of "
                       f"{result.quantizable} nodes in float (quantize.mixed_max_float)")  # fmt: skip
            self.notes.append(f"mixed precision: {why}")
            return False
        ops = check_int8(path, mixed_stage)
        metric = result.steps[-1]["metric"]
        self._row(mixed_stage, "onnx", metric, size_bytes=path.stat().st_size, int8_ops=ops,
                  method="mixed", kept_float=result.kept_float)  # fmt: skip
        self.gates.check(mixed_stage, metric)
        self.candidates[mixed_stage] = path
        return True

    def _calibration(self, splits: Splits) -> Split:
        n = self.r.dataset.calibration_samples
        return splits.calibration.take(n) if n else splits.calibration

    def tflite(self, model: Any, splits: Splits, teacher: Any = None) -> None:
        from export.pipeline.runners import run_tflite
        from export.pipeline.tflite import convert_float, convert_int8

        tf = self.r.tflite
        t = time.monotonic()
        outs = self.out_names
        if tf.float:
            path = convert_float(model, splits.eval, self.in_names, self.work / "float.tflite",
                                 tf.batch)  # fmt: skip
            got = run_tflite(path, splits.eval.inputs, self.in_names, outs)
            from export.pipeline.torchrun import predict

            ref = predict(model, splits.eval, self.in_names, outs, self.r.dataset.batch_size)
            diffs = {n: float(np.max(np.abs(got[n] - ref[n]))) for n in outs}
            self.gates.record_parity("tflite float", diffs, tf.float_atol)
            if max(diffs.values()) > tf.float_atol:
                raise ParityError("tflite float", diffs, tf.float_atol)
            metric = self._score(got, splits)
            self._row("tflite float", "tflite", metric, size_bytes=path.stat().st_size,
                      parity_max_abs_diff=diffs)  # fmt: skip
            self.candidates["tflite float"] = path
            self.gates.check("tflite float", metric)
        # Post-training INT8, then QAT: like the ONNX methods, one that comes out
        # degenerate or fails its gate is left out with a note while another TFLite
        # candidate (float or QAT) passes; none passing fails the build with it.
        failure: BuildError | None = None
        if tf.int8:
            try:
                path = convert_int8(model, self._calibration(splits), self.in_names,
                                    self.work / "int8.tflite", tf.batch, tf.per_channel)  # fmt: skip
                got = run_tflite(path, splits.eval.inputs, self.in_names, outs)
                metric = self._score(got, splits)
                self._row("tflite int8", "tflite", metric, size_bytes=path.stat().st_size)
                result = self.gates.check("tflite int8", metric, soft=True)
                if result.passed:
                    self.candidates["tflite int8"] = path
                else:
                    self.gates.raise_for(result)
            except (CalibrationError, ExportFailedError, GateError) as exc:
                failure = exc
        q = self.r.quantize
        if tf.int8 and "qat" in (q.mode, *q.extra_modes) and teacher is not None:
            self._tflite_qat(model, teacher, splits)
        if failure is not None:
            others = [c for c in ("tflite float", "tflite int8 qat") if c in self.candidates]
            if not others:
                raise failure
            self.notes.append(f"left out (tflite int8): {failure}; {' and '.join(others)} "
                              "passed")  # fmt: skip
        self._timed("tflite", t)

    def _tflite_qat(self, model: Any, teacher: Any, splits: Splits) -> bool:
        """TFLite INT8 by QAT: its own candidate (True); left out with a note if it comes
        out degenerate or fails its gate."""
        from export.pipeline.runners import run_tflite
        from export.pipeline.tflite import convert_int8_qat

        stage = "tflite int8 qat"
        try:
            path = convert_int8_qat(model, teacher, splits, self.r, self.work / "int8-qat.tflite")
        except (CalibrationError, ExportFailedError) as exc:  # degenerate or not int8
            self.notes.append(f"left out ({stage}): {exc}")
            return False
        got = run_tflite(path, splits.eval.inputs, self.in_names, self.out_names)
        metric = self._score(got, splits)
        self._row(stage, "tflite", metric, size_bytes=path.stat().st_size, method="qat")
        result = self.gates.check(stage, metric, soft=True)
        if result.passed:
            self.candidates[stage] = path
            return True
        self.notes.append(f"left out ({stage}): {result.detail}")
        return False

    # ------------------------------------------------------------------ latency + selection

    def measure(self, golden: dict[str, np.ndarray]) -> None:
        from agent.runtimes import runtime_for_format
        from export.measure import measure_latency

        runs = self.opts.runs or self.r.select.runs
        t = time.monotonic()
        for row in self.stages:
            path = self.candidates.get(row["stage"]) or (
                Path(row["measure"]) if row.get("measure") else None
            )
            if path is None:
                continue
            runtime = runtime_for_format(path.suffix.lstrip("."))  # agent/runtimes registry
            # The recipe's batch is on axis 0; TFLite's is frozen by the converter: one case a run.
            specs = self._specs(path)
            row["runtime"] = runtime
            row["latency_ms"] = measure_latency(path, runtime, golden, specs[0], specs[1],
                                                threads=self.threads, runs=runs)  # fmt: skip
            row.pop("measure", None)
        self._timed("latency", t)

    def select(self) -> dict[str, str]:
        by_stage = {row["stage"]: row for row in self.stages}
        chosen: dict[str, str] = {}
        for fmt in ("onnx", "tflite"):
            floats, int8s = f"{fmt} float", f"{fmt} int8"
            prefer = (self.opts.prefer or {}).get(fmt, self.r.select.prefer)
            have = [s for s in (floats, int8s) if s in self.candidates]
            if not have:
                continue
            lat = {s: by_stage[s]["latency_ms"]["p50"] for s in have}
            if floats in lat and int8s in lat and lat[int8s] >= lat[floats]:
                runtime = by_stage[int8s]["runtime"]
                self.notes.append(
                    f"{fmt}: INT8 is not faster than float on this machine with {runtime} "
                    f"({lat[int8s]:.3f} ms vs {lat[floats]:.3f} ms p50, batch 1); "
                    f"select.prefer = {prefer!r} decides"
                )
            if prefer == "fastest":
                pick = min(have, key=lambda s: lat[s])
            elif prefer == "int8":
                pick = int8s if int8s in have else floats
            else:
                pick = floats if floats in have else int8s
            chosen[fmt] = pick
        return chosen

    # ------------------------------------------------------------------ run

    def run(self) -> BuildResult:
        r = self.r
        t0 = time.monotonic()
        splits = load_splits(r)
        self._fail_early(splits)
        if r.byo:
            float_path = self.byo_onnx(splits)
            teacher = model = None
        else:
            teacher, model = self.torch_stages(splits)
            float_path = self.export_onnx(teacher, model, splits)
        if r.quantize.enabled:
            self.quantize(float_path, splits, None if r.byo else teacher,
                          None if r.byo else model)  # fmt: skip
        if r.tflite_on and not self.opts.skip_tflite:
            self.tflite(model, splits, teacher)
        golden = {k: v[:GOLDEN_ROWS] for k, v in splits.eval.inputs.items()}
        self.measure(golden)
        chosen = self.select()
        rule = self.golden_gate(chosen, golden)
        self.report.update({
            "name": r.name, "version": r.version, "task": r.task, "metric": self.gates.metric,
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "threads": self.threads, "prefer": r.select.prefer, "selected": chosen,
            "stages": self.stages, "gates": [g.to_json() for g in self.gates.results],
            "notes": self.notes, "timings_s": self.timings,
            "dataset": {"train": len(splits.train), "calibration": len(splits.calibration),
                        "eval": len(splits.eval)},
        })  # fmt: skip
        self._ratios()
        if r.select.bundle == "all":
            self.report["variants"] = [
                {"id": v.id, "stage": stage, "precision": v.precision, "method": v.method,
                 "built_for": v.built_for} for stage, v in self._variants(chosen)
            ]  # fmt: skip
        reports = write_reports(self.report, self.work / "report")
        recipe_copy = self.work / "report" / "recipe.toml"
        shutil.copy(self.recipe_path, recipe_copy)
        bundle = self._package(chosen, golden, {**reports, "recipe.toml": recipe_copy}, rule)
        self.timings["total"] = round(time.monotonic() - t0, 2)
        return self._publish(bundle, reports, recipe_copy)

    def _fail_early(self, splits: Splits) -> None:
        r = self.r
        modes = {r.quantize.mode, *r.quantize.extra_modes}
        # Static INT8 calibrates; QAT starts its activation ranges from the same rows.
        needs_cal = (r.quantize.enabled and bool(modes & {"static", "qat"})) or (
            r.tflite_on and r.tflite.int8 and not self.opts.skip_tflite
        )
        if needs_cal and len(splits.calibration) == 0:
            which = (f"quantize modes {sorted(modes & {'static', 'qat'})}" if r.quantize.enabled
                     and modes & {"static", "qat"} else "tflite.int8 = true")  # fmt: skip
            raise CalibrationError(
                f"the calibration split is empty but {which} needs calibration data; add rows "
                "to the dataset's 'calibration' split (or turn INT8 off)"
            )

    def _ratios(self) -> None:
        """Size and latency of each candidate relative to the float teacher and student."""
        rows = {row["stage"]: row for row in self.stages}
        bases = {"teacher": rows.get("teacher onnx") or rows.get("onnx float"),
                 "float": rows.get("onnx float")}  # fmt: skip
        for row in self.stages:
            for name, base in bases.items():
                if not base or not row.get("latency_ms") or not base.get("latency_ms"):
                    continue
                row[f"latency_vs_{name}"] = round(
                    row["latency_ms"]["p50"] / base["latency_ms"]["p50"], 3)  # fmt: skip
                if row.get("size_bytes") and base.get("size_bytes"):
                    row[f"size_vs_{name}"] = round(row["size_bytes"] / base["size_bytes"], 3)

    def golden_gate(self, chosen: dict[str, str], golden: dict[str, np.ndarray]) -> Tolerance:
        """Derive the bundle's golden tolerance rule (export.golden_rule) and judge the
        golden cases, computed as each device family computes them, with it: the gate
        "golden" per format and family, the rule the device will apply."""
        from export.golden_rule import GoldenRuleError, check_rule, golden_rule

        models = {fmt: self.candidates[stage] for fmt, stage in chosen.items()}
        if not models:
            return Tolerance()
        specs = self._specs(models.get("onnx") or models["tflite"])
        classes = self.out_names[:1] if self.r.task == "classification" else []
        t = time.monotonic()
        try:
            rule, refs, replays = golden_rule(models, specs, golden, classes)
        except GoldenRuleError as exc:
            raise BuildError(f"golden rule: {exc}") from exc
        for fmt, replay, report in check_rule(rule, refs, replays):
            self.gates.record_golden(f"{fmt} {replay.family}", report)
        self.report["golden_tolerance"] = rule.to_json()
        self._timed("golden_rule", t)
        return rule

    def _specs(self, path: Path) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        from export.package import batch_on_axis_0, onnx_specs, tflite_specs

        if path.suffix != ".tflite":
            return onnx_specs(path)
        # TFLite renames tensors; the runtime matches by order, we feed by recipe name.
        ins, outs = (batch_on_axis_0(specs) for specs in tflite_specs(path))
        return (tuple(replace(s, name=n) for s, n in zip(ins, self.in_names, strict=True)),
                tuple(replace(s, name=n) for s, n in zip(outs, self.out_names, strict=True)))  # fmt: skip

    def _package(self, chosen: dict[str, str], golden: dict[str, np.ndarray],
                 extra_files: dict[str, Path], rule: Tolerance) -> Path:  # fmt: skip
        from export.package import PackageError, package_model

        rows = {row["stage"]: row for row in self.stages}
        onnx_path = self.candidates.get(chosen.get("onnx", ""))
        tflite_path = self.candidates.get(chosen.get("tflite", ""))
        quality = {fmt: rows[stage]["metric"] for fmt, stage in chosen.items()}
        figures = {
            "metric": self.gates.metric,
            self.gates.metric: quality,
            "teacher_" + self.gates.metric: self.gates.baseline,
            "selected": chosen,
            "params": next((rows[s].get("params") for s in ("pruned", "student", "teacher")
                            if s in rows and rows[s].get("params")), None),
        }  # fmt: skip
        stage_dir = self.work / "bundle"
        stage_dir.mkdir()
        variants = self._variants(chosen) if self.r.select.bundle == "all" else []
        try:
            return package_model(
                onnx_path=onnx_path, tflite_path=tflite_path, name=self.r.name,
                version=self.r.version, golden_inputs=golden, key_path=self.key,
                out_dir=stage_dir,
                extra_manifest={"figures": figures, "build": {"recipe": self.recipe_path.name,
                                                              "prefer": self.r.select.prefer}},
                extra_files=extra_files, labels=list(self.r.labels) or None,
                threads=self.threads, runs=self.opts.runs or self.r.select.runs,
                tolerance=rule, variants=[v for _, v in variants],
            )  # fmt: skip
        except PackageError as exc:
            raise BuildError(f"package: {exc}") from exc

    def _variants(self, chosen: dict[str, str]) -> list[tuple[str, Any]]:
        """Every candidate whose gates passed, as a bundle variant (DESIGN.md "Variants"):
        the device measures those its runtimes load and serves the fastest that passes."""
        from export.package import VariantSpec

        rows = {row["stage"]: row for row in self.stages}
        preset = self.report.get("isa", {}).get("preset")
        out: list[tuple[str, Any]] = []
        for stage, path in self.candidates.items():
            row = rows[stage]
            fmt = row["format"]
            if "int8" not in stage:
                precision, method, vid = "fp32", None, f"{fmt}-fp32"
            else:
                method = row.get("method") or ("static" if fmt == "tflite" else
                                               self.r.quantize.mode)  # fmt: skip
                precision = "mixed" if method == "mixed" else "int8"
                vid = f"{fmt}-int8-{method}"
            built_for = preset if fmt == "onnx" and precision != "fp32" else None
            extra = {"metric": {self.gates.metric: row["metric"]},
                     "kept_float": row["kept_float"]} if row.get("kept_float") else {
                     "metric": {self.gates.metric: row["metric"]}}  # fmt: skip
            out.append((stage, VariantSpec(vid, path, precision, method, built_for, extra=extra)))
        return out

    def _publish(self, bundle: Path, reports: dict[str, Path], recipe_copy: Path) -> BuildResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        stem = bundle.name.removesuffix(".edgebundle")
        for name, src in [*reports.items(), ("recipe.toml", recipe_copy)]:
            dst = self.out_dir / f"{stem}.{name}"
            os.replace(src, dst)
            files[name] = dst
        final = self.out_dir / bundle.name
        os.replace(bundle, final)  # last: the bundle appears only when all else is in place
        log.info("built %s", final)
        models: dict[str, Path] = {}
        if self.opts.keep_workdir:
            models = dict(self.candidates)
            if (self.work / "teacher.onnx").exists():
                models["teacher onnx"] = self.work / "teacher.onnx"
        return BuildResult(final, self.report, files, models)


def _onnx_params(path: Path) -> int:
    """Weights in an ONNX file (initializers), for models that arrive without torch."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return int(sum(int(np.prod(t.dims)) for t in graph.initializer))


def run_build(recipe_path: Path, out_dir: Path, key_path: Path | None = None,
              options: Options | None = None) -> BuildResult:  # fmt: skip
    from agent.signing import KeyFileError, load_private_key

    opts = options or Options()
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    if opts.version is not None:
        if not re.fullmatch(r"\d+\.\d+\.\d+", opts.version):
            raise BuildError(f"--version {opts.version!r} must be MAJOR.MINOR.PATCH, e.g. 1.0.0")
        recipe = replace(recipe, version=opts.version)
    key = Path(key_path) if key_path else DEMO_KEY
    try:
        load_private_key(key)
    except KeyFileError as exc:
        raise BuildError(f"signing key: {exc}") from exc
    if key == DEMO_KEY:
        log.warning("signing with the demo key %s: INSECURE, for demos and tests only", key)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".edgerun-build-", dir=out_dir))
    import torch

    threads = torch.get_num_threads()
    if recipe.torch_threads:
        torch.set_num_threads(recipe.torch_threads)
    try:
        return _Build(recipe, recipe_path, out_dir, key, opts, work).run()
    finally:
        torch.set_num_threads(threads)
        if opts.keep_workdir:
            log.info("kept work folder %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-export build",
                                description="Build a signed bundle from a recipe.")  # fmt: skip
    p.add_argument("recipe", type=Path, help="recipe TOML file")
    p.add_argument("--out", type=Path, required=True, help="folder for the bundle and report")
    p.add_argument(
        "--key",
        type=Path,
        default=None,
        help=f"ed25519 private key (default: the INSECURE demo key {DEMO_KEY.name})",
    )
    p.add_argument("--skip-tflite", action="store_true", help="build ONNX only")
    p.add_argument("--runs", type=int, help="latency runs per candidate (default: recipe)")
    p.add_argument("--threads", type=int, help="threads for latency (default: recipe)")
    p.add_argument("--keep-workdir", action="store_true", help="keep intermediate files")
    p.add_argument("--version", help="the bundle's version instead of the recipe's")
    p.add_argument("-v", "--verbose", action="store_true")
    return p  # fmt: skip


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    opts = Options(skip_tflite=args.skip_tflite, runs=args.runs, threads=args.threads,
                   keep_workdir=args.keep_workdir, version=args.version)  # fmt: skip
    try:
        result = run_build(args.recipe, args.out, args.key, opts)
    except (GateError, ParityError) as exc:
        print(f"error: [{exc.code}] {exc}", file=sys.stderr)
        return 3
    except BuildError as exc:
        print(f"error: [{exc.code}] {exc}", file=sys.stderr)
        return 2
    print(result.bundle)
    return 0

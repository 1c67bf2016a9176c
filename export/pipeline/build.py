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
from export.pipeline.errors import BuildError, CalibrationError, GateError, ParityError
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

    def quantize(self, float_path: Path, splits: Splits) -> None:
        from export.pipeline.quantize import (
            QuantizeConfig,
            check_int8,
            quantize_onnx,
            settings_summary,
        )
        from export.pipeline.runners import run_onnx

        q = self.r.quantize
        t = time.monotonic()
        try:
            cfg = QuantizeConfig(
                mode=q.mode, preset=q.preset, calibration_method=q.calibration_method,
                per_channel=q.per_channel, engine=q.engine, operators=tuple(q.operators),
                batch_size=min(self.r.dataset.batch_size, 64),
            )  # fmt: skip
        except ValueError as exc:
            raise BuildError(f"quantize: {exc}") from exc
        calibration = self._calibration(splits)
        path = quantize_onnx(float_path, self.work / "int8.onnx", cfg, calibration)
        ops = check_int8(path, "onnx int8")
        self.report["quantize"] = settings_summary(cfg, q.operators)
        metric = self._score(run_onnx(path, splits.eval.inputs, self.r.dataset.batch_size), splits)
        self._row("onnx int8", "onnx", metric, size_bytes=path.stat().st_size, int8_ops=ops)
        self.candidates["onnx int8"] = path
        self._timed("quantize", t)
        self.gates.check("onnx int8", metric)

    def _calibration(self, splits: Splits) -> Split:
        n = self.r.dataset.calibration_samples
        return splits.calibration.take(n) if n else splits.calibration

    def tflite(self, model: Any, splits: Splits) -> None:
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
        if tf.int8:
            path = convert_int8(model, self._calibration(splits), self.in_names,
                                self.work / "int8.tflite", tf.batch, tf.per_channel)  # fmt: skip
            metric = self._score(run_tflite(path, splits.eval.inputs, self.in_names, outs), splits)
            self._row("tflite int8", "tflite", metric, size_bytes=path.stat().st_size)
            self.candidates["tflite int8"] = path
            self.gates.check("tflite int8", metric)
        self._timed("tflite", t)

    # ------------------------------------------------------------------ latency + selection

    def measure(self, golden: dict[str, np.ndarray]) -> None:
        from agent.runtimes import runtime_for_format
        from export.measure import measure_latency
        from export.package import batch_on_axis_0, onnx_specs, tflite_specs

        runs = self.opts.runs or self.r.select.runs
        t = time.monotonic()
        for row in self.stages:
            path = self.candidates.get(row["stage"]) or (
                Path(row["measure"]) if row.get("measure") else None
            )
            if path is None:
                continue
            runtime = runtime_for_format(path.suffix.lstrip("."))  # agent/runtimes registry
            if path.suffix == ".tflite":
                # TFLite renames tensors; the runtime matches by order, we feed by recipe name.
                # The recipe's batch is on axis 0, frozen by the converter: one case a run.
                ins, outs = (batch_on_axis_0(specs) for specs in tflite_specs(path))
                specs = (tuple(replace(s, name=n) for s, n in zip(ins, self.in_names, strict=True)),
                         tuple(replace(s, name=n) for s, n in zip(outs, self.out_names,
                                                                  strict=True)))  # fmt: skip
            else:
                specs = onnx_specs(path)
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
            model = None
        else:
            teacher, model = self.torch_stages(splits)
            float_path = self.export_onnx(teacher, model, splits)
        if r.quantize.enabled:
            self.quantize(float_path, splits)
        if r.tflite_on and not self.opts.skip_tflite:
            self.tflite(model, splits)
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
        reports = write_reports(self.report, self.work / "report")
        recipe_copy = self.work / "report" / "recipe.toml"
        shutil.copy(self.recipe_path, recipe_copy)
        bundle = self._package(chosen, golden, {**reports, "recipe.toml": recipe_copy}, rule)
        self.timings["total"] = round(time.monotonic() - t0, 2)
        return self._publish(bundle, reports, recipe_copy)

    def _fail_early(self, splits: Splits) -> None:
        r = self.r
        needs_cal = (r.quantize.enabled and r.quantize.mode == "static") or (
            r.tflite_on and r.tflite.int8 and not self.opts.skip_tflite
        )
        if needs_cal and len(splits.calibration) == 0:
            which = "quantize.mode = 'static'" if r.quantize.enabled else "tflite.int8 = true"
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
        try:
            return package_model(
                onnx_path=onnx_path, tflite_path=tflite_path, name=self.r.name,
                version=self.r.version, golden_inputs=golden, key_path=self.key,
                out_dir=stage_dir,
                extra_manifest={"figures": figures, "build": {"recipe": self.recipe_path.name,
                                                              "prefer": self.r.select.prefer}},
                extra_files=extra_files, labels=list(self.r.labels) or None,
                threads=self.threads, runs=self.opts.runs or self.r.select.runs,
                tolerance=rule,
            )  # fmt: skip
        except PackageError as exc:
            raise BuildError(f"package: {exc}") from exc

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

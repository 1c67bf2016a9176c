"""Choose the variant a device serves, by measuring the candidates on the device itself.

The build machine's idea of "the fastest" belongs to its instruction set; the device's
may differ (INT8 is fast with VNNI or dot-product, slow or even inaccurate without).
So at validation (start-up install and over-the-air deploy both come through
`Admission.open`) every variant a runtime here can load is opened in turn under the
memory cap, golden-replayed with its own outputs and tolerance, timed at the probe
batch, and closed before the next one opens: beside the served model at most one
candidate is ever resident. The fastest that passes serves (ties: the smaller
footprint). The choice is cached (agent.variants.cache) by bundle, runtimes and
hardware, so a restart opens only the chosen variant (still fully validated).

A bundle without `variants` keeps the old rule (the first runtime of
`model.preference` that reads one of its formats) and is not measured; so is a
variant pinned by `model.variant`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent.bundle import BundleError, Manifest, Variant
from agent.config.model import AgentConfig, ModelConfig
from agent.events import Emit
from agent.memory import MB, AdmissionError, MemoryBudget, current_rss, release_free_memory
from agent.protocol.events import EventKind
from agent.runtimes import REGISTRY, choose_runtime
from agent.runtimes.base import InferenceError, ModelLoadError, RuntimeUnavailableError
from agent.serving import LoadedModel
from agent.variants.cache import ChoiceCache, cache_key
from agent.variants.errors import NoVariantPassedError, VariantMissingError
from agent.variants.fingerprint import hardware, runtime_identity
from agent.variants.latency import ProbeInputs, median_ms
from agent.variants.report import (
    FAILED,
    PASSED,
    SERVED,
    SKIPPED,
    Candidate,
    Selection,
    VariantResult,
)

log = logging.getLogger(__name__)

# What opening one candidate may raise: it rejects that candidate, not the choice.
_CANDIDATE_REFUSALS = (
    BundleError,
    AdmissionError,
    ModelLoadError,
    RuntimeUnavailableError,
    InferenceError,
)


class VariantOpener(Protocol):
    """Admission's one-variant path: load, measure memory, replay golden; not served yet."""

    def open_variant(
        self, directory: Path, sha256: str, manifest: Manifest, candidate: Candidate
    ) -> LoadedModel: ...


def _runtime_for(variant: Variant, model: ModelConfig) -> tuple[str | None, str]:
    """The first configured runtime here that reads the variant's format, or why none does."""
    names = list(model.preference) if model.runtime == "auto" else [model.runtime]
    reasons = []
    for name in names:
        cls = REGISTRY.get(name)
        if cls is None or cls.format != variant.format:
            continue
        why = cls.unavailable_reason()
        if why is None:
            return name, ""
        reasons.append(f"{name}: {why}")
    if not reasons:
        key = "model.preference" if model.runtime == "auto" else "model.runtime"
        return None, f"no runtime in {key} ({', '.join(names)}) reads {variant.format}"
    return None, "; ".join(reasons)


def plan(
    manifest: Manifest, model: ModelConfig
) -> tuple[list[Candidate], list[VariantResult], str]:
    """The candidates to measure, the variants skipped (with why), and the reason when
    only one candidate is possible. Raises when nothing can be served."""
    legacy = all(v.legacy for v in manifest.variants)
    if model.variant != "auto":
        pinned = manifest.variant(model.variant)
        if pinned is None:
            raise VariantMissingError(
                f"model.variant pins {model.variant!r}, which {manifest.name} "
                f"{manifest.version} does not carry (it has "
                f"{', '.join(v.id for v in manifest.variants)}); set model.variant to one of "
                'those or to "auto"'
            )
        runtime, why = _runtime_for(pinned, model)
        if runtime is None:
            raise RuntimeUnavailableError(
                f"model.variant pins {pinned.id!r} ({pinned.format}), which no runtime here "
                f"can load: {why}"
            )
        skipped = [
            VariantResult.of(v, SKIPPED, f"model.variant pins {pinned.id}")
            for v in manifest.variants
            if v is not pinned
        ]
        return [Candidate(pinned, runtime)], skipped, "pinned by model.variant"
    if legacy:
        runtime = choose_runtime(manifest, model.runtime, list(model.preference))
        fmt = REGISTRY[runtime].format
        chosen = next(v for v in manifest.variants if v.format == fmt)
        skipped = [
            VariantResult.of(v, SKIPPED, f"the bundle has no variants: {runtime} serves {fmt}")
            for v in manifest.variants
            if v is not chosen
        ]
        reason = f"the bundle has no variants; {runtime} is the first of model.preference for it"
        return [Candidate(chosen, runtime)], skipped, reason
    candidates: list[Candidate] = []
    skipped = []
    for variant in manifest.variants:
        runtime, why = _runtime_for(variant, model)
        if runtime is None:
            skipped.append(VariantResult.of(variant, SKIPPED, why))
        else:
            candidates.append(Candidate(variant, runtime))
    if not candidates:
        raise RuntimeUnavailableError(
            f"no runtime here can load any variant of {manifest.name} {manifest.version}: "
            + "; ".join(f"{r.id}: {r.reason}" for r in skipped)
        )
    return candidates, skipped, "the only variant a runtime here can load"


def probe_batch(config: AgentConfig, manifest: Manifest) -> int:
    """Rows of the latency probe: model.variant_batch, else the micro-batch, else 1."""
    if not any(s.batch_axis is not None for s in manifest.inputs):
        return 1
    rows = config.model.variant_batch
    if rows == 0:
        rows = config.batching.max_batch if config.batching.enabled else 1
    return max(1, min(rows, config.api.max_batch_size))


def _fit_rows(model: LoadedModel, rows: int, budget: MemoryBudget, one_row_bytes: int) -> int:
    """Fewer rows when the probe would not fit in the headroom under the soft limit."""
    footprint = model.footprint
    if footprint is None:
        return rows
    headroom = int(budget.soft_limit_bytes) - current_rss()
    while rows > 1 and footprint.request_bytes(rows * one_row_bytes) > headroom:
        rows //= 2
    return rows


def _failure(candidate: Candidate, exc: BaseException) -> VariantResult:
    code = str(getattr(exc, "code", type(exc).__name__))
    return VariantResult.of(
        candidate.variant, FAILED, str(exc), runtime=candidate.runtime, code=code
    )


class VariantSelector:
    """Owner of the variant choice and its cache. `hardware` and `runtime_identity` are
    attributes so a test can present another machine or library version."""

    def __init__(self, cache: ChoiceCache, emit: Emit, opener: VariantOpener) -> None:
        self.cache = cache
        self.emit = emit
        self.opener = opener
        self.hardware: Callable[[], dict[str, Any]] = hardware
        self.runtime_identity: Callable[[str, Any], dict[str, Any]] = runtime_identity

    def choose(
        self,
        config: AgentConfig,
        budget: MemoryBudget,
        directory: Path,
        sha256: str,
        manifest: Manifest,
    ) -> LoadedModel:
        """Open the variant that should serve (validated, not swapped in); raises one of
        the admission refusals when none can."""
        candidates, skipped, single = plan(manifest, config.model)
        if len(candidates) == 1:
            candidate = candidates[0]
            model = self.opener.open_variant(directory, sha256, manifest, candidate)
            result = self._passed(candidate, model, None, SERVED, single)
            model.selection = Selection(
                candidate.variant.id, candidate.runtime, single, 0, False, [result, *skipped]
            )
            return model
        batch = probe_batch(config, manifest)
        identities = [
            self.runtime_identity(name, config.runtimes)
            for name in sorted({c.runtime for c in candidates})
        ]
        key_doc = {
            "bundle": sha256,
            "candidates": [[c.variant.id, c.runtime] for c in candidates],
            "runtimes": identities,
            "hardware": self.hardware(),
            "batch": batch,
        }
        cacheable = all(r.get("version") is not None for r in identities)
        key = cache_key(key_doc)
        if cacheable:
            cached = self._from_cache(key, candidates, directory, sha256, manifest)
            if cached is not None:
                return cached
        return self._measure_all(
            candidates,
            skipped,
            batch,
            budget,
            directory,
            sha256,
            manifest,
            key if cacheable else None,
        )

    # ------------------------------------------------------------------ cache

    def _from_cache(
        self,
        key: str,
        candidates: list[Candidate],
        directory: Path,
        sha256: str,
        manifest: Manifest,
    ) -> LoadedModel | None:
        record = self.cache.get(key)
        if record is None:
            return None
        candidate = next((c for c in candidates if c.variant.id == record["chosen"]), None)
        results = [VariantResult.from_json(r) for r in record["results"]]
        if candidate is None or any(r is None for r in results):
            log.warning("cached variant choice for %s does not fit the bundle; measuring", sha256)
            return None
        try:
            model = self.opener.open_variant(directory, sha256, manifest, candidate)
        except _CANDIDATE_REFUSALS as exc:
            # Something changed that the key does not see (memory now taken by others):
            # judge every variant afresh rather than refuse the bundle.
            log.warning(
                "cached variant %s fails now (%s); measuring again", candidate.variant.id, exc
            )
            self.cache.forget(key)
            return None
        reason = str(record.get("reason", ""))
        selection = Selection(
            candidate.variant.id,
            candidate.runtime,
            reason,
            int(record.get("batch", 0)),
            True,
            [r for r in results if r is not None],
        )
        model.selection = selection
        self._report(manifest, selection)
        return model

    # ------------------------------------------------------------------ measuring

    def _measure_all(
        self,
        candidates: list[Candidate],
        skipped: list[VariantResult],
        batch: int,
        budget: MemoryBudget,
        directory: Path,
        sha256: str,
        manifest: Manifest,
        key: str | None,
    ) -> LoadedModel:
        results: list[VariantResult] = []
        errors: list[BaseException] = []
        kept: LoadedModel | None = None  # the last candidate, left open if it wins
        probe = ProbeInputs(manifest, directory)  # read once, shared by the candidates
        one_row = probe.row_bytes()
        for i, candidate in enumerate(candidates):
            log.info(
                "measuring variant %s (%s) of %s %s",
                candidate.variant.id,
                candidate.runtime,
                manifest.name,
                manifest.version,
            )
            try:
                model = self.opener.open_variant(directory, sha256, manifest, candidate)
            except _CANDIDATE_REFUSALS as exc:
                results.append(_failure(candidate, exc))
                errors.append(exc)
                continue
            try:
                rows = _fit_rows(model, batch, budget, one_row)
                p50 = median_ms(model.runtime, probe.feeds(rows))
            except InferenceError as exc:
                model.runtime.close()
                results.append(_failure(candidate, exc))
                errors.append(exc)
                continue
            results.append(
                self._passed(candidate, model, p50, PASSED, f"p50 at batch {rows}", rows)
            )
            if i == len(candidates) - 1:
                kept = model
            else:
                model.runtime.close()
                release_free_memory()
        passed = [r for r in results if r.status == PASSED]
        if not passed:
            if kept is not None:  # pragma: no cover - a kept model passed
                kept.runtime.close()
            self._refuse(manifest, results + skipped, errors)
        best = min(passed, key=lambda r: (r.p50_ms or 0.0, r.peak_mb or 0.0))
        best.status = SERVED
        others = [r for r in passed if r is not best]
        reason = f"fastest of {len(passed)} that passed here: p50 {best.p50_ms:.3f} ms"
        if others:
            runner = min(others, key=lambda r: r.p50_ms or 0.0)
            reason += f" (next: {runner.id} {runner.p50_ms:.3f} ms)"
        failed = [r for r in results if r.status == FAILED]
        if failed:
            reason += f"; {len(failed)} failed: {', '.join(r.id for r in failed)}"
        winner = next(c for c in candidates if c.variant.id == best.id)
        if kept is not None and candidates[-1] is winner:
            model = kept
        else:
            if kept is not None:
                kept.runtime.close()
                release_free_memory()
            model = self.opener.open_variant(directory, sha256, manifest, winner)
        selection = Selection(best.id, winner.runtime, reason, batch, False, results + skipped)
        model.selection = selection
        if key is not None:
            self.cache.put(
                key,
                {
                    "chosen": selection.chosen,
                    "runtime": selection.runtime,
                    "reason": selection.reason,
                    "batch": selection.batch,
                    "results": [r.to_json() for r in selection.results],
                    "measured_at": time.time(),
                },
            )
        self._report(manifest, selection)
        return model

    def _passed(
        self,
        candidate: Candidate,
        model: LoadedModel,
        p50: float | None,
        status: str,
        reason: str,
        rows: int = 1,
    ) -> VariantResult:
        footprint = model.footprint
        peak = None if footprint is None else round(footprint.peak_bytes(rows) / MB, 2)
        diffs = [d for d in model.golden_diffs.values() if not math.isnan(d)]
        return VariantResult.of(
            candidate.variant,
            status,
            reason,
            runtime=candidate.runtime,
            p50_ms=None if p50 is None else round(p50, 4),
            peak_mb=peak,
            golden_max_diff=max(diffs, default=None),
        )

    def _refuse(
        self, manifest: Manifest, results: list[VariantResult], errors: list[BaseException]
    ) -> None:
        if errors and all(isinstance(e, AdmissionError) for e in errors):
            raise errors[0]  # its figures decide whether a cold swap would fit
        failures = {r.id: r.reason for r in results if r.status == FAILED}
        raise NoVariantPassedError(
            f"no variant of {manifest.name} {manifest.version} passed on this device: "
            + "; ".join(
                f"{r.id} ({r.runtime}): {r.code}: {r.reason}" for r in results if r.status == FAILED
            ),
            failures,
        )

    def _report(self, manifest: Manifest, selection: Selection) -> None:
        self.emit(
            EventKind.VARIANT_SELECTED,
            f"{manifest.name} {manifest.version}: serving variant {selection.chosen} "
            f"({selection.reason})",
            variant=selection.chosen,
            runtime=selection.runtime,
            cached=selection.cached,
            measured=0 if selection.cached else selection.measured,
            batch=selection.batch,
            version=manifest.version,
            variants=[r.to_json() for r in selection.results],
        )


__all__ = ["VariantOpener", "VariantSelector", "plan", "probe_batch"]

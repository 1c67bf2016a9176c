"""Take a bundle from file to served model, or refuse it and keep what is served.

verify + unpack -> version rule -> memory admission -> runtime -> golden replay
-> swap -> links. Any refusal raises with its own error and message, emits an
event, removes what was unpacked, and leaves the current model serving.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.accelerator import (
    device_meter,
    judge_device,
    load_context,
    prune_caches,
    report_notices,
)
from agent.bundle import BundleError, Limits, Manifest, VersionNotNewerError
from agent.config.model import AgentConfig
from agent.events import EventBus
from agent.footprint import Footprint, PeakMeter, golden_rows, golden_shapes, measure
from agent.golden import check_golden
from agent.memory import (
    MB,
    AdmissionError,
    MemoryBudget,
    admit,
    current_rss,
    release_free_memory,
)
from agent.protocol.events import EventKind
from agent.runtimes import load_runtime
from agent.runtimes.base import InferenceError, ModelLoadError, Runtime, RuntimeUnavailableError
from agent.serving import LoadedModel, ModelHost, SwapTimeoutError
from agent.store import Store
from agent.variants.cache import ChoiceCache
from agent.variants.report import Candidate
from agent.variants.select import VariantSelector
from agent.version import compare_versions

log = logging.getLogger(__name__)

# Everything a refused bundle can raise; callers catch this tuple.
REFUSALS = (
    BundleError,
    AdmissionError,
    ModelLoadError,
    RuntimeUnavailableError,
    SwapTimeoutError,
)


def limits_from(config: AgentConfig) -> Limits:
    mb = 1024 * 1024
    bl = config.bundle_limits
    return Limits(
        max_bundle_bytes=bl.max_bundle_mb * mb,
        max_member_bytes=bl.max_member_mb * mb,
        max_members=bl.max_members,
    )


class Admission:
    def __init__(
        self,
        config: AgentConfig,
        store: Store,
        host: ModelHost,
        budget: MemoryBudget,
        keys: list[Ed25519PublicKey],
        events: EventBus,
    ) -> None:
        self.config = config
        self.store = store
        self.host = host
        self.budget = budget
        self.keys = keys
        self.events = events
        host.reopen = self.reopen
        self.selector = VariantSelector(ChoiceCache(store.root), events.emit, self)

    def open(self, directory: Path, sha256: str, manifest: Manifest | None = None) -> LoadedModel:
        """Load an unpacked bundle's variant that should serve (agent.variants: each
        candidate measured in turn on this device, or the cached choice), validated;
        do not serve it yet. The outgoing model stays loaded until the swap, so it
        counts against the cap in every check."""
        manifest = manifest or self.store.manifest(directory)
        return self.selector.choose(self.config, self.budget, directory, sha256, manifest)

    def open_variant(
        self, directory: Path, sha256: str, manifest: Manifest, candidate: Candidate
    ) -> LoadedModel:
        """One variant in one runtime: memory claim, load, measured footprint, golden
        replay with the variant's own outputs and tolerance."""
        variant, runtime_name = candidate.variant, candidate.runtime
        label = f"{manifest.name} {manifest.version}"
        if not variant.legacy:
            label += f" variant {variant.id}"
        peak = variant.peak_memory_mb.get(runtime_name, manifest.peak_memory_mb.get(runtime_name))
        # GPU memory is read around the load too (agent.accelerator: none on a CPU).
        device = device_meter(self.config, runtime_name)
        meter = PeakMeter()
        base = meter.reset()
        # The claim first: what says it will not fit is not even loaded.
        admit(label, peak, self.budget, base)
        context = load_context(self.config, self.budget, sha256, variant.precision, device.memory)
        runtime = load_runtime(
            runtime_name,
            manifest,
            directory,
            self.config.runtimes,
            model_file=variant.file,
            context=context,
        )
        try:
            load_peak = meter.peak()
            validate = self.config.model.validate_golden
            golden = manifest.golden_inputs
            shapes = golden_shapes(directory / golden) if golden is not None else {}
            footprint = self._measure(runtime, manifest, meter, base, load_peak, shapes)
            footprint, _ = judge_device(label, runtime, device, self.config, footprint)
            if footprint is not None:
                # Judged before the golden replay runs: the replay of a bundle whose
                # claim is a lie is exactly what must not take the device down.
                replay_rows = golden_rows(shapes, manifest.inputs) if validate else 0
                measured = footprint.peak_bytes(replay_rows) / MB
                admit(label, peak, self.budget, base, measured_mb=measured)
            diffs = check_golden(manifest, directory, runtime, variant=variant) if validate else {}
        except BaseException:
            report_notices(self.events.emit, runtime, label)
            runtime.close()
            raise
        report_notices(self.events.emit, runtime, label)
        return LoadedModel(
            manifest,
            runtime,
            runtime_name,
            sha256,
            directory,
            golden_diffs=diffs,
            footprint=footprint,
            variant=variant,
        )

    def _measure(
        self,
        runtime: Runtime,
        manifest: Manifest,
        meter: PeakMeter,
        base: int,
        load_peak: int,
        shapes: dict[str, tuple[int, ...]],
    ) -> Footprint | None:
        # What the probes may take: the headroom under the soft limit right now (the
        # served model and its requests are resident).
        budget = max(0, int(self.budget.soft_limit_bytes) - current_rss())
        try:
            return measure(runtime, manifest, meter, base, load_peak, shapes, budget)
        except InferenceError as exc:
            # Zero-filled probes may be invalid input for some models (an index
            # range, a minimum size); the golden replay still judges the model.
            log.warning(
                "cannot measure %s %s on zero inputs (%s); requests are admitted on RSS alone",
                manifest.name,
                manifest.version,
                exc,
            )
            return None

    def reopen(self, model: LoadedModel) -> LoadedModel:
        """A fresh runtime for a model already validated here (same files, same
        config): what the host swaps in to give back memory a runtime keeps."""
        runtime = load_runtime(
            model.runtime_name,
            model.manifest,
            model.directory,
            self.config.runtimes,
            model_file=None if model.variant is None else model.variant.file,
            context=load_context(
                self.config,
                self.budget,
                model.sha256,
                None if model.variant is None else model.variant.precision,
                device_meter(self.config, model.runtime_name).memory,
            ),
        )
        report_notices(self.events.emit, runtime, f"{model.manifest.name} {model.manifest.version}")
        return LoadedModel(
            model.manifest,
            runtime,
            model.runtime_name,
            model.sha256,
            model.directory,
            golden_diffs=dict(model.golden_diffs),
            footprint=model.footprint,
            variant=model.variant,
            selection=model.selection,
        )

    def serve_current(self) -> LoadedModel | None:
        """At start: load what `current` points at, falling back to `previous`."""
        for name in ("current", "previous"):
            directory = self.store.link(name)
            if directory is None:
                continue
            try:
                model = self.open(directory, directory.name)
            except REFUSALS as exc:
                self.events.emit(EventKind.MODEL_REFUSED, str(exc), link=name, code=_code(exc))
                continue
            if name == "previous":
                self.store.rollback()
                self.events.emit(
                    EventKind.MODEL_ROLLED_BACK, "current bundle failed to load at start"
                )
            self.host.swap(model)
            self.events.emit(
                EventKind.MODEL_LOADED,
                f"serving {model.manifest.name} {model.manifest.version}",
                **model.summary(),
            )
            return model
        return None

    def install(
        self, bundle_path: Path, allow_downgrade: bool = False, cold: bool = False
    ) -> LoadedModel:
        """Verify, validate and swap in a bundle file. Raises one of REFUSALS on refusal.

        Hot (default): the new model is loaded next to the served one, which serves
        until the swap. Cold: the served one is closed first (requests in flight
        finish; new ones get 503 `model.not_ready`), so only one is ever resident;
        a refused candidate is replaced by the old model again."""
        try:
            verified = self.store.install(bundle_path, self.keys, limits_from(self.config))
        except BundleError as exc:
            self.events.emit(
                EventKind.MODEL_REFUSED, str(exc), bundle=str(bundle_path), code=exc.code
            )
            raise
        assert verified.directory is not None
        current = self.host.model
        if current is not None and current.sha256 == verified.sha256:
            return current
        try:
            if current is not None and not allow_downgrade:
                new, old = verified.manifest.version, current.manifest.version
                if compare_versions(new, old) <= 0:
                    raise VersionNotNewerError(
                        f"bundle version {new} is not newer than the running {old}; "
                        "a rollback must be requested explicitly"
                    )
            if cold and current is not None:
                directory = verified.directory
                opened: list[LoadedModel] = []

                def build() -> LoadedModel:
                    opened.append(self.open(directory, verified.sha256, verified.manifest))
                    try:
                        self.store.activate(directory)
                    except BaseException:
                        opened[0].runtime.close()
                        raise
                    return opened[0]

                label = f"{verified.manifest.name} {verified.manifest.version}"
                old_model = self.host.swap_cold(build, label, self.config.api.drain_timeout_s)
                model = opened[0]
            else:
                model = self.open(verified.directory, verified.sha256, verified.manifest)
                old_model = None
        except REFUSALS as exc:
            self.store.discard(verified.directory)
            self.events.emit(
                EventKind.MODEL_REFUSED,
                str(exc),
                bundle=str(bundle_path),
                code=_code(exc),
                version=verified.manifest.version,
            )
            raise
        if old_model is None:
            self.store.activate(verified.directory)
            # Not closed here: requests still in flight on the old model finish on it,
            # and it is freed when the last of them lets go.
            old_model = self.host.swap(model)
        self.events.emit(
            EventKind.MODEL_SWAPPED if old_model else EventKind.MODEL_LOADED,
            f"serving {model.manifest.name} {model.manifest.version}",
            previous=None if old_model is None else old_model.manifest.version,
            **model.summary(),
        )
        self.store.gc()
        kept = [p.name for p in (self.store.current(), self.store.previous()) if p is not None]
        prune_caches(self.config.state_dir / "cache", kept)
        # Verification, unpacking and graph optimization leave freed heap behind.
        release_free_memory()
        return model


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "code", type(exc).__name__))


__all__ = ["REFUSALS", "Admission", "limits_from"]

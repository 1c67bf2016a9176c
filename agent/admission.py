"""Take a bundle from file to served model, or refuse it and keep what is served.

verify + unpack -> version rule -> memory admission -> runtime -> golden replay
-> swap -> links. Any refusal raises with its own error and message, emits an
event, removes what was unpacked, and leaves the current model serving.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.bundle import BundleError, Limits, Manifest, VersionNotNewerError
from agent.config.model import AgentConfig
from agent.events import EventBus
from agent.golden import check_golden
from agent.memory import (
    AdmissionError,
    MemoryBudget,
    admit,
    current_rss,
    release_free_memory,
)
from agent.runtimes import choose_runtime, load_runtime
from agent.runtimes.base import ModelLoadError, RuntimeUnavailableError
from agent.serving import LoadedModel, ModelHost
from agent.store import Store
from agent.version import compare_versions

log = logging.getLogger(__name__)

# Everything a refused bundle can raise; callers catch this tuple.
REFUSALS = (BundleError, AdmissionError, ModelLoadError, RuntimeUnavailableError)


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

    def open(self, directory: Path, sha256: str, manifest: Manifest | None = None) -> LoadedModel:
        """Load an unpacked bundle into a runtime and validate it; do not serve it yet."""
        manifest = manifest or self.store.manifest(directory)
        runtime_name = choose_runtime(
            manifest, self.config.model.runtime, list(self.config.model.preference)
        )
        peak = manifest.peak_memory_mb.get(runtime_name)
        # The outgoing model stays loaded until the swap, so it counts against the cap.
        admit(f"{manifest.name} {manifest.version}", peak, self.budget, current_rss())
        runtime = load_runtime(runtime_name, manifest, directory, self.config.runtimes)
        try:
            diffs = (
                check_golden(manifest, directory, runtime)
                if self.config.model.validate_golden
                else {}
            )
        except BaseException:
            runtime.close()
            raise
        return LoadedModel(manifest, runtime, runtime_name, sha256, directory, golden_diffs=diffs)

    def serve_current(self) -> LoadedModel | None:
        """At start: load what `current` points at, falling back to `previous`."""
        for name in ("current", "previous"):
            directory = self.store.link(name)
            if directory is None:
                continue
            try:
                model = self.open(directory, directory.name)
            except REFUSALS as exc:
                self.events.emit("model.refused", str(exc), link=name, code=_code(exc))
                continue
            if name == "previous":
                self.store.rollback()
                self.events.emit("model.rolled_back", "current bundle failed to load at start")
            self.host.swap(model)
            self.events.emit(
                "model.loaded",
                f"serving {model.manifest.name} {model.manifest.version}",
                **model.summary(),
            )
            return model
        return None

    def install(self, bundle_path: Path, allow_downgrade: bool = False) -> LoadedModel:
        """Verify, validate and swap in a bundle file. Raises one of REFUSALS on refusal."""
        try:
            verified = self.store.install(bundle_path, self.keys, limits_from(self.config))
        except BundleError as exc:
            self.events.emit("model.refused", str(exc), bundle=str(bundle_path), code=exc.code)
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
            model = self.open(verified.directory, verified.sha256, verified.manifest)
        except REFUSALS as exc:
            self.store.discard(verified.directory)
            self.events.emit(
                "model.refused",
                str(exc),
                bundle=str(bundle_path),
                code=_code(exc),
                version=verified.manifest.version,
            )
            raise
        self.store.activate(verified.directory)
        # Not closed here: requests still in flight on the old model finish on it, and
        # it is freed when the last of them lets go.
        old_model = self.host.swap(model)
        self.events.emit(
            "model.swapped" if old_model else "model.loaded",
            f"serving {model.manifest.name} {model.manifest.version}",
            previous=None if old_model is None else old_model.manifest.version,
            **model.summary(),
        )
        self.store.gc()
        # Verification, unpacking and graph optimization leave freed heap behind.
        release_free_memory()
        return model


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "code", type(exc).__name__))


__all__ = ["REFUSALS", "Admission", "limits_from"]

"""The update job runner: one job at a time, on its own thread; implements `UpdateService`.

A deploy's phases, each persisted in the journal before it starts (recovery.py maps
where a crash left it to what to do next):

    downloading  Fetcher port -> STATE/incoming/<sha256>.part
    verifying    the store's verify + unpack (every bundle rule) -> STATE/bundles/<sha256>/
    validating   Admission.open: load, measured memory with both models resident, golden
                 replay; then one golden case timed against the manifest's latency figure
    shadow       (when asked) ShadowRunner port: the candidate beside the served model
    swapping     hot (both resident: ModelHost.swap) or cold (ModelHost.swap_cold). The
                 store's links move here, Mender-style: the candidate is `current` during
                 the trial and the old model `previous`, so a crash in the trial is
                 rolled back by recovery at the next start.
    trial        TrialMonitor port on live traffic; a breach swaps back at once (the old
                 model is kept loaded after a hot swap, reopened after a cold one) and
                 marks the version bad
    committed    the point of no return: `previous` stays on disk for `rollback`, older
                 bundles are removed

Nothing before `swapping` touches what is served: any failure there leaves the old
model serving, discards the candidate and ends the job `failed` with its code.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.admission import REFUSALS, limits_from
from agent.atomicfile import remove_stale_temps
from agent.bundle import BundleError, Manifest
from agent.config.model import AgentConfig
from agent.events import Emit
from agent.memory import MB, AdmissionError, release_free_memory
from agent.protocol.events import EventKind
from agent.protocol.state import ModelInfo, UpdateSnapshot
from agent.protocol.update import (
    CancelAccepted,
    DeployRequest,
    HttpSource,
    JobAccepted,
    ModelRef,
    MqttSource,
    Phase,
    RollbackRequest,
    Source,
    TrialSpec,
    UpdateStatus,
)
from agent.serving import LoadedModel
from agent.store import Store
from agent.update.diskspace import check_space, need_for
from agent.update.errors import UpdateCode, UpdateError
from agent.update.journal import JobRecord, Journal
from agent.update.ports import Fetcher, ShadowRunner, TrialMonitor, Verdict
from agent.version import compare_versions

log = logging.getLogger(__name__)

INCOMING = "incoming"
_CANCELLABLE = frozenset({Phase.DOWNLOADING, Phase.VERIFYING, Phase.VALIDATING, Phase.SHADOW})
PROGRESS_EVERY_S = 0.5  # `update.downloading` at most twice a second
LATENCY_RUNS = 9  # timed runs of one golden case (the median is compared)


class Served(Protocol):
    """What the job needs of the model host (agent/serving.py ModelHost)."""

    @property
    def model(self) -> LoadedModel | None: ...

    @property
    def generation(self) -> int: ...

    def swap(self, new: LoadedModel, replacing: int | None = None) -> LoadedModel | None: ...

    def swap_cold(
        self,
        build: Callable[[], LoadedModel],
        what: str,
        timeout_s: float,
        replacing: int | None = None,
    ) -> LoadedModel | None: ...

    def pin(self, model: LoadedModel) -> None: ...

    def unpin(self, model: LoadedModel) -> None: ...


class Loader(Protocol):
    """What the job needs of admission (agent/admission.py Admission)."""

    def open(
        self, directory: Path, sha256: str, manifest: Manifest | None = None
    ) -> LoadedModel: ...

    def reopen(self, model: LoadedModel) -> LoadedModel: ...


# Builds the fetcher for one deploy (the source type picks it: HttpSource, MqttSource).
FetcherFactory = Callable[[DeployRequest], Fetcher]


def trial_defaults(config: AgentConfig) -> TrialSpec:
    t = config.update.trial
    return TrialSpec(
        window_s=t.window_s,
        min_requests=t.min_requests,
        max_error_rate=t.max_error_rate,
        max_p95_ratio=t.max_p95_ratio,
        max_rss_growth_mb=t.max_rss_growth_mb,
        max_nonfinite_rate=t.max_nonfinite_rate,
        max_drift=t.max_drift,
        max_crashes=t.max_crashes,
    )


@dataclass
class _Candidate:
    directory: Path
    sha256: str
    manifest: Manifest
    model: LoadedModel | None = None  # loaded (hot); None until the cold swap loads it


class _Stop(Exception):
    """The job ends here with this record (already final); nothing more to do."""


class UpdateJobs:
    def __init__(
        self,
        config: AgentConfig,
        store: Store,
        host: Served,
        loader: Loader,
        keys: list[Ed25519PublicKey],
        emit: Emit,
        journal: Journal,
        fetchers: dict[type, FetcherFactory] | None = None,
        trial: TrialMonitor | None = None,
        shadow: ShadowRunner | None = None,
        memory_cap_bytes: int | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.host = host
        self.loader = loader
        self.keys = keys
        self.emit = emit
        self.journal = journal
        self.fetchers: dict[type, FetcherFactory] = dict(fetchers or {})
        self.trial = trial
        self.shadow = shadow
        self.incoming = Path(config.state_dir) / INCOMING
        self.budget_cap_mb = None if memory_cap_bytes is None else memory_cap_bytes / MB
        self._lock = threading.Lock()  # guards _thread, _cancel, the job record
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._timed_out: str | None = None
        self._job: JobRecord | None = journal.job
        self._last_progress = 0.0

    def add_fetcher(self, source: type, factory: FetcherFactory) -> None:
        """Register how deploys from `source` (HttpSource, MqttSource) are fetched."""
        self.fetchers[source] = factory

    # ------------------------------------------------------------------ the service

    def deploy(self, request: DeployRequest) -> dict[str, Any]:
        with self._lock:
            self._check_free()
            self._check_deploy(request)
            fetcher = self._fetcher(request)
            self.incoming.mkdir(exist_ok=True)
            check_space(
                self.config.state_dir,
                need_for(
                    request.size, self._partial(request.sha256), self.config.update.reserve_disk_mb
                ),
            )
            job = self._new_job("deploy", request.to_args(), request.version)
            self._start(job, lambda: self._run_deploy(request, fetcher))
        return JobAccepted(job.id).to_json()

    def resume(self, job: JobRecord) -> bool:
        """Restart an interrupted download (recovery's "resume"): same job, same partial."""
        try:
            request = DeployRequest.from_args(
                job.request, str(job.request.get("origin", "command"))
            )
            with self._lock:
                self._check_free()
                fetcher = self._fetcher(request)
                self.incoming.mkdir(exist_ok=True)
                self._job = job
                self._start(job, lambda: self._run_deploy(request, fetcher))
        except UpdateError as exc:
            self._finish(job, Phase.FAILED, exc.code, f"cannot resume: {exc.message}", exc.data)
            return False
        return True

    def rollback(self, request: RollbackRequest) -> dict[str, Any]:
        with self._lock:
            self._check_free()
            directory = self._rollback_target(request.version)
            manifest = self.store.manifest(directory)
            job = self._new_job(
                "rollback", {"version": request.version}, manifest.version, directory.name
            )
            self._start(job, lambda: self._run_rollback(directory, manifest))
        return JobAccepted(job.id, manifest.version).to_json()

    def status(self) -> dict[str, Any]:
        job = self._job
        served = self.host.model
        previous = self.store.previous()
        prev_manifest = None
        if previous is not None:
            with contextlib.suppress(BundleError, OSError):
                prev_manifest = self.store.manifest(previous)
        return UpdateStatus(
            job=None,  # the journal's own form goes out as is (job_json)
            running=self.running,
            served=None if served is None else ModelRef(served.manifest.version, served.sha256),
            previous=None
            if previous is None
            else ModelRef(None if prev_manifest is None else prev_manifest.version, previous.name),
            bad_versions=self.journal.state.bad,
            job_json=None if job is None else job.to_json(),
        ).to_json()

    def cancel(self) -> dict[str, Any]:
        with self._lock:
            job = self._job
            if job is None or job.phase.final or not self.running:
                raise UpdateError(UpdateCode.NOTHING_TO_CANCEL, "no update job is running")
            if job.phase is Phase.SWAPPING:
                raise UpdateError(
                    UpdateCode.BUSY,
                    f"job {job.id} is swapping models; cancel again once it is in trial "
                    "(that rolls back), or send rollback after it ends",
                    job=job.id,
                    phase=job.phase.value,
                )
            self._cancel.set()
        return CancelAccepted(job.id, job.phase.value).to_json()

    def snapshot(self) -> UpdateSnapshot | None:
        """The retained `state`'s `update` field: job, phase, version; at the end the model."""
        job = self._job
        if job is None:
            return None
        model = None
        if job.phase.final:
            served = self.host.model
            if served is not None:
                model = ModelInfo(served.manifest.name, served.manifest.version, served.sha256)
        return UpdateSnapshot(
            job=job.id,
            kind=job.kind,
            phase=job.phase.value,
            version=job.version,
            code=job.code,
            model=model,
        )

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the running job to end (tests, shutdown); True once none runs."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            thread = self._thread
            if thread is None:
                return True
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread is self._thread or (deadline is not None and time.monotonic() > deadline):
                return not self.running

    # ------------------------------------------------------------------ checks at accept

    def _check_free(self) -> None:
        if not self.config.update.enabled:
            raise UpdateError(
                UpdateCode.DISABLED, "over-the-air updates are off on this device (update.enabled)"
            )
        job = self._job
        # A job whose final phase is recorded is over: the thread does nothing after it.
        if self.running and job is not None and not job.phase.final:
            raise UpdateError(
                UpdateCode.BUSY,
                f"job {job.id} ({job.kind} {job.version}) is in phase {job.phase.value}; "
                "wait for it to end or send update.cancel",
                job=job.id,
                phase=job.phase.value,
            )

    def _check_deploy(self, request: DeployRequest) -> None:
        cap_mb = self.config.bundle_limits.max_bundle_mb
        if request.size > cap_mb * MB:
            raise UpdateError(
                UpdateCode.BAD_ARGS,
                f"deploy: size {request.size} bytes is over the bundle cap of {cap_mb} MB "
                "(bundle_limits.max_bundle_mb)",
                size=request.size,
                max_bundle_mb=cap_mb,
            )
        bad = self.journal.is_bad(request.version, request.sha256)
        if bad is not None and not request.force:
            raise UpdateError(
                UpdateCode.MARKED_BAD,
                f"version {bad.version} was rolled back on this device ({bad.reason}); "
                'deploy it with "force": true to try it again',
                version=bad.version,
            )
        served = self.host.model
        if (
            served is not None
            and not request.allow_downgrade
            and compare_versions(request.version, served.manifest.version) <= 0
        ):
            raise UpdateError(
                UpdateCode.NOT_NEWER,
                f"version {request.version} is not newer than the served "
                f'{served.manifest.version}; deploy with "allow_downgrade": true '
                "(signed) or send rollback",
                version=request.version,
                served=served.manifest.version,
            )
        if request.shadow is not None:
            if self.shadow is None:
                raise UpdateError(
                    UpdateCode.BAD_ARGS, "deploy: shadow evaluation is not available on this agent"
                )
            if request.mode == "cold":
                raise UpdateError(
                    UpdateCode.BAD_ARGS,
                    'deploy: "shadow" needs both models resident; it cannot go with mode "cold"',
                )

    def _fetcher(self, request: DeployRequest) -> Fetcher:
        source: Source = request.source
        for kind, factory in self.fetchers.items():
            if isinstance(source, kind):
                return factory(request)
        what = "url (http/https)" if isinstance(source, HttpSource) else "transfer (MQTT)"
        raise UpdateError(
            UpdateCode.BAD_ARGS, f"deploy: downloads by {what} are not available on this agent"
        )

    def _rollback_target(self, version: str | None) -> Path:
        current = self.store.current()
        if version is None:
            previous = self.store.previous()
            if previous is None or (
                current is not None and previous.resolve() == current.resolve()
            ):
                raise UpdateError(
                    UpdateCode.NO_SUCH_VERSION, "there is no previous model on disk to roll back to"
                )
            return previous
        served = self.host.model
        if served is not None and served.manifest.version == version:
            raise UpdateError(
                UpdateCode.NO_SUCH_VERSION,
                f"version {version} is the one served now",
                version=version,
            )
        on_disk = []
        for entry in sorted(self.store.bundles.iterdir()):
            if entry.name.startswith(".") or not (entry / "manifest.json").is_file():
                continue
            try:
                found = self.store.manifest(entry).version
            except (BundleError, OSError):
                continue
            if found == version:
                return entry
            on_disk.append(found)
        raise UpdateError(
            UpdateCode.NO_SUCH_VERSION,
            f"version {version} is not on disk (on disk: {', '.join(on_disk) or 'none'})",
            version=version,
            on_disk=on_disk,
        )

    # ------------------------------------------------------------------ the job thread

    def _new_job(
        self, kind: str, request: dict[str, Any], version: str, candidate: str | None = None
    ) -> JobRecord:
        now = time.time()
        served = self.host.model
        return JobRecord(
            id=uuid.uuid4().hex[:16],
            kind=kind,
            phase=Phase.ACCEPTED,
            request=request,
            version=version,
            started=now,
            phase_started=now,
            candidate_sha=candidate,
            previous_version=None if served is None else served.manifest.version,
            previous_sha=None if served is None else served.sha256,
        )

    def _start(self, job: JobRecord, work: Callable[[], None]) -> None:
        self._cancel = threading.Event()
        self._timed_out = None
        self._job = job
        self.journal.record(job)
        self.emit(
            EventKind.UPDATE_ACCEPTED, f"{job.kind} {job.version}: accepted as job {job.id}",
            job=job.id, version=job.version,
        )  # fmt: skip
        thread = threading.Thread(target=self._guard, args=(work,), name="update-job", daemon=True)
        self._thread = thread
        thread.start()

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except _Stop:
            pass
        except Exception as exc:  # a bug: the old model keeps serving (it was not touched)
            log.exception("update job failed")
            job = self._job
            if job is not None and not job.phase.final:
                self._finish(job, Phase.FAILED, UpdateCode.INTERNAL, f"internal error: {exc}")

    def _enter(self, phase: Phase, reason: str, **changes: Any) -> JobRecord:
        """Persist the phase, then announce it; raises update.cancelled if asked to stop."""
        job = self._job
        assert job is not None
        if self._cancel.is_set() and phase in _CANCELLABLE:
            raise UpdateError(UpdateCode.CANCELLED, "cancelled (update.cancel)")
        job = job.at(phase, **changes)
        self._job = job
        self.journal.record(job)
        self.emit(phase.event, reason, job=job.id, version=job.version, **job.figures)
        return job

    def _figures(self, **figures: Any) -> None:
        job = self._job
        assert job is not None
        self._job = replace(job, figures={**job.figures, **figures})

    def _finish(
        self,
        job: JobRecord,
        phase: Phase,
        code: str | None,
        reason: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        final = job.at(phase, code=code, reason=reason, figures={**job.figures, **(data or {})})
        self._job = final
        self.journal.record(final)
        self.emit(
            phase.event, reason, job=final.id, version=final.version, code=code, **final.figures
        )

    def _phase_timer(self, phase: Phase, extra_s: float = 0.0) -> threading.Timer:
        limit = self.config.update.phase_timeout_s + extra_s

        def expire() -> None:
            self._timed_out = f"phase {phase.value} ran past update.phase_timeout_s ({limit:g} s)"
            self._cancel.set()

        timer = threading.Timer(limit, expire)
        timer.daemon = True
        timer.start()
        return timer

    def _cancelled(self) -> UpdateError:
        if self._timed_out is not None:
            return UpdateError(UpdateCode.PHASE_TIMEOUT, self._timed_out)
        return UpdateError(UpdateCode.CANCELLED, "cancelled (update.cancel)")

    # ------------------------------------------------------------------ deploy

    def _run_deploy(self, request: DeployRequest, fetcher: Fetcher) -> None:
        candidate: _Candidate | None = None
        path: Path | None = None
        keep_partial = False
        try:
            path = self._download(request, fetcher)
            candidate = self._verify(request, path)
            self._validate(request, candidate)
            if request.shadow is not None:
                self._shadow(request, candidate)
            if self._cancel.is_set():
                raise self._cancelled()
        except UpdateError as exc:
            if self._timed_out is not None and exc.code == UpdateCode.CANCELLED:
                exc = self._cancelled()
            keep_partial = exc.code in (UpdateCode.DOWNLOAD_FAILED, UpdateCode.TRANSFER_FAILED)
            self._discard(candidate, path, keep_partial, request.sha256)
            job = self._job
            assert job is not None
            phase = Phase.CANCELLED if exc.code == UpdateCode.CANCELLED else Phase.FAILED
            self._finish(job, phase, exc.code, exc.message, dict(exc.data))
            return
        except BaseException:
            self._discard(candidate, path, False, request.sha256)
            raise
        assert candidate is not None
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # unpacked now; the download is not needed any more
        self._swap_and_trial(request, candidate)

    def _partial(self, sha256: str) -> Path:
        return self.incoming / f"{sha256}.part"

    def _download(self, request: DeployRequest, fetcher: Fetcher) -> Path:
        partial = self._partial(request.sha256)
        have = partial.stat().st_size if partial.exists() else 0
        self._enter(
            Phase.DOWNLOADING,
            f"downloading {request.version} ({request.size} bytes"
            + (f", resuming at {have}" if have else "") + ")",
            figures={"bytes": have, "total": request.size, "percent": _percent(have, request.size)},
        )  # fmt: skip
        started = time.monotonic()
        self._last_progress = started

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - self._last_progress < PROGRESS_EVERY_S:
                return
            self._last_progress = now
            seconds = now - started
            job = self._job
            assert job is not None
            self.emit(
                Phase.DOWNLOADING.event,
                f"downloading {request.version}: {_percent(done, total)}%",
                job=job.id, version=request.version, bytes=done, total=total,
                percent=_percent(done, total), seconds=round(seconds, 3),
                kbps=round((done - have) * 8 / 1000 / seconds, 1) if seconds > 0 else None,
            )  # fmt: skip

        timer = self._phase_timer(Phase.DOWNLOADING)
        try:
            path = fetcher.fetch(request, partial, progress, self._cancel)
        finally:
            timer.cancel()
        if self._cancel.is_set():
            raise self._cancelled()
        seconds = time.monotonic() - started
        self._figures(
            bytes=request.size,
            download_s=round(seconds, 3),
            kbps=round((request.size - have) * 8 / 1000 / seconds, 1) if seconds > 0 else None,
            percent=100,
        )
        return path

    def _verify(self, request: DeployRequest, path: Path) -> _Candidate:
        self._enter(Phase.VERIFYING, f"verifying {request.version}")
        started = time.monotonic()
        try:
            verified = self.store.install(path, self.keys, limits_from(self.config))
        except BundleError as exc:
            raise UpdateError(
                UpdateCode.BUNDLE_REFUSED, f"bundle refused: {exc}", bundle_code=exc.code
            ) from exc
        except OSError as exc:
            raise UpdateError(
                UpdateCode.BUNDLE_REFUSED,
                f"bundle cannot be unpacked: {exc.strerror or exc}",
                bundle_code="bundle.unreadable",
            ) from exc
        assert verified.directory is not None
        candidate = _Candidate(verified.directory, verified.sha256, verified.manifest)
        self._figures(verify_s=round(time.monotonic() - started, 3))
        signed = verified.manifest.version
        if signed != request.version:
            raise UpdateError(
                UpdateCode.BUNDLE_REFUSED,
                f"the bundle's signed version is {signed}, the deploy says {request.version}",
                bundle_code="bundle.version_mismatch",
                signed_version=signed,
            )
        if verified.sha256 != request.sha256:
            raise UpdateError(
                UpdateCode.HASH_MISMATCH,
                f"sha256 of the bundle is {verified.sha256}, the deploy says {request.sha256}",
            )
        if request.name is not None and verified.manifest.name != request.name:
            raise UpdateError(
                UpdateCode.VALIDATION_FAILED,
                f"the bundle is model {verified.manifest.name!r}, the deploy names {request.name!r}",
                name=verified.manifest.name,
            )
        served = self.host.model
        if served is not None and served.sha256 == verified.sha256:
            raise UpdateError(UpdateCode.NOT_NEWER, f"{request.version} is already served")
        return candidate

    def _validate(self, request: DeployRequest, candidate: _Candidate) -> None:
        self._enter(Phase.VALIDATING, f"validating {request.version} on this device")
        if request.mode == "cold" or self.host.model is None:
            self._figures(mode="cold" if self.host.model is not None else "hot")
            return  # loaded and validated inside the swap, once the old model is released
        started = time.monotonic()
        try:
            candidate.model = self.loader.open(
                candidate.directory, candidate.sha256, candidate.manifest
            )
        except AdmissionError as exc:
            if request.mode == "hot" or request.shadow is not None:
                raise UpdateError(
                    UpdateCode.VALIDATION_FAILED,
                    f"both models do not fit in memory for a hot swap: {exc}",
                    check="memory",
                    detail_code=exc.code,
                ) from exc
            self._check_fits_alone(exc)
            log.info("hot swap does not fit (%s); swapping cold", exc)
            self._figures(mode="cold", hot_refused=str(exc))
            return
        except REFUSALS as exc:
            raise _validation_error(exc) from exc
        self._figures(mode="hot", validate_s=round(time.monotonic() - started, 3))
        self._check_model(candidate.model)

    def _check_fits_alone(self, exc: AdmissionError) -> None:
        """A cold swap closes the served model before loading the candidate: only worth it
        when the candidate fits once the served model's memory is given back."""
        served = self.host.model
        if exc.need_mb is None or exc.rss_mb is None or served is None:
            return
        freed_mb = 0.0 if served.footprint is None else served.footprint.load_bytes / MB
        alone_mb = exc.rss_mb - freed_mb + exc.need_mb
        cap_mb = self.budget_cap_mb
        if cap_mb is not None and alone_mb > cap_mb:
            raise UpdateError(
                UpdateCode.VALIDATION_FAILED,
                f"the candidate does not fit even alone: {exc.need_mb:.1f} MB on top of "
                f"{exc.rss_mb - freed_mb:.1f} MB without the served model = {alone_mb:.1f} MB, "
                f"above the memory cap of {cap_mb:.1f} MB; the served model keeps serving",
                check="memory",
                detail_code=exc.code,
                need_mb=round(exc.need_mb, 1),
                cap_mb=round(cap_mb, 1),
            )

    def _check_model(self, model: LoadedModel) -> None:
        """Golden diffs and memory figures; the latency budget (raises, model left open)."""
        figures: dict[str, Any] = {
            "golden_max_diff": max(model.golden_diffs.values(), default=None),
        }
        if model.footprint is not None:
            figures["measured_mb"] = model.footprint.as_dict()
        latency = measure_latency(model) if self.config.model.validate_golden else None
        budget = latency_budget_ms(
            model, self.config.update.latency_ratio, self.config.update.latency_slack_ms
        )
        figures["latency_p50_ms"] = None if latency is None else round(latency, 4)
        figures["latency_budget_ms"] = None if budget is None else round(budget, 4)
        self._figures(**figures)
        if latency is not None and budget is not None and latency > budget:
            raise UpdateError(
                UpdateCode.VALIDATION_FAILED,
                f"p50 latency {latency:.3f} ms on this device is over the budget {budget:.3f} ms "
                f"(manifest figures.latency_ms.{model.runtime_name}.p50 x update.latency_ratio "
                f"{self.config.update.latency_ratio:g} + update.latency_slack_ms "
                f"{self.config.update.latency_slack_ms:g})",
                check="latency",
                latency_p50_ms=round(latency, 4),
                latency_budget_ms=round(budget, 4),
            )

    def _shadow(self, request: DeployRequest, candidate: _Candidate) -> None:
        assert request.shadow is not None and self.shadow is not None
        assert candidate.model is not None
        self._enter(Phase.SHADOW, f"{request.version} in shadow beside the served model")
        job = self._job
        assert job is not None

        def progress(figures: dict[str, float]) -> None:
            self.emit(Phase.SHADOW.event, "shadow progress", job=job.id, version=job.version,
                      **figures)  # fmt: skip

        timer = self._phase_timer(Phase.SHADOW, request.shadow.timeout_s)
        try:
            verdict = self.shadow.evaluate(candidate.model, request.shadow, self._cancel, progress)
        finally:
            timer.cancel()
        self._figures(**{f"shadow_{k}": v for k, v in verdict.figures.items()})
        if self._cancel.is_set():
            raise self._cancelled()
        if not verdict.ok:
            raise UpdateError(
                UpdateCode.SHADOW_DISAGREED, f"shadow: {verdict.reason}; not promoted",
                **verdict.figures,
            )  # fmt: skip

    def _discard(
        self, candidate: _Candidate | None, path: Path | None, keep_partial: bool, sha: str
    ) -> None:
        if candidate is not None:
            if candidate.model is not None:
                candidate.model.runtime.close()
            self.store.discard(candidate.directory)
        if not keep_partial:
            partial = self._partial(sha)
            sidecars = [partial.with_name(partial.name + s) for s in (".meta", ".bitmap")]
            for leftover in (path, partial, *sidecars):
                if leftover is not None:
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            for sidecar in sidecars:  # a crash's half-written sidecar, under its own name
                remove_stale_temps(sidecar)
        release_free_memory()

    # ------------------------------------------------------------------ swap, trial, commit

    def _swap_and_trial(self, request: DeployRequest, candidate: _Candidate) -> None:
        spec = request.trial or trial_defaults(self.config)
        old = self.host.model
        baseline = self.trial.baseline() if self.trial is not None and old is not None else {}
        self._swap_in(candidate, old)
        pinned = candidate.model is not None and old is not None  # hot: old kept loaded
        job = self._enter(Phase.TRIAL, f"{request.version} serving; trial for {spec.window_s:g} s")
        verdict = Verdict(True, "no trial")
        if spec.window_s > 0 and self.trial is not None:

            def progress(figures: dict[str, float]) -> None:
                self.emit(Phase.TRIAL.event, "trial progress", job=job.id, version=job.version,
                          **figures)  # fmt: skip

            timer = self._phase_timer(Phase.TRIAL, spec.window_s * 3)
            try:
                verdict = self.trial.watch(
                    self.host.generation, spec, baseline, self._cancel, progress
                )
            finally:
                timer.cancel()
        elif spec.window_s > 0:
            log.warning("no trial monitor on this agent: %s committed unwatched", request.version)
            verdict = Verdict(True, "not watched: no trial monitor")
        self._figures(**{f"trial_{k}": v for k, v in verdict.figures.items()})
        if self._cancel.is_set():
            error = self._cancelled()
            self._swap_back(old, pinned, candidate)
            self._finish(self._job_now(), Phase.ROLLED_BACK, error.code, error.message)
            return
        if not verdict.ok:
            started = time.monotonic()
            self._swap_back(old, pinned, candidate)
            self.journal.mark_bad(candidate.manifest.version, candidate.sha256, verdict.reason)
            self._finish(
                self._job_now(),
                Phase.ROLLED_BACK,
                UpdateCode.TRIAL_FAILED,
                f"trial: {verdict.reason}; rolled back to "
                f"{old.manifest.version if old else 'nothing'} and marked {request.version} bad",
                {**verdict.figures, "rollback_s": round(time.monotonic() - started, 3)},
            )
            return
        if pinned and old is not None:
            self.host.unpin(old)
        self._commit(f"committed {request.version}")

    def _job_now(self) -> JobRecord:
        job = self._job
        assert job is not None
        return job

    def _swap_in(self, candidate: _Candidate, old: LoadedModel | None, pin: bool = True) -> None:
        mode = "hot" if candidate.model is not None or old is None else "cold"
        self._enter(
            Phase.SWAPPING,
            f"swapping to {candidate.manifest.version} ({mode})",
            candidate_sha=candidate.sha256,
            candidate_dir=str(candidate.directory),
            mode=mode,
        )
        started = time.monotonic()
        try:
            if mode == "hot":
                if candidate.model is None:  # nothing served before: load it now
                    candidate.model = self._open_checked(candidate)
                if old is not None and pin:
                    self.host.pin(old)  # kept loaded: a trial breach swaps back at once
                self.store.activate(candidate.directory)
                self.host.swap(candidate.model)
            else:
                self.host.swap_cold(
                    lambda: self._build_cold(candidate),
                    f"{candidate.manifest.name} {candidate.manifest.version}",
                    self.config.api.drain_timeout_s,
                )
        except UpdateError as exc:
            self._discard(candidate, None, True, candidate.sha256)
            self._finish(self._job_now(), Phase.FAILED, exc.code, exc.message, dict(exc.data))
            raise _Stop from exc
        except REFUSALS as exc:
            self._discard(candidate, None, True, candidate.sha256)
            err = _validation_error(exc)
            self._finish(self._job_now(), Phase.FAILED, err.code, err.message, dict(err.data))
            raise _Stop from exc
        model = candidate.model
        assert model is not None
        self._figures(swap_s=round(time.monotonic() - started, 3))
        self.emit(
            EventKind.MODEL_SWAPPED,
            f"serving {model.manifest.name} {model.manifest.version}",
            previous=None if old is None else old.manifest.version,
            **model.summary(),
        )

    def _open_checked(self, candidate: _Candidate) -> LoadedModel:
        model = self.loader.open(candidate.directory, candidate.sha256, candidate.manifest)
        try:
            self._check_model(model)
        except BaseException:
            model.runtime.close()
            raise
        return model

    def _build_cold(self, candidate: _Candidate) -> LoadedModel:
        # Runs inside swap_cold with the old model released; if it raises, the old is reopened.
        model = self._open_checked(candidate)
        try:
            self.store.activate(candidate.directory)
        except BaseException:
            model.runtime.close()
            raise
        candidate.model = model
        return model

    def _swap_back(self, old: LoadedModel | None, pinned: bool, candidate: _Candidate) -> None:
        if old is None:
            return  # nothing served before: nothing to go back to
        self.store.activate(old.directory)
        if pinned:
            self.host.swap(old)
            self.host.unpin(old)
        else:
            self.host.swap_cold(
                lambda: self.loader.reopen(old),
                f"{old.manifest.name} {old.manifest.version}",
                self.config.api.drain_timeout_s,
            )
        self.emit(
            EventKind.MODEL_ROLLED_BACK,
            f"serving {old.manifest.name} {old.manifest.version} again",
            rejected=candidate.manifest.version,
        )
        release_free_memory()

    def _commit(self, reason: str) -> None:
        model = self.host.model
        summary = {} if model is None else {"model": model.summary()}
        # Before the final record: once it is written the next job may start.
        for removed in self.store.gc():
            log.info("removed bundle %s (neither current nor previous)", removed)
        release_free_memory()
        self._finish(self._job_now(), Phase.COMMITTED, None, reason, summary)

    # ------------------------------------------------------------------ rollback

    def _run_rollback(self, directory: Path, manifest: Manifest) -> None:
        candidate = _Candidate(directory, directory.name, manifest)
        old = self.host.model
        try:
            self._enter(Phase.VALIDATING, f"validating {manifest.version} for the rollback")
            try:
                candidate.model = self.loader.open(directory, directory.name, manifest)
            except AdmissionError as exc:
                log.info("rollback: hot swap does not fit (%s); swapping cold", exc)
            except REFUSALS as exc:
                raise _validation_error(exc) from exc
        except UpdateError as exc:
            phase = Phase.CANCELLED if exc.code == UpdateCode.CANCELLED else Phase.FAILED
            self._finish(self._job_now(), phase, exc.code, exc.message, dict(exc.data))
            return
        # A rollback is committed at once: the old model is not kept loaded for a trial.
        self._swap_in(candidate, old, pin=False)
        self.store.gc()
        release_free_memory()
        self._finish(
            self._job_now(),
            Phase.ROLLED_BACK,
            None,
            f"rolled back to {manifest.version} (rollback requested)",
            {} if self.host.model is None else {"model": self.host.model.summary()},
        )


def _validation_error(exc: BaseException) -> UpdateError:
    code = str(getattr(exc, "code", type(exc).__name__))
    return UpdateError(UpdateCode.VALIDATION_FAILED, f"validation failed: {exc}", detail_code=code)


def _percent(done: int, total: int) -> int:
    return 100 if total <= 0 else min(100, int(done * 100 / total))


def one_case(model: LoadedModel) -> dict[str, np.ndarray] | None:
    """The first golden case alone (batch 1, as the manifest's latency figure is)."""
    golden = model.manifest.golden_inputs
    if golden is None:
        return None
    # Inspected by the golden replay already (check_golden), so the load is bounded.
    with np.load(model.directory / golden, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    feeds = {}
    for spec in model.manifest.inputs:
        array = arrays.get(spec.name)
        if array is None:
            return None
        axis = spec.batch_axis
        if axis is not None and axis >= 0 and array.ndim > axis and array.shape[axis] > 1:
            array = np.take(array, [0], axis=axis)
        feeds[spec.name] = array
    return feeds


def measure_latency(model: LoadedModel, runs: int = LATENCY_RUNS) -> float | None:
    """Median milliseconds of one golden case on this device (after one warm-up run)."""
    feeds = one_case(model)
    if feeds is None:
        return None
    model.runtime.run(feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model.runtime.run(feeds)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def latency_budget_ms(model: LoadedModel, ratio: float, slack_ms: float) -> float | None:
    figures = model.manifest.figures.get("latency_ms")
    if not isinstance(figures, dict):
        return None
    entry = figures.get(model.runtime_name)
    p50 = entry.get("p50") if isinstance(entry, dict) else None
    if isinstance(p50, bool) or not isinstance(p50, int | float) or not p50 >= 0:
        return None
    return float(p50) * ratio + slack_ms


def default_fetchers(config: AgentConfig) -> dict[type, FetcherFactory]:
    """HTTP(S) downloads; MQTT transfers are added by the link (it owns the connection)."""
    from agent.update.fetch.http import HttpFetcher, HttpSettings

    # Built once here: a bad update.ca_file is a start-up problem, not a deploy's.
    settings = HttpSettings.from_config(config.update)

    def build_http(request: DeployRequest) -> Fetcher:
        return HttpFetcher(settings)

    return {HttpSource: build_http}


__all__ = [
    "INCOMING",
    "FetcherFactory",
    "Loader",
    "MqttSource",
    "Served",
    "UpdateJobs",
    "default_fetchers",
    "latency_budget_ms",
    "measure_latency",
    "trial_defaults",
]

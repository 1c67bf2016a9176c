"""The agent process: wires config, memory, store, admission, API and signals together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import __version__
from agent.admission import REFUSALS, Admission
from agent.api.server import ApiServer, ApiSetupError
from agent.bundle import BundleError
from agent.config.loader import ConfigError, read_public_keys
from agent.config.model import AgentConfig
from agent.device_memory import NvmapMemory, unified_counter
from agent.events import EventBus
from agent.hardware.gauges import accelerator_gauges
from agent.hardware.jetson import JetsonTelemetry, find_tegrastats
from agent.hardware.sysfs import JetsonSysfs
from agent.memory import MB, RssWatcher, compute_budget
from agent.metrics import Metrics
from agent.preflight import START_FAILED, START_INTERNAL, check_api
from agent.protocol.events import EventKind
from agent.regular_files import check_regular
from agent.runtimes import availability
from agent.sdnotify import Notifier
from agent.serving import ModelHost
from agent.signing import key_id
from agent.store import Store
from agent.update.jobs import UpdateJobs, default_fetchers
from agent.update.journal import Journal
from agent.update.recovery import Recovered, recover
from agent.update.shadow import ShadowEvaluator
from agent.update.trial import TrafficRecorder, Watchdog

log = logging.getLogger(__name__)


class Component(Protocol):
    """Something that runs beside the API for the agent's lifetime (e.g. the MQTT link)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class StartupError(Exception):
    """The agent cannot start; the message says what to fix, `code` is stable."""

    def __init__(self, message: str, code: str = START_FAILED) -> None:
        super().__init__(message)
        self.code = code


class UnreadableBundleError(BundleError):
    """`model.bundle` names something that is not a readable regular file."""

    code = "bundle.unreadable"


def load_trusted_keys(config: AgentConfig) -> list[Ed25519PublicKey]:
    try:
        return read_public_keys(list(config.trust.public_keys), "trust.public_keys")
    except ConfigError as exc:
        raise StartupError("; ".join(str(issue) for issue in exc.issues), exc.code) from exc


class _Stopped:
    """What waiting for start-up work returns when SIGTERM came first."""


STOPPED = _Stopped()


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started = time.time()
        self.events = EventBus()
        self.metrics = Metrics()
        self.budget = compute_budget(config.memory)
        self.watcher = RssWatcher(self.budget, config.memory.check_interval_ms / 1000)
        self.watcher.on_change = self._overload_changed
        # A Jetson's GPU memory is the RAM the cap protects: shed on RSS + GPU memory.
        # Only a Jetson's nvmap counts here; NVML (a discrete GPU's own memory) is
        # started only when a GPU provider serves, not on every CPU-only start.
        self.watcher.device_bytes = unified_counter(
            NvmapMemory() if NvmapMemory.present() else None
        )
        self.keys = load_trusted_keys(config)
        try:
            self.store = Store(config.state_dir)
        except OSError as exc:
            raise StartupError(f"state_dir {config.state_dir}: {exc.strerror}") from exc
        self.host = ModelHost(config, self.metrics, self.watcher)
        self.admission = Admission(
            config, self.store, self.host, self.budget, self.keys, self.events
        )
        # One owner of update jobs; it gets the parts it uses, not the agent.
        # Live figures per generation, for trials; it observes requests from run() on.
        self.traffic = TrafficRecorder(self.host)
        self.journal = Journal(config.state_dir)
        try:
            fetchers = default_fetchers(config)
        except ConfigError as exc:  # update.ca_file: named by the issue
            raise StartupError("; ".join(str(i) for i in exc.issues), exc.code) from exc
        self.updates = UpdateJobs(
            config,
            self.store,
            self.host,
            self.admission,
            self.keys,
            self.events.emit,
            self.journal,
            fetchers,
            trial=Watchdog(self.traffic),
            shadow=ShadowEvaluator(self.host),
            memory_cap_bytes=self.budget.cap_bytes,
        )
        self.recovered = Recovered("none")
        self.api = ApiServer(self.host, config.api, self.status, self.metrics_text)
        self.notifier = Notifier()
        # What is installed does not change while the agent runs: look once, not per status.
        self.runtimes = {k: v or "available" for k, v in availability().items()}
        self.components: list[Component] = []
        # A Jetson's GPU, rails and zones for telemetry and /metrics; silent elsewhere.
        self.accelerator = JetsonTelemetry(
            find_tegrastats(config.jetson.tegrastats),
            config.jetson.interval_ms,
            JetsonSysfs(config.jetson.sysfs_root),
        )
        self._stop = asyncio.Event()
        self._shed_at_overload = 0
        self.exit_code = 0
        # Start-up work that runs beside the loop. Not the loop's executor: asyncio.run
        # joins that on the way out, and SIGTERM must not wait for a bundle's install.
        self._workers: list[threading.Thread] = []

    def add_component(self, component: Component) -> None:
        self.components.append(component)

    # ----------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        model = self.host.model
        return {
            "device_id": self.config.device_id,
            "agent_version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "ready": self.host.ready(),
            "model": None if model is None else model.summary(),
            "memory": {
                **self.budget.as_dict(),
                "rss_mb": round(self.watcher.rss / MB, 1),
                "peak_rss_mb": round(self.watcher.peak / MB, 1),
                "overloaded": self.watcher.overloaded,
                "shed_requests": self.watcher.shed_count,
            },
            "inflight": self.host.inflight,
            "runtimes": self.runtimes,
            "api": self.api.addresses,
            "trusted_keys": [key_id(k) for k in self.keys],
            "metrics": self.metrics.window(reset=False)["total"],
        }

    def metrics_text(self) -> str:
        model = self.host.model
        self.watcher.sample()
        gauges = {
            "edgerun_process_resident_memory_bytes": ("Agent RSS.", float(self.watcher.rss)),
            "edgerun_memory_cap_bytes": ("Effective memory cap.", float(self.budget.cap_bytes)),
            "edgerun_memory_soft_limit_bytes": (
                "RSS above which requests are shed.",
                float(self.budget.soft_limit_bytes),
            ),
            "edgerun_overloaded": ("1 while shedding load.", float(self.watcher.overloaded)),
            "edgerun_shed_requests_total": (
                "Requests refused as overloaded.",
                float(self.watcher.shed_count),
            ),
            "edgerun_inflight_requests": ("Requests being served.", float(self.host.inflight)),
            "edgerun_shm_regions": (
                "System shared-memory regions registered.",
                float(len(self.api.shm)),
            ),
            "edgerun_shm_registered_bytes": (
                "Bytes of the registered shared-memory regions (charged to the headroom).",
                float(self.api.shm.total_bytes),
            ),
            "edgerun_model_ready": ("1 when a model is served.", float(self.host.ready())),
        }
        info = {}
        if model is not None:
            info = {
                "name": model.manifest.name,
                "version": model.manifest.version,
                "sha256": model.sha256,
                "runtime": model.runtime_name,
            }
        families = accelerator_gauges(self.accelerator.read())
        return self.metrics.render_prometheus(gauges, info, families)

    # ----------------------------------------------------------------- lifecycle

    def load_initial_model(self) -> None:
        """Serve what the state dir has, then install `model.bundle` (synchronously)."""
        self.recover_and_serve()
        bundle = self.config.model.bundle
        if bundle is None:
            if self.host.model is None:
                log.warning("no model to serve: set model.bundle or deploy one over MQTT")
            return
        try:
            self.install_configured(Path(bundle))
        except REFUSALS as exc:
            if self.host.model is None:
                raise StartupError(f"cannot serve {bundle}: {exc}", _code(exc)) from exc
            log.warning("keeping %s: %s", self.host.model.manifest.version, exc)

    def recover_and_serve(self) -> Any:
        """End (or mark for resuming) the job the last run left, then serve `current`."""
        self.recovered = recover(self.config, self.journal, self.store, self.events.emit)
        return self.admission.serve_current()

    def install_configured(self, bundle: Path) -> None:
        """Install `model.bundle`; raises one of REFUSALS when it is refused."""
        try:
            # A FIFO or a device there would block the reader, or never end.
            check_regular(bundle)
        except OSError as exc:
            refused = UnreadableBundleError(f"model.bundle {bundle}: {exc.strerror or exc}")
            self.events.emit(
                EventKind.MODEL_REFUSED, str(refused), bundle=str(bundle), code=refused.code
            )
            raise refused from exc
        self.admission.install(bundle)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def workers_running(self) -> bool:
        """True while start-up work (a model load, a bundle install) is still going."""
        return any(t.is_alive() for t in self._workers)

    async def _until_stopped(self, name: str, work: Callable[[], Any]) -> Any:
        """Run `work` on a thread of its own; return its result, or STOPPED at SIGTERM.

        At SIGTERM the thread is abandoned, not joined: what it does is either done
        atomically (the store renames into place) or cleaned at the next start.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def target() -> None:
            try:
                result = work()
            except BaseException as exc:  # handed to the loop, which re-raises it
                loop.call_soon_threadsafe(_settle, done, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        thread = threading.Thread(target=target, name=name, daemon=True)
        self._workers.append(thread)
        thread.start()
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not done.done():
            log.info("stopping while %s is still running; abandoning it", name)
            return STOPPED
        return done.result()

    async def run(self, on_ready: Callable[[], Awaitable[None]] | None = None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self.watcher.start()
        self.traffic.start()
        started = time.perf_counter()
        problems = [p for p in check_api(self.config) if not p.warning]
        if problems:
            raise StartupError("; ".join(str(p) for p in problems), problems[0].code)
        try:
            self.api.start()
        except ApiSetupError as exc:
            self.api.close()
            raise StartupError(str(exc)) from exc
        except OSError as exc:  # lost a race with another process since the check
            self.api.close()
            raise StartupError(f"api: cannot listen: {exc.strerror or exc}") from exc
        # The API answers from here on: 503 model.not_ready until a model is in.
        if await self._until_stopped("load current", self.recover_and_serve) is STOPPED:
            return await self.shutdown()
        # Not one of self.components: those are what can bring a bundle (see
        # _can_receive_bundles). Started here so that a start-up error leaves no child.
        await self.accelerator.start()
        for component in self.components:
            await component.start()
        resume = self.recovered.resume
        if resume is not None:  # after the link started: an MQTT transfer needs it
            self.updates.resume(resume)
        ready_s = time.perf_counter() - started
        bundle = self.config.model.bundle
        what = self._serving()
        log.info("ready in %.3f s: serving %s on %s", ready_s, what, ", ".join(self.api.addresses))
        if bundle is not None:
            what += f"; checking {bundle}"
        # READY=1 does not wait for model.bundle: its check can take minutes on a big
        # bundle (past systemd's start timeout) while `current` is already served.
        self.notifier.ready(f"serving {what}")
        watchdog = asyncio.create_task(self._watchdog())
        # Started before `on_ready` runs: whatever waits for readiness must not hold
        # back the check of model.bundle.
        install = (
            asyncio.create_task(self._install_at_start(Path(bundle)))
            if bundle is not None
            else None
        )
        try:
            if on_ready is not None:
                await on_ready()
            await self._stop.wait()
        finally:
            watchdog.cancel()
            if install is not None:
                self._stop.set()  # already set, unless on_ready raised
                await install  # returns at once once stop is set (_until_stopped)
        return await self.shutdown()

    def _serving(self) -> str:
        model = self.host.model
        return "no model" if model is None else f"{model.manifest.name} {model.manifest.version}"

    async def _install_at_start(self, bundle: Path) -> None:
        """Check and install `model.bundle` beside the serving `current`."""
        result = await self._until_stopped("install model.bundle", lambda: self._try(bundle))
        if isinstance(result, BaseException):
            if self.host.model is None and not self._can_receive_bundles():
                # Nothing to serve and nothing that could bring a bundle: running on
                # would be a device that looks up but never answers.
                log.error("cannot start [%s]: cannot serve %s: %s", _code(result), bundle, result)
                self.exit_code = 1
                self.request_stop()
                return
            log.warning("keeping %s: %s", self._serving(), result)
        if result is not STOPPED:
            self.notifier.status(f"serving {self._serving()}")

    def _try(self, bundle: Path) -> BaseException | None:
        try:
            self.install_configured(bundle)
        except REFUSALS as exc:
            return exc
        except Exception as exc:
            # Not a refusal: a fault of the agent or the machine (disk full, EIO). It
            # is handled as a refusal, with the traceback for developers at debug.
            log.error(
                "installing %s failed: %s", bundle, exc, exc_info=log.isEnabledFor(logging.DEBUG)
            )
            return exc
        return None

    def _can_receive_bundles(self) -> bool:
        return bool(self.components)

    async def _watchdog(self) -> None:
        # Pet the systemd watchdog at half its period, only while the loop is healthy.
        period = self.notifier.watchdog_s
        if not period:
            return  # not run under a systemd watchdog
        while True:
            await asyncio.sleep(period / 2)
            # Alive is not enough: an agent whose accept loop or RSS watcher died is
            # deaf or blind, and systemd should restart it.
            if self.api.healthy() and self.watcher.running:
                self.notifier.watchdog()
            else:
                log.error(
                    "not petting the watchdog: API %s, RSS watcher %s",
                    "ok" if self.api.healthy() else "not accepting",
                    "ok" if self.watcher.running else "stopped",
                )

    def _overload_changed(self, overloaded: bool, rss: int) -> None:
        soft = round(self.budget.soft_limit_bytes / MB, 1)
        if overloaded:
            self._shed_at_overload = self.watcher.shed_count
            self.events.emit(
                EventKind.OVERLOADED,
                f"RSS {rss / MB:.1f} MB is above the soft limit {soft} MB: shedding new requests",
                rss_mb=round(rss / MB, 1),
                soft_limit_mb=soft,
            )
        else:
            shed = self.watcher.shed_count - self._shed_at_overload
            self.events.emit(
                EventKind.OVERLOAD_CLEARED,
                f"RSS {rss / MB:.1f} MB is back under {soft} MB; {shed} request(s) were shed",
                rss_mb=round(rss / MB, 1),
                shed=shed,
            )

    async def shutdown(self) -> int:
        self.notifier.stopping()
        timeout = self.config.api.drain_timeout_s
        loop = asyncio.get_running_loop()
        drained = await loop.run_in_executor(None, self.host.drain, timeout)
        if not drained:
            log.warning(
                "%d request(s) still running after %.1f s; exiting anyway",
                self.host.inflight,
                timeout,
            )
        for component in reversed(self.components):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %r failed", component)
        try:
            await self.accelerator.stop()
        except Exception:
            log.exception("stopping the tegrastats sampler failed")
        self.api.close()
        self.traffic.stop()
        self.host.close()
        self.watcher.stop()
        log.info("stopped")
        return self.exit_code


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _code(exc: BaseException) -> str:
    # Refusals carry their own stable code; anything else is a fault of the agent.
    return str(getattr(exc, "code", START_INTERNAL))

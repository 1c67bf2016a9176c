"""The model being served, and the one path every inference request takes.

Local API, MQTT `infer` command and benchmarks all call `ModelHost.infer`, so
checks, load shedding and metrics are the same wherever a request comes from.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.batching import MicroBatcher
from agent.bundle import Manifest
from agent.config.model import AgentConfig
from agent.errors import (
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    RuntimeFailureError,
    ServingError,
)
from agent.memory import MB, RssWatcher
from agent.metrics import Metrics
from agent.runtimes.base import Feeds, InferenceError, Runtime
from agent.tensors import validate_feeds

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    manifest: Manifest
    runtime: Runtime
    runtime_name: str
    sha256: str
    directory: Path
    loaded_at: float = field(default_factory=time.time)
    golden_diffs: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "sha256": self.sha256,
            "runtime": self.runtime.describe(),
            "loaded_at": self.loaded_at,
        }


class ModelHost:
    def __init__(self, config: AgentConfig, metrics: Metrics, watcher: RssWatcher) -> None:
        self.config = config
        self.metrics = metrics
        self.watcher = watcher
        self._model: LoadedModel | None = None
        self._batcher: MicroBatcher | None = None
        self._lock = threading.Lock()
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self.draining = False

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def batching(self) -> bool:
        return self._batcher is not None

    @property
    def inflight(self) -> int:
        return self._inflight

    def ready(self) -> bool:
        return self._model is not None and not self.draining

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        """Serve `new` from the next request on; in-flight requests finish on the old one."""
        batcher = None
        # The batcher stacks requests on axis 0; a model that counts cases on another
        # axis, or has inputs all cases share, is served one request at a time.
        if self.config.batching.enabled and not new.manifest.batchable:
            log.info(
                "micro-batching off for %s: not every tensor has its batch on axis 0",
                new.manifest.name,
            )
        elif self.config.batching.enabled:
            batcher = MicroBatcher(
                new.runtime.run,
                self.config.batching.max_batch,
                self.config.batching.max_wait_ms,
                on_batch=self.metrics.runtime_call,
            )
        with self._lock:
            old, self._model = self._model, new
            old_batcher, self._batcher = self._batcher, batcher
        if old_batcher is not None:
            old_batcher.close()
        log.info("serving %s %s on %s", new.manifest.name, new.manifest.version, new.runtime_name)
        return old

    def resolve(self, name: str, version: str | None = None) -> LoadedModel:
        model = self._model
        if model is None:
            raise NotReadyError("no model is loaded yet")
        if name != model.manifest.name:
            raise ModelNotFoundError(
                f"model {name!r} is not served here; this device serves {model.manifest.name!r}"
            )
        if version is not None and version != model.manifest.version:
            raise ModelNotFoundError(
                f"version {version!r} of {name!r} is not loaded; serving {model.manifest.version}"
            )
        return model

    def infer(
        self, name: str, feeds: Feeds, version: str | None = None
    ) -> tuple[LoadedModel, Feeds]:
        """Validate, admit (load shedding) and run one request."""
        try:
            model = self.resolve(name, version)
            rows = validate_feeds(model.manifest.inputs, feeds, self.config.api.max_batch_size)
            self._enter()
        except ServingError as exc:
            self.metrics.error(exc.code)
            raise
        try:
            start = time.perf_counter()
            direct = False
            batcher = self._batcher
            try:
                if batcher is not None and model is self._model:
                    out = batcher.submit(feeds, rows)
                else:
                    direct = True
                    out = model.runtime.run(feeds)
            except InferenceError as exc:
                self.metrics.error(RuntimeFailureError.code)
                raise RuntimeFailureError(str(exc)) from exc
            self.metrics.observe(time.perf_counter() - start, rows, rows if direct else None)
            return model, out
        finally:
            self._leave()

    def _enter(self) -> None:
        if self.draining:
            raise NotReadyError("the agent is shutting down")
        if self.watcher.overloaded:
            self.watcher.shed_count += 1
            raise OverloadedError(
                f"overloaded: agent RSS {self.watcher.rss / MB:.1f} MB is above the soft limit "
                f"of {self.watcher.budget.soft_limit_bytes / MB:.1f} MB; retry later"
            )
        with self._lock:
            if self._inflight >= self.config.api.max_inflight:
                raise OverloadedError(
                    f"overloaded: {self._inflight} requests in flight "
                    f"(api.max_inflight = {self.config.api.max_inflight}); retry later"
                )
            self._inflight += 1

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait for in-flight ones; True if all finished."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        with self._lock:
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

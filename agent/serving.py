"""The one owner of what is served, and the one path every inference request takes.

`ModelHost` holds the current *generation*: a loaded model, its runtime and, with
micro-batching on, its batcher, numbered from 1 up. Every request path (local API,
MQTT `infer`, benchmarks) takes a `lease` on the generation it resolves to, and runs
on that generation only. `swap` makes a new generation current for the next lease
and retires the old one; a retired generation is closed (batcher, then runtime) by
its last lease, never under a running request. `swap_cold` frees what is served
before building its replacement (for devices where two models do not fit), and
reopens the old model if the new one is refused. Both take `replacing=N` to swap only
if generation N is still current. Bundle installs, `config.set` (threads, batching)
and the memory rebuild all swap through here; over-the-air updates (trial, shadow,
rollback) build on the same calls: `lease`, `swap`, `swap_cold`,
`Generation.wait_closed`.

`infer` also admits each request against memory: what it will cost (rows x the
per-row cost measured when the model was validated, agent.footprint) must fit in the
headroom under the soft limit, next to what requests already in flight hold.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.batching import BatcherClosedError, MicroBatcher
from agent.bundle import Manifest, Variant
from agent.config.model import AgentConfig, BatchingConfig
from agent.errors import (
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    RuntimeFailureError,
    ServingError,
    TooLargeError,
)
from agent.footprint import Footprint
from agent.memory import MB, RssWatcher, current_rss, release_free_memory
from agent.metrics import Metrics
from agent.runtimes.base import Feeds, InferenceError, Runtime
from agent.tensors import validate_feeds
from agent.variants.report import Selection

log = logging.getLogger(__name__)

# A run expected to need more than this gets the runtime's pools shrunk afterwards
# (Runtime.run_and_release): a burst of big requests then leaves RSS where it was,
# while everyday requests keep the speed of warm pools.
RELEASE_ABOVE_BYTES = 8 * MB


@dataclass
class LoadedModel:
    manifest: Manifest
    runtime: Runtime
    runtime_name: str
    sha256: str
    directory: Path
    loaded_at: float = field(default_factory=time.time)
    golden_diffs: dict[str, float] = field(default_factory=dict)
    # Measured on this device at validation; None when it was not measured.
    footprint: Footprint | None = None
    # The bundle variant this runtime loaded, and why it was chosen (agent/variants/).
    variant: Variant | None = None
    selection: Selection | None = None
    # Set once the runtime is closed (by the last generation that served it).
    closed: threading.Event = field(default_factory=threading.Event, repr=False)
    _holders: int = field(default=0, repr=False)

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "sha256": self.sha256,
            "runtime": self.runtime.describe(),
            "providers": self.runtime.providers(),
            "loaded_at": self.loaded_at,
        }
        # Both figures admission judged by: the measured one and the manifest's claim.
        claimed = self.manifest.peak_memory_mb.get(self.runtime_name)
        if self.variant is not None:
            claimed = self.variant.peak_memory_mb.get(self.runtime_name, claimed)
        if self.footprint is not None:
            summary["memory"] = {**self.footprint.as_dict(), "manifest_peak_mb": claimed}
        if self.variant is not None:
            summary["variant"] = self.variant.id
        if self.selection is not None:
            summary["selection"] = self.selection.to_json()
        return summary

    def request_bytes(self, feeds: Feeds) -> int:
        footprint = self.footprint
        if footprint is None:
            return 0
        nbytes = 0
        for array in feeds.values():
            nbytes += array.nbytes
        return footprint.request_bytes(nbytes)

    def run(self, feeds: Feeds) -> Feeds:
        if self.request_bytes(feeds) >= RELEASE_ABOVE_BYTES:
            return self.runtime.run_and_release(feeds)
        return self.runtime.run(feeds)


class SwapConflictError(Exception):
    """Another swap made a different generation current first; nothing was swapped."""


class SwapTimeoutError(Exception):
    """A cold swap gave up waiting for requests on the old model; nothing was swapped."""

    code = "model.swap_timeout"


class Generation:
    """One model as served, from its swap until its last lease lets go."""

    def __init__(self, number: int, model: LoadedModel, batcher: MicroBatcher | None) -> None:
        self.number = number
        self.model = model
        self.batcher = batcher
        self.users = 0  # guarded by the host's lock
        self.retired = False  # guarded by the host's lock
        self.closing = False  # guarded by the host's lock: closed exactly once
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_closed(self, timeout_s: float | None = None) -> bool:
        """True once retired and released by every lease (the OTA path waits on this
        before it frees the old bundle, or reports a request that never ends)."""
        return self._closed.wait(timeout_s)

    def run(self, feeds: Feeds, rows: int, need: int) -> tuple[Feeds, bool]:
        """Run on this generation (`need`: the request's expected memory); returns
        the outputs and whether it ran unbatched."""
        batcher = self.batcher
        if batcher is not None:
            try:
                return batcher.submit(feeds, rows), False
            except BatcherClosedError:
                pass  # closing hands the request back: run it on the same model
        runtime = self.model.runtime
        if need >= RELEASE_ABOVE_BYTES:
            return runtime.run_and_release(feeds), True
        return runtime.run(feeds), True

    def _closed_by_host(self, last_holder: bool) -> None:
        # Called once, by whoever saw the last user of a retired generation leave.
        if self.batcher is not None:
            self.batcher.close()
        model = self.model
        if last_holder:
            try:
                model.runtime.close()
            except Exception:  # a runtime failing to close must not fail a request
                log.exception("closing %s %s failed", model.manifest.name, model.manifest.version)
            model.closed.set()
        self._closed.set()
        log.info(
            "closed generation %d (%s %s)",
            self.number,
            model.manifest.name,
            model.manifest.version,
        )


class Lease:
    """A request's hold on one generation: it runs there even if a swap happens."""

    __slots__ = ("generation",)

    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    @property
    def model(self) -> LoadedModel:
        return self.generation.model

    @property
    def number(self) -> int:
        return self.generation.number


class _Leasing:
    """The context manager `ModelHost.lease` returns (a class: cheaper per request
    than a generator-based one)."""

    __slots__ = ("_generation", "_host", "_name", "_version")

    def __init__(self, host: ModelHost, name: str | None, version: str | None) -> None:
        self._host = host
        self._name = name
        self._version = version
        self._generation: Generation | None = None

    def __enter__(self) -> Lease:
        self._generation = self._host._acquire(self._name, self._version)
        return Lease(self._generation)

    def __exit__(self, *exc: object) -> None:
        if self._generation is not None:
            generation, self._generation = self._generation, None
            self._host._release(generation)


class RequestObserver(Protocol):
    """Sees every answered or failed request (trial and shadow evaluation watch live
    traffic through this). Called on the request's thread after the answer is known and
    before it is sent: keep it to a few microseconds (count, or copy a sampled request
    onto a queue), never block, never raise. `outputs` is None when the request failed;
    `error` is then the stable code (runtime.failed, ...)."""

    def observe(
        self,
        generation: int,
        model: LoadedModel,
        feeds: Feeds,
        outputs: Feeds | None,
        error: str | None,
        seconds: float,
    ) -> None: ...


class ModelHost:
    def __init__(self, config: AgentConfig, metrics: Metrics, watcher: RssWatcher) -> None:
        self.config = config
        self.metrics = metrics
        self.watcher = watcher
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._current: Generation | None = None
        self._numbers = 0
        self._retiring: list[Generation] = []
        self._inflight = 0
        self._reserved = 0
        self._idle_since: float | None = time.monotonic()
        self._rest_rss = current_rss()  # RSS with the current model loaded and idle
        self.draining = False
        self._swapping: str | None = None  # what a cold swap is loading, while it does
        # New requests wait on this (bounded by update.cold_swap_wait_ms) during a cold
        # swap, and are then served by the new model.
        self._swap_done = threading.Condition(self._lock)
        # Builds a fresh runtime for a served model (set by Admission): rebuilding is
        # the last resort to give back memory a runtime's pools keep.
        self.reopen: Callable[[LoadedModel], LoadedModel] | None = None
        # Copied on write: a request reads the tuple without a lock.
        self._observers: tuple[RequestObserver, ...] = ()
        watcher.reclaimer = self
        watcher.recover_after_s = config.memory.recover_after_s

    # ------------------------------------------------------------------ what is served

    @property
    def model(self) -> LoadedModel | None:
        current = self._current
        return None if current is None else current.model

    @property
    def swapping(self) -> str | None:
        """What a cold swap is loading, while it does (new requests wait for it)."""
        return self._swapping

    @property
    def generation(self) -> int:
        """Number of the current generation; 0 before the first swap."""
        current = self._current
        return 0 if current is None else current.number

    @property
    def batching(self) -> bool:
        current = self._current
        return current is not None and current.batcher is not None

    @property
    def inflight(self) -> int:
        return self._inflight

    def retiring(self) -> list[Generation]:
        """Generations swapped out but still held by a lease."""
        with self._lock:
            return [g for g in self._retiring if not g.closed]

    def ready(self) -> bool:
        return self._current is not None and not self.draining

    def swap(self, new: LoadedModel, replacing: int | None = None) -> LoadedModel | None:
        """Serve `new` from the next lease on and retire what was served; the old
        runtime is closed by the last request still on it. With `replacing`, swap
        only if that generation is still current (else SwapConflictError)."""
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
                new.run,
                self.config.batching.max_batch,
                self.config.batching.max_wait_ms,
                on_batch=self.metrics.runtime_call,
            )
        with self._lock:
            old = self._current
            if replacing is not None and (old is None or old.number != replacing):
                conflict = True
            else:
                conflict = False
                self._numbers += 1
                new._holders += 1
                self._current = Generation(self._numbers, new, batcher)
                if old is not None:
                    old.retired = True
                    self._retiring = [g for g in self._retiring if not g.closed] + [old]
                close_now = old is not None and old.users == 0
        if conflict:
            if batcher is not None:
                batcher.close()
            raise SwapConflictError(
                f"generation {replacing} is no longer served (now {self.generation})"
            )
        if old is not None and close_now:
            self._close(old)
        release_free_memory()
        rss = current_rss()
        same = old is not None and old.model.sha256 == new.sha256
        # The same model rebuilt (or reopened) rests no higher than before: a sample
        # taken while request bodies are still in memory must not shrink the room
        # for good. A different model is measured afresh.
        self._rest_rss = min(self._rest_rss, rss) if same else rss
        log.info(
            "serving %s %s on %s (generation %d)",
            new.manifest.name,
            new.manifest.version,
            new.runtime_name,
            self._numbers,
        )
        return None if old is None else old.model

    def swap_cold(
        self,
        build: Callable[[], LoadedModel],
        what: str,
        timeout_s: float,
        replacing: int | None = None,
    ) -> LoadedModel | None:
        """Free what is served, then build its replacement and serve it: for a device
        where both do not fit at once. Meanwhile new requests get 503
        `model.not_ready` naming `what`; requests in flight finish first, and if they
        do not within `timeout_s` the old model serves on and SwapTimeoutError is
        raised. If `build` raises, the old model is reopened (`reopen`) and served
        again before the error propagates. `replacing` as for `swap`. Returns the
        old model (closed)."""
        with self._lock:
            old = self._current
            if replacing is not None and (old is None or old.number != replacing):
                raise SwapConflictError(
                    f"generation {replacing} is no longer served (now {self.generation})"
                )
            if self._swapping is not None:
                raise SwapConflictError(f"a cold swap to {self._swapping} is under way")
            if old is not None:
                self._swapping = what
                old.retired = True
                close_now = old.users == 0
        if old is None:
            self.swap(build())
            return None
        if close_now:
            self._close(old)
        if not old.wait_closed(timeout_s):
            with self._lock:
                if not old.closing:
                    old.retired = False
                    self._end_swap()
                    raise SwapTimeoutError(
                        f"{old.users} request(s) still running on {old.model.manifest.name} "
                        f"{old.model.manifest.version} after {timeout_s:.1f} s; it keeps "
                        "serving and nothing was swapped"
                    )
            old.wait_closed()  # its last request just let go: closing is under way
        with self._lock:
            self._current = None
        try:
            new = build()
        except BaseException:
            self._restore(old.model)
            raise
        self.swap(new)
        with self._lock:
            self._end_swap()
        return old.model

    def _end_swap(self) -> None:
        """With the lock held: the cold swap is over; wake the requests waiting on it."""
        self._swapping = None
        self._swap_done.notify_all()

    def _restore(self, model: LoadedModel) -> None:
        try:
            if self.reopen is None:
                raise RuntimeError("no way to reopen a model is set")
            again = self.reopen(model)
        except Exception:
            log.exception(
                "cannot reopen %s %s after a failed cold swap; nothing is served",
                model.manifest.name,
                model.manifest.version,
            )
            with self._lock:
                self._end_swap()
            return
        self.swap(again)
        with self._lock:
            self._end_swap()

    def set_batching(self, batching: BatchingConfig) -> bool:
        """Serve the current model with micro-batching per `batching` from the next
        request on: a swap to a new generation of the same model (its runtime is
        shared, the old batcher closes with the old generation). True if swapped."""
        self.config = dataclasses.replace(self.config, batching=batching)
        current = self._current
        if current is None:
            return False
        try:
            self.swap(current.model, replacing=current.number)
        except SwapConflictError:
            return False  # another swap already built the batcher from the new config
        return True

    def lease(self, name: str | None = None, version: str | None = None) -> _Leasing:
        """`with host.lease(name) as lease:` holds the generation serving `name` (any,
        when None) for the block; the lease is taken on entering the block."""
        return _Leasing(self, name, version)

    def _acquire(self, name: str | None, version: str | None) -> Generation:
        with self._lock:
            if self._swapping is not None:
                # A cold swap: wait (bounded) and be served by what comes out of it.
                wait_s = self.config.update.cold_swap_wait_ms / 1000
                self._swap_done.wait_for(lambda: self._swapping is None, wait_s)
            current = self._current
            if self._swapping is not None:
                raise NotReadyError(
                    f"swapping models: {self._swapping} is loading in place of the old one "
                    f"for longer than update.cold_swap_wait_ms = "
                    f"{self.config.update.cold_swap_wait_ms}; retry in a moment"
                )
            if current is None:
                raise NotReadyError("no model is loaded yet")
            if name is not None:
                _check_name(current.model.manifest, name, version)
            current.users += 1
        return current

    def _release(self, generation: Generation) -> None:
        self._finish(generation, None)

    def _close(self, generation: Generation) -> None:
        with self._lock:
            if generation.closing:
                return
            generation.closing = True
            generation.model._holders -= 1
            last = generation.model._holders == 0
        generation._closed_by_host(last)
        release_free_memory()
        # The old model's memory is gone now: requests have that much more room.
        self._rest_rss = min(self._rest_rss, current_rss())

    def pin(self, model: LoadedModel) -> None:
        """Keep `model`'s runtime open after it is swapped out, until `unpin`: an update's
        trial swaps back to it at once on a breach instead of loading it again."""
        with self._lock:
            model._holders += 1

    def unpin(self, model: LoadedModel) -> None:
        with self._lock:
            model._holders -= 1
            last = model._holders == 0
        if last:
            try:
                model.runtime.close()
            except Exception:
                log.exception("closing %s %s failed", model.manifest.name, model.manifest.version)
            model.closed.set()
            release_free_memory()

    def add_observer(self, observer: RequestObserver) -> None:
        with self._lock:
            self._observers = (*self._observers, observer)

    def remove_observer(self, observer: RequestObserver) -> None:
        with self._lock:
            self._observers = tuple(o for o in self._observers if o is not observer)

    def _notify(
        self,
        generation: Generation,
        feeds: Feeds,
        outputs: Feeds | None,
        error: str | None,
        seconds: float,
    ) -> None:
        for observer in self._observers:
            try:
                observer.observe(
                    generation.number, generation.model, feeds, outputs, error, seconds
                )
            except Exception:  # an observer must never fail a request
                log.exception("request observer %r failed", observer)

    def resolve(self, name: str, version: str | None = None) -> LoadedModel:
        current = self._current
        if current is None:
            raise NotReadyError("no model is loaded yet")
        _check_name(current.model.manifest, name, version)
        return current.model

    # ------------------------------------------------------------------ requests

    def infer(
        self, name: str, feeds: Feeds, version: str | None = None
    ) -> tuple[LoadedModel, Feeds]:
        """Validate, admit (load shedding) and run one request."""
        try:
            generation = self._acquire(name, version)  # the lease, taken by hand:
        except ServingError as exc:  # one lock round trip fewer per request
            self._refused(exc)
            raise
        admitted = False
        need = 0
        try:
            model = generation.model
            rows = validate_feeds(model.manifest.inputs, feeds, self.config.api.max_batch_size)
            need = model.request_bytes(feeds)
            self._enter(model, rows, need)
            admitted = True
            start = time.perf_counter()
            try:
                out, direct = generation.run(feeds, rows, need)
            except InferenceError as exc:
                if self._observers:
                    elapsed = time.perf_counter() - start
                    self._notify(generation, feeds, None, RuntimeFailureError.code, elapsed)
                raise RuntimeFailureError(str(exc)) from exc
            elapsed = time.perf_counter() - start
            self.metrics.observe(elapsed, rows, rows if direct else None)
            if self._observers:
                self._notify(generation, feeds, out, None, elapsed)
            return model, out
        except ServingError as exc:
            self._refused(exc)
            raise
        finally:
            self._finish(generation, need if admitted else None)

    def _refused(self, exc: ServingError) -> None:
        self.metrics.error(exc.code)
        # A refused request is activity too: its body was just read and decoded.
        with self._lock:
            if self._inflight == 0:
                self._idle_since = time.monotonic()

    def _enter(self, model: LoadedModel, rows: int, need: int) -> None:
        """Admit a request expected to need `need` bytes, or raise; `_finish` ends it."""
        if self.draining:
            raise NotReadyError("the agent is shutting down")
        watcher = self.watcher
        soft = watcher.budget.soft_limit_bytes
        if watcher.overloaded:
            watcher.shed_count += 1
            raise OverloadedError(
                f"overloaded: agent RSS {watcher.rss / MB:.1f} MB is above the soft limit "
                f"of {soft / MB:.1f} MB; retry later"
            )
        # A big request is judged on RSS now, not the watcher's last sample: bodies
        # that arrived since take memory too.
        rss = max(watcher.rss, current_rss()) if need >= RELEASE_ABOVE_BYTES else watcher.rss
        if need:
            self._check_fits(model, rows, need, soft)
        with self._lock:
            if self._inflight >= self.config.api.max_inflight:
                raise OverloadedError(
                    f"overloaded: {self._inflight} requests in flight "
                    f"(api.max_inflight = {self.config.api.max_inflight}); retry later"
                )
            free = soft - rss - self._reserved
            if need and need > free:
                watcher.shed_count += 1
                raise OverloadedError(
                    f"overloaded: this request of {rows} rows needs about {need / MB:.1f} MB "
                    f"but {max(free, 0) / MB:.1f} MB is free under the soft limit of "
                    f"{soft / MB:.1f} MB (RSS {rss / MB:.1f} MB, {self._reserved / MB:.1f} MB "
                    f"held by {self._inflight} request(s) in flight); retry later"
                )
            self._inflight += 1
            self._reserved += need
            self._idle_since = None

    def _check_fits(self, model: LoadedModel, rows: int, need: int, soft: int) -> None:
        """Refuse for good (413) a request that could not fit even with nothing else running."""
        room = soft - self._rest_rss
        if need <= room:
            return
        fp = model.footprint
        assert fp is not None
        # The rows' own input bytes are resident while they run, too.
        per_row = max(fp.per_row_bytes + fp.input_bytes_per_row, 1)
        most = max(0, int((room - fp.fixed_bytes) // per_row)) if fp.batched else 0
        name = f"{model.manifest.name} {model.manifest.version}"
        advice = (
            f"send at most {most} rows per request" if most else "no request of this model fits"
        )
        raise TooLargeError(
            f"{rows} rows need about {need / MB:.1f} MB of runtime memory for {name} "
            f"({fp.per_row_bytes / MB:.2f} MB a row + {fp.fixed_bytes / MB:.1f} MB, measured "
            f"at validation), more than the {max(room, 0) / MB:.1f} MB that the soft limit of "
            f"{soft / MB:.1f} MB leaves above the agent's {self._rest_rss / MB:.1f} MB at rest; "
            f"{advice} (or raise memory.max_mb / memory.soft_limit_mb)"
        )

    def _finish(self, generation: Generation, need: int | None) -> None:
        """End a request: admitted ones (`need` not None) leave, and the lease ends."""
        with self._lock:
            if need is not None:
                self._inflight -= 1
                self._reserved -= need
                if self._inflight == 0:
                    self._idle_since = time.monotonic()
                    self._idle.notify_all()
            generation.users -= 1
            close = generation.retired and generation.users == 0
        if close:
            self._close(generation)

    # ------------------------------------------------------------------ memory

    def headroom_bytes(self) -> int:
        """What is left under the soft limit beside RSS and what admitted requests
        hold: the figure a request body's size can be judged against before reading."""
        soft = self.watcher.budget.soft_limit_bytes
        return max(0, soft - self.watcher.rss - self._reserved)

    def idle_since(self) -> float | None:
        """monotonic() when the last request ended; None while one runs."""
        return self._idle_since

    def rest_rss(self) -> int:
        return self._rest_rss

    def observe_rest(self, rss: int) -> None:
        """An RSS sampled while idle: what is served rests at most there."""
        self._rest_rss = min(self._rest_rss, rss)

    def reclaim(self) -> bool:
        """Rebuild the current runtime to free what its pools keep; True if rebuilt.

        Hot (the fresh runtime loads next to the old one) when a second session fits
        under the cap; else cold: the old one is closed first and requests arriving
        during the load get 503 `model.not_ready`."""
        current = self._current
        reopen = self.reopen
        if current is None or reopen is None or self.draining or self._swapping:
            return False
        model = current.model
        load = model.footprint.load_bytes if model.footprint is not None else 0
        hot = self.watcher.rss + load < self.watcher.budget.cap_bytes
        try:
            if hot:
                fresh = reopen(model)
                try:
                    self.swap(fresh, replacing=current.number)
                except SwapConflictError:
                    fresh.runtime.close()
                    return False
            else:
                what = f"{model.manifest.name} {model.manifest.version} (rebuilt)"
                self.swap_cold(lambda: reopen(model), what, timeout_s=1.0, replacing=current.number)
        except (SwapTimeoutError, SwapConflictError) as exc:
            log.warning("not rebuilding the runtime to give back memory: %s", exc)
            return False
        except Exception:
            log.exception("rebuilding the runtime to give back memory failed; keeping it")
            return False
        log.warning(
            "rebuilt the %s runtime of %s %s (%s) to give back memory its pools kept",
            model.runtime_name,
            model.manifest.name,
            model.manifest.version,
            "hot" if hot else "cold",
        )
        return True

    # ------------------------------------------------------------------ shutdown

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
        """Retire what is served; it closes now, or when its last lease lets go."""
        with self._lock:
            current, self._current = self._current, None
            if current is None:
                return
            current.retired = True
            close = current.users == 0
        if close:
            self._close(current)


def _check_name(manifest: Manifest, name: str, version: str | None) -> None:
    if name != manifest.name:
        raise ModelNotFoundError(
            f"model {name!r} is not served here; this device serves {manifest.name!r}"
        )
    if version is not None and version != manifest.version:
        raise ModelNotFoundError(
            f"version {version!r} of {name!r} is not loaded; serving {manifest.version}"
        )

"""Memory cap: find the effective limit, admit models against it, watch RSS.

The effective cap is the smallest of the configured `memory.max_mb`, the cgroup
limit (v2 `memory.max` anywhere up the hierarchy, or v1 `memory.limit_in_bytes`)
and physical memory. A model is admitted only if its measured peak plus what the
agent already uses fits; while serving, RSS above the soft limit sheds load.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from agent.config.model import MemoryConfig

log = logging.getLogger(__name__)

MB = 1024 * 1024
# cgroup v1 reports "no limit" as a huge page-aligned number near 2**63.
_V1_UNLIMITED = 1 << 60


class AdmissionError(Exception):
    """A model does not fit under the memory cap; the message carries the numbers."""

    code = "memory.refused"

    def __init__(self, message: str, need_mb: float | None = None, rss_mb: float | None = None):
        super().__init__(message)
        # The figures behind the refusal (an update decides on them whether a cold swap,
        # with the served model released first, would fit).
        self.need_mb = need_mb
        self.rss_mb = rss_mb


@dataclass(frozen=True)
class MemoryBudget:
    cap_bytes: int
    soft_limit_bytes: int
    configured_bytes: int | None
    cgroup_bytes: int | None
    physical_bytes: int

    @property
    def source(self) -> str:
        """Which limit is the binding one, for messages."""
        if self.configured_bytes is not None and self.cap_bytes == self.configured_bytes:
            return "memory.max_mb"
        if self.cgroup_bytes is not None and self.cap_bytes == self.cgroup_bytes:
            return "cgroup"
        return "physical memory"

    def as_dict(self) -> dict[str, float | str | None]:
        return {
            "cap_mb": round(self.cap_bytes / MB, 1),
            "soft_limit_mb": round(self.soft_limit_bytes / MB, 1),
            "configured_mb": None if self.configured_bytes is None else self.configured_bytes // MB,
            "cgroup_mb": None if self.cgroup_bytes is None else round(self.cgroup_bytes / MB, 1),
            "physical_mb": round(self.physical_bytes / MB, 1),
            "binding": self.source,
        }


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("max", ""):
        return None
    try:
        value = int(text)
    except ValueError:
        log.warning("cannot parse cgroup limit %r in %s", text, path)
        return None
    return None if value >= _V1_UNLIMITED else value


def cgroup_limit_bytes(
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
) -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if hierarchy == "0" and controllers == "":
            # cgroup v2: unified tree, mounted at the root or at root/unified (hybrid).
            for base in (cgroup_root, cgroup_root / "unified"):
                if (base / "cgroup.controllers").exists():
                    limits += _walk_up(base, rel, "memory.max")
                    break
        elif "memory" in controllers.split(","):
            limits += _walk_up(cgroup_root / "memory", rel, "memory.limit_in_bytes")
    return min(limits) if limits else None


def _walk_up(base: Path, rel: str, filename: str) -> list[int]:
    found = []
    path = base / rel if rel else base
    while True:
        value = _read_limit(path / filename)
        if value is not None:
            found.append(value)
        if path == base or base not in path.parents:
            break
        path = path.parent
    return found


def compute_budget(
    config: MemoryConfig,
    cgroup_bytes: int | None = None,
    physical_bytes: int | None = None,
    detect_cgroup: bool = True,
) -> MemoryBudget:
    configured = config.max_mb * MB if config.max_mb else None
    cgroup = (
        cgroup_bytes
        if cgroup_bytes is not None
        else (cgroup_limit_bytes() if detect_cgroup else None)
    )
    physical = physical_bytes or psutil.virtual_memory().total
    cap = min(x for x in (configured, cgroup, physical) if x is not None)
    soft = (
        config.soft_limit_mb * MB if config.soft_limit_mb else int(cap * config.soft_limit_fraction)
    )
    return MemoryBudget(cap, min(soft, cap), configured, cgroup, physical)


def current_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def admit(
    model: str,
    peak_mb: float | None,
    budget: MemoryBudget,
    rss_bytes: int,
    measured_mb: float | None = None,
) -> None:
    """Raise AdmissionError unless `rss + need` fits under the cap (not the soft limit:
    the soft limit is headroom for requests, the cap is what the kernel enforces).

    `need` is the larger of the manifest's `peak_mb` and `measured_mb`, what loading
    and validating the model took on this device: a manifest is only a claim."""
    claimed = peak_mb if peak_mb is not None and math.isfinite(peak_mb) and peak_mb > 0 else None
    if claimed is None and measured_mb is None:
        log.warning("bundle %s carries no usable peak memory; admitting on RSS alone", model)
    need_mb = max(claimed or 0.0, measured_mb or 0.0)
    need = rss_bytes + need_mb * MB
    if need > budget.cap_bytes:
        if measured_mb is not None and measured_mb >= (claimed or 0.0):
            why = f"{need_mb:.1f} MB (measured on this device"
            why += f"; its manifest claims {claimed:.1f} MB)" if claimed is not None else ")"
        else:
            why = f"{need_mb:.1f} MB (measured peak)"
        raise AdmissionError(
            f"model {model} needs {why} on top of the agent's "
            f"{rss_bytes / MB:.1f} MB = {need / MB:.1f} MB, above the memory cap of "
            f"{budget.cap_bytes / MB:.1f} MB (set by {budget.source}); keeping the current model",
            need_mb=need_mb,
            rss_mb=rss_bytes / MB,
        )


def admit_device(
    model: str,
    added_bytes: int,
    held_bytes: int,
    cap_bytes: int,
    source: str,
    binding: str,
) -> None:
    """Raise AdmissionError unless the GPU memory this process holds with the
    candidate loaded (`held_bytes`, of which `added_bytes` the candidate's) fits
    under a discrete GPU's `cap_bytes` (`binding` names where the cap comes from)."""
    if cap_bytes <= 0 or held_bytes <= cap_bytes:
        return
    raise AdmissionError(
        f"model {model} takes {added_bytes / MB:.1f} MB of GPU memory (measured on this "
        f"device through {source}), {held_bytes / MB:.1f} MB held in all, above the GPU "
        f"memory cap of {cap_bytes / MB:.1f} MB (set by {binding}); keeping the current model",
        need_mb=added_bytes / MB,
    )


def _load_malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> bool:
    """Hand freed heap pages back to the kernel (glibc keeps them otherwise)."""
    if _MALLOC_TRIM is None:
        return False
    return bool(_MALLOC_TRIM(0))


# glibc serves blocks above this from their own mappings, returned to the kernel on
# free. Its default threshold grows with each large block freed (up to 32 MiB), after
# which request bodies and tensors of a few MB land in per-thread heaps that a burst
# fragments and keeps: measured, RSS stayed 200 MB above rest after one burst of
# 4.9 MB batches, and came back to rest with a fixed 1 MiB threshold.
MMAP_THRESHOLD_BYTES = 1 << 20
# Fixing the mmap threshold also pins the trim threshold at its 128 KB default: every
# request's transient few MB (orjson's parse of a 224x224x3 JSON frame) went back to
# the kernel and was faulted in again by the next one; measured on a request thread,
# decoding that frame took 5.8 ms against 3.1 ms with glibc's defaults. A heap keeps
# this much at its top when trimmed, which keeps them warm; at most ARENA_MAX heaps
# bound what is kept (2 x 16 MB), and the watcher's malloc_trim(0) (above the soft
# limit, or idle well above rest) hands even that back.
TOP_PAD_BYTES = 16 << 20
ARENA_MAX = 2
# mallopt parameter numbers in glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold (see MMAP_THRESHOLD_BYTES), its top pad and arena
    count (TOP_PAD_BYTES, ARENA_MAX); False where not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return (
        bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
        and bool(mallopt(_M_TOP_PAD, TOP_PAD_BYTES))
        and bool(mallopt(_M_ARENA_MAX, ARENA_MAX))
    )


class Reclaimer(Protocol):
    """What holds memory the watcher can ask back (the served-model owner)."""

    def idle_since(self) -> float | None:
        """monotonic() when the last request in flight ended; None while one runs."""
        ...

    def rest_rss(self) -> int:
        """RSS with what is served loaded and nothing running."""
        ...

    def observe_rest(self, rss: int) -> None:
        """RSS sampled while nothing ran for a while."""
        ...

    def reclaim(self) -> bool:
        """Rebuild what keeps freed memory (runtime pools); True if anything was."""
        ...


class RssWatcher:
    """Samples RSS in a background thread; `overloaded` is read on every request.

    Above the soft limit it first hands freed heap back (malloc_trim). When nothing
    has run for `recover_after_s` and RSS is still above the soft limit, or well above
    what the agent takes at rest (so requests would be refused for want of headroom),
    it asks the reclaimer to rebuild the runtime, once per idle period: the agent
    recovers by itself instead of refusing requests until a restart.
    """

    def __init__(
        self, budget: MemoryBudget, interval_s: float, recover_after_s: float = 2.0
    ) -> None:
        self.budget = budget
        self.interval_s = interval_s
        self.recover_after_s = recover_after_s
        self._process = psutil.Process()
        # On unified memory (a Jetson) what the GPU holds for the agent is the same
        # RAM the cap protects: agent.device_memory.unified_counter() gives it, and
        # every reading below counts it with RSS. None elsewhere.
        self.device_bytes: Callable[[], int] | None = None
        self.rss = self._read()
        self.peak = self.rss
        self.overloaded = False
        self.shed_count = 0
        self.reclaims = 0
        self._reclaimed_for: float | None = None  # the idle period last reclaimed in
        self._last_trim = 0.0
        self.reclaimer: Reclaimer | None = None
        # Called from the watcher thread on every transition (overloaded, rss bytes).
        self.on_change: Callable[[bool, int], None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watcher", daemon=True)

    def start(self) -> None:
        tune_allocator()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    @property
    def running(self) -> bool:
        """The sampling thread runs (the watchdog is petted only while it does)."""
        return self._thread.is_alive()

    def _read(self) -> int:
        rss = int(self._process.memory_info().rss)
        counter = self.device_bytes
        return rss + counter() if counter is not None else rss

    def sample(self) -> int:
        self.rss = self._read()
        self.peak = max(self.peak, self.rss)
        was = self.overloaded
        soft = self.budget.soft_limit_bytes
        if self.rss > soft and time.monotonic() - self._last_trim > 1.0:
            # A burst can leave freed-but-kept heap behind; give it back before judging.
            self._last_trim = time.monotonic()
            if release_free_memory():
                self.rss = self._read()
        self._recover(soft)
        self.overloaded = self.rss > soft
        if self.overloaded != was:
            if self.on_change is not None:
                self.on_change(self.overloaded, self.rss)
            log.warning(
                "RSS %.1f MB is %s the soft limit %.1f MB: %s",
                self.rss / MB,
                "above" if self.overloaded else "back under",
                soft / MB,
                "shedding new requests" if self.overloaded else "accepting requests again",
            )
        return self.rss

    def _recover(self, soft: int) -> None:
        reclaimer = self.reclaimer
        if reclaimer is None:
            return
        since = reclaimer.idle_since()
        if since is None or since == self._reclaimed_for:
            return
        if time.monotonic() - since < self.recover_after_s:
            return
        reclaimer.observe_rest(self.rss)
        rest = reclaimer.rest_rss()
        # Slack for what an idle agent legitimately grows by (caches, warm pools).
        slack = max(16 * MB, (soft - rest) // 4)
        if self.rss <= soft and self.rss <= rest + slack:
            return
        self._reclaimed_for = since
        before = self.rss
        release_free_memory()
        self.rss = self._read()
        if self.rss <= soft and self.rss <= rest + slack:
            return
        # Nothing runs and RSS stays up: what is left is kept by the runtime's pools.
        if reclaimer.reclaim():
            self.reclaims += 1
            release_free_memory()
            self.rss = self._read()
            log.warning(
                "idle at RSS %.1f MB (%.1f MB at rest): rebuilt the runtime, RSS now %.1f MB",
                before / MB,
                rest / MB,
                self.rss / MB,
            )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # the watcher must outlive any one bad sample
                log.exception("RSS watcher sample failed")

"""Jetson telemetry for the agent's lifetime: a `tegrastats` child, or /sys, or nothing.

`tegrastats --interval N` runs as a child of the agent: started with it, read line by
line on a thread of its own, restarted with a growing delay if it dies, and killed at
shutdown. Without tegrastats the /sys files are read at each report; with neither
(not a Jetson) the sampler stays silent and every report says nothing about it.

One owner: the latest parsed line lives here, behind a lock; `read()` hands out a copy
with its age.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from agent.hardware.sysfs import JetsonSysfs
from agent.hardware.tegrastats import parse_line
from agent.protocol.accelerator import AcceleratorReport

log = logging.getLogger(__name__)

DEFAULT_TEGRASTATS = Path("/usr/bin/tegrastats")
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
# A child that ran this long before dying was healthy: the next restart is quick again.
HEALTHY_RUN_S = 30.0
KILL_GRACE_S = 2.0
# tegrastats lines are a few hundred bytes; a longer one is not a tegrastats line.
MAX_LINE = 16 * 1024


def find_tegrastats(setting: str) -> Path | None:
    """`auto`: /usr/bin/tegrastats or one on PATH; `off`: none; else that path."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting)
    if os.access(DEFAULT_TEGRASTATS, os.X_OK):
        return DEFAULT_TEGRASTATS
    found = shutil.which("tegrastats")
    return Path(found) if found else None


class JetsonTelemetry:
    """A Component (agent/service.py): start() and stop() with the agent."""

    def __init__(
        self,
        tegrastats: Path | None,
        interval_ms: int = 1000,
        sysfs: JetsonSysfs | None = None,
        backoff_min_s: float = BACKOFF_MIN_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.tegrastats = tegrastats
        self.interval_ms = interval_ms
        self.sysfs = sysfs if sysfs is not None else JetsonSysfs()
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.restarts = 0  # children started after the first (died and replaced)
        self.lines = 0  # lines read from every child
        self.unparsed = 0  # lines that carried no known field
        self._lock = threading.Lock()
        self._latest: tuple[float, AcceleratorReport] | None = None
        self._child: subprocess.Popen[str] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sysfs_present: bool | None = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.start_sync()

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop_sync)

    def start_sync(self) -> None:
        if self._thread is not None:
            return
        self._sysfs_present = self.sysfs.present()
        if self.tegrastats is None:
            if self._sysfs_present:
                log.info("jetson telemetry from /sys (no tegrastats)")
            return  # not a Jetson: nothing to say, nothing logged
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="tegrastats", daemon=True)
        self._thread.start()

    def stop_sync(self) -> None:
        self._stopping.set()
        self._end_child()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=KILL_GRACE_S * 3)

    @property
    def child_pid(self) -> int | None:
        child = self._child
        return None if child is None or child.poll() is not None else child.pid

    # ----------------------------------------------------------------- reading

    def read(self) -> AcceleratorReport | None:
        """The newest figures with their age; None where there is nothing to report."""
        with self._lock:
            latest = self._latest
        stale_after = 3 * self.interval_ms / 1000 + 2.0
        if latest is not None:
            age = time.monotonic() - latest[0]
            if age <= stale_after or not self._sysfs_present:
                return dataclasses.replace(latest[1], age_s=round(age, 3))
        if self._sysfs_present:
            # Read by /metrics and by telemetry alike: a /sys file that reads oddly
            # costs this block, never the whole /metrics reply or the telemetry message.
            try:
                report = self.sysfs.read()
            except Exception:
                log.exception("reading the Jetson's /sys figures failed")
                return None
            return None if report is None else dataclasses.replace(report, age_s=0.0)
        return None

    def _keep(self, line: str) -> None:
        self.lines += 1
        try:
            report = parse_line(line)
        except Exception:  # a line the parser trips on is one unparsed line, not the end
            log.debug("tegrastats: a line the parser refused: %r", line[:200], exc_info=True)
            report = None
        if report is None:
            self.unparsed += 1
            return
        with self._lock:
            self._latest = (time.monotonic(), report)

    # ----------------------------------------------------------------- the child

    def _run(self) -> None:
        assert self.tegrastats is not None
        delay = self.backoff_min_s
        first = True
        while not self._stopping.is_set():
            if not first:
                self.restarts += 1
            first = False
            started = time.monotonic()
            code = self._run_child(self.tegrastats)
            if self._stopping.is_set():
                return
            ran = time.monotonic() - started
            if ran >= HEALTHY_RUN_S:
                delay = self.backoff_min_s
            log.warning("tegrastats %s after %.1f s; restarting in %.1f s", code, ran, delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, self.backoff_max_s)

    def _run_child(self, path: Path) -> str:
        """Run one child to its end; say how it ended."""
        try:
            child = subprocess.Popen(
                [str(path), "--interval", str(self.interval_ms)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                errors="replace",
                bufsize=1,
            )
        except OSError as exc:
            return f"could not start ({exc.strerror or exc})"
        self._child = child
        if self._stopping.is_set():  # stop() ran between the check and the start
            self._end_child()
        assert child.stdout is not None
        with contextlib.suppress(OSError, ValueError):  # the pipe closed under us at stop
            self._read_lines(child.stdout)
        code = child.wait()
        return f"exited with status {code}"

    def _read_lines(self, stream: IO[str]) -> None:
        overlong = False
        while True:
            line = stream.readline(MAX_LINE)
            if not line:
                return
            if not line.endswith("\n") and len(line) == MAX_LINE:
                overlong = True  # skip to the end of this line, in bounded reads
                continue
            if overlong:
                overlong = False
                self.lines += 1
                self.unparsed += 1
                log.debug("tegrastats: a line over %d bytes skipped", MAX_LINE)
                continue
            self._keep(line)

    def _end_child(self) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

"""The tegrastats child: started, read, restarted with backoff when it dies, killed at stop.

No Jetson exists here: the child is a real process (tests/agent/hardware/fake_tegrastats.py)
that prints lines captured on real Jetsons, at the interval it is given.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.hardware.jetson import JetsonTelemetry, find_tegrastats
from agent.hardware.sysfs import JetsonSysfs
from agent.hardware.tegrastats import parse_line
from tests.agent.hardware.fake_tegrastats import SYSFS, TEGRASTATS, alive, started, write_fake

ORIN = TEGRASTATS / "jetpack6-orin-nano.txt"


def wait_until(condition: Callable[[], object], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


@pytest.fixture
def sampler_factory(tmp: Path) -> Iterator[Callable[..., JetsonTelemetry]]:
    made: list[JetsonTelemetry] = []

    def make(script: Path | None, **kwargs: object) -> JetsonTelemetry:
        sysfs = kwargs.pop("sysfs", JetsonSysfs(tmp / "no-sys"))
        sampler = JetsonTelemetry(script, interval_ms=100, sysfs=sysfs, **kwargs)  # type: ignore[arg-type]
        made.append(sampler)
        return sampler

    yield make
    for sampler in made:
        sampler.stop_sync()


def test_reads_the_lines_of_a_real_child_and_kills_it_at_stop(
    tmp: Path, sampler_factory: Callable[..., JetsonTelemetry]
) -> None:
    pids = tmp / "pids"
    sampler = sampler_factory(write_fake(tmp / "tegrastats", ORIN, pids))
    assert sampler.read() is None  # not started: nothing yet
    sampler.start_sync()
    assert wait_until(lambda: sampler.read() is not None)
    report = sampler.read()
    assert report is not None and report.source == "tegrastats"
    expected = [parse_line(line) for line in ORIN.read_text().splitlines() if line]
    assert report.gpu_load_ratio in {e.gpu_load_ratio for e in expected if e is not None}
    assert report.age_s is not None and 0 <= report.age_s < 30
    assert started(pids)[0][1] == "--interval 100"
    assert wait_until(lambda: sampler.lines >= 3)  # one line per interval, read as they come
    pid = started(pids)[0][0]
    assert sampler.child_pid == pid and alive(pid)
    sampler.stop_sync()
    assert not alive(pid)
    assert len(started(pids)) == 1 and sampler.restarts == 0


def test_a_child_that_dies_is_restarted_with_backoff(
    tmp: Path, sampler_factory: Callable[..., JetsonTelemetry], caplog: pytest.LogCaptureFixture
) -> None:
    pids = tmp / "pids"
    script = write_fake(tmp / "tegrastats", ORIN, pids, lines_then_exit=1)
    sampler = sampler_factory(script, backoff_min_s=0.05, backoff_max_s=0.2)
    with caplog.at_level(logging.WARNING, logger="agent.hardware.jetson"):
        sampler.start_sync()
        assert wait_until(lambda: len(started(pids)) >= 4)
        sampler.stop_sync()
    assert sampler.restarts >= 3
    assert all(not alive(pid) for pid, _ in started(pids))
    assert any("exited with status 3" in r.getMessage() for r in caplog.records)
    assert sampler.read() is not None  # the last line read stays (its age says how old)


def test_a_killed_child_is_replaced(
    tmp: Path, sampler_factory: Callable[..., JetsonTelemetry]
) -> None:
    pids = tmp / "pids"
    sampler = sampler_factory(write_fake(tmp / "tegrastats", ORIN, pids), backoff_min_s=0.05)
    sampler.start_sync()
    assert wait_until(lambda: sampler.child_pid is not None and sampler.lines >= 1)
    first = sampler.child_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: len(started(pids)) >= 2 and sampler.child_pid not in (None, first))
    lines = sampler.lines
    assert wait_until(lambda: sampler.lines > lines)  # reading again from the new child


def test_a_tegrastats_that_cannot_start_is_retried_quietly(
    tmp: Path, sampler_factory: Callable[..., JetsonTelemetry], caplog: pytest.LogCaptureFixture
) -> None:
    not_executable = tmp / "tegrastats"
    not_executable.write_text("#!/bin/sh\n")  # mode 0644
    sampler = sampler_factory(not_executable, backoff_min_s=0.05, backoff_max_s=0.1)
    with caplog.at_level(logging.WARNING, logger="agent.hardware.jetson"):
        sampler.start_sync()
        assert wait_until(lambda: sampler.restarts >= 2)
        sampler.stop_sync()
    assert sampler.read() is None
    assert any("could not start" in r.getMessage() for r in caplog.records)


def test_without_tegrastats_the_figures_come_from_sysfs(
    sampler_factory: Callable[..., JetsonTelemetry],
) -> None:
    sampler = sampler_factory(None, sysfs=JetsonSysfs(SYSFS / "orin-nano-jp6"))
    sampler.start_sync()
    report = sampler.read()
    assert report is not None and report.source == "sysfs"
    assert report.power_mw["VDD_IN"] == 4825.0 and report.age_s == 0.0
    assert sampler.child_pid is None


def test_neither_tegrastats_nor_sysfs_says_nothing(
    sampler_factory: Callable[..., JetsonTelemetry], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        sampler = sampler_factory(None)
        sampler.start_sync()
        assert sampler.read() is None
        sampler.stop_sync()
    assert [r for r in caplog.records if r.name.startswith("agent.hardware")] == []


def test_find_tegrastats(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_tegrastats("off") is None
    assert find_tegrastats(str(tmp / "t")) == tmp / "t"
    if os.access("/usr/bin/tegrastats", os.X_OK):  # a Jetson: JetPack's own comes first
        assert find_tegrastats("auto") == Path("/usr/bin/tegrastats")
        return
    # "auto" finds one on PATH, and none where PATH has none.
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert find_tegrastats("auto") is None
    fake = bin_dir / "tegrastats"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_tegrastats("auto") == fake


def test_an_endless_line_is_skipped_in_bounded_reads(
    tmp: Path, sampler_factory: Callable[..., JetsonTelemetry]
) -> None:
    # Not tegrastats at all: 1 MB without a newline, then a real line, then it stays.
    script = tmp / "tegrastats"
    line = ORIN.read_text().splitlines()[0]
    script.write_text(
        f"#!{sys.executable}\nimport sys, time\n"
        f"sys.stdout.write('x' * 1_000_000 + '\\n' + {line!r} + '\\n'); sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    script.chmod(0o755)
    sampler = sampler_factory(script)
    sampler.start_sync()
    assert wait_until(lambda: sampler.read() is not None)
    assert sampler.unparsed == 1 and sampler.lines == 2
    report = sampler.read()
    assert report is not None and report.gpu_load_ratio == 0.63


def test_check_config_refuses_a_tegrastats_that_cannot_run(tmp: Path) -> None:
    from tests.helpers import base_config, write_config

    not_executable = tmp / "tegrastats"
    not_executable.write_text("#!/bin/sh\n")
    cases = {
        f'tegrastats = "{not_executable}"': "jetson.tegrastats: ",
        f'tegrastats = "{tmp / "missing"}"': "is not a file",
        f'sysfs_root = "{tmp / "nowhere"}"': "jetson.sysfs_root: ",
    }
    for line, expected in cases.items():
        config = write_config(tmp / "agent.toml", base_config(tmp, extra=f"[jetson]\n{line}\n"))
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "check-config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 1 and expected in out.stdout, out.stdout + out.stderr
        assert "[config.invalid]" in out.stdout and "Traceback" not in out.stderr
    write_fake(not_executable, ORIN, tmp / "pids")  # now executable
    config = write_config(
        tmp / "agent.toml", base_config(tmp, extra=f'[jetson]\ntegrastats = "{not_executable}"\n')
    )
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr

"""The systemd unit: valid, hardened, and what it runs works as systemd would run it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DEMO_PUB

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd/edgerun-agent.service"


def _staged_unit(tmp: Path) -> Path:
    # Point ExecStart at the edge-agent this checkout installed, so verify can check it.
    exe = shutil.which("edge-agent")
    assert exe is not None, "edge-agent is not on PATH (pip install -e .)"
    text = UNIT.read_text().replace("/usr/local/bin/edge-agent", exe)
    unit = tmp / UNIT.name
    unit.write_text(text)
    return unit


def test_unit_verifies(tmp: Path) -> None:
    out = subprocess.run(
        ["systemd-analyze", "verify", str(_staged_unit(tmp))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "edgerun-agent.service" not in out.stderr, out.stderr  # no warnings about our unit


def test_unit_is_hardened(tmp: Path) -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(_staged_unit(tmp))],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.0, out.stdout


def test_unit_declares_notify_watchdog_and_memory_limits() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "MemoryMax=",
        "MemoryHigh=",
        "StateDirectory=edgerun",
        "LoadCredential=",
        "NoNewPrivileges=yes",
        "User=edgerun",
    ):
        assert line in text, line


def test_example_config_with_credentials_passes_check_config(tmp: Path) -> None:
    creds = tmp / "creds"
    creds.mkdir()
    shutil.copy(DEMO_PUB, creds / "release.pub")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "check-config",
            str(ROOT / "systemd/agent.toml.example"),
        ],
        capture_output=True,
        text=True,
        env={"CREDENTIALS_DIRECTORY": str(creds), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "check-config",
            str(ROOT / "systemd/agent.toml.example"),
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert missing.returncode == 1 and "CREDENTIALS_DIRECTORY is not set" in missing.stdout


def test_install_script_stages_files(tmp: Path) -> None:
    if shutil.which("install") is None:
        pytest.fail("coreutils install is missing")
    out = subprocess.run(
        ["sh", str(ROOT / "systemd/install.sh"), "--root", str(tmp / "root")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    staged = tmp / "root"
    assert (staged / "usr/lib/systemd/system/edgerun-agent.service").read_text() == UNIT.read_text()
    assert (staged / "usr/lib/sysusers.d/edgerun.conf").exists()
    config = (staged / "etc/edgerun/agent.toml").read_text()
    assert "demo-INSECURE" not in config  # nothing trusts the demo key by default

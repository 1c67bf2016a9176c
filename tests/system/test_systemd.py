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
JETSON = ROOT / "systemd/edgerun-agent.service.d/jetson.conf"


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


def _unit_value(key: str) -> str:
    values = re.findall(rf"^{key}=(\S+)", UNIT.read_text(), re.MULTILINE)
    assert len(values) == 1, (key, values)
    return values[0]


def test_unit_limits_agree_with_the_api_config() -> None:
    """LimitNOFILE= and TasksMax= leave room for api.max_connections of the shipped config."""
    from agent.api.limits import needed_fds, needed_tasks
    from agent.config.loader import load_config

    config = load_config(ROOT / "systemd/agent.toml.example", environ={})
    assert int(_unit_value("LimitNOFILE")) >= needed_fds(config.api)
    assert int(_unit_value("TasksMax")) >= needed_tasks(config.api)


def test_unit_and_config_agree_on_who_may_use_the_socket() -> None:
    from agent.config.loader import load_config

    api = load_config(ROOT / "systemd/agent.toml.example", environ={}).api
    assert str(api.socket).startswith("/run/edgerun/")  # RuntimeDirectory=edgerun
    assert api.socket_group == _unit_value("Group") == "edgerun"
    assert api.socket_mode == "0660"
    # Group members must be able to reach the socket inside RuntimeDirectory.
    assert int(_unit_value("RuntimeDirectoryMode"), 8) & 0o050 == 0o050
    # The unit keeps TCP on loopback unless a token and an address allow list are set.
    assert "IPAddressDeny=any" in UNIT.read_text() and not api.tcp


def _staged_with_jetson(tmp: Path) -> Path:
    unit = _staged_unit(tmp)
    drop_ins = tmp / f"{UNIT.name}.d"
    drop_ins.mkdir()
    shutil.copy(JETSON, drop_ins / JETSON.name)
    return unit


def test_jetson_drop_in_verifies_and_is_applied(tmp: Path) -> None:
    unit = _staged_with_jetson(tmp)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    # verify names the file of every key it ignores (a typo, a path not under /dev/).
    assert "jetson.conf" not in out.stderr and UNIT.name not in out.stderr, out.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    # The drop-in was read: devices are open now, and the rest of the hardening holds.
    assert re.search(r"✗ PrivateDevices=", security), security
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security)
    assert match and float(match.group(1)) <= 2.0, security


def test_jetson_drop_in_opens_only_the_gpu_nodes() -> None:
    text = JETSON.read_text()
    allowed = re.findall(r"^DeviceAllow=(\S+) (\S+)$", text, re.MULTILINE)
    assert {"/dev/nvmap", "/dev/nvgpu/igpu0/ctrl", "/dev/nvhost-ctrl-gpu"} <= {
        p for p, _ in allowed
    }
    assert all(
        p.startswith("/dev/nv") or p.startswith(("/dev/dri/render", "/dev/host1x"))
        for p, _ in allowed
    )
    assert all(mode == "rw" for _, mode in allowed)  # no mknod
    for line in ("PrivateDevices=no", "DevicePolicy=closed", "ProcSubset=all"):
        assert re.search(rf"^{line}$", text, re.MULTILINE), line
    assert "video" in re.findall(r"^SupplementaryGroups=(.*)$", text, re.MULTILINE)[0].split()


def test_install_script_stages_the_jetson_drop_in(tmp: Path) -> None:
    staged = tmp / "root"
    for args, present in (([], False), (["--jetson"], True)):
        out = subprocess.run(
            ["sh", str(ROOT / "systemd/install.sh"), "--root", str(staged), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        drop_in = staged / "etc/systemd/system/edgerun-agent.service.d/jetson.conf"
        assert drop_in.exists() is present
    assert drop_in.read_text() == JETSON.read_text()

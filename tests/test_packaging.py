"""The device install stays small: no torch, optimum or TensorFlow, in metadata or imports."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "optimum", "tensorflow", "transformers", "jax", "litert-torch", "onnx")


def test_device_extra_resolves_without_heavy_packages(tmp_path: Path) -> None:
    # A real resolution against the package index, as a fresh device would do it.
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            f"{ROOT}[device,litert]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {
        "onnxruntime",
        "numpy",
        "psutil",
        "paho-mqtt",
        "cryptography",
        "ai-edge-litert",
        "orjson",
    } <= names
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


def test_pins_and_extras() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    assert "torch==2.13.0" in extras["export"]
    for name in ("device", "litert", "export", "test"):
        for req in extras[name]:
            assert any(op in req for op in ("==", "<")), f"{name}: {req} is not pinned"
    scripts = meta["scripts"]
    assert set(scripts) == {"edge-agent", "edge-export", "edge-fleet"}


def test_agent_imports_no_heavy_module() -> None:
    code = (
        "import sys, agent.cli, agent.service, agent.api.server, agent.runtimes, agent.bundle\n"
        "from agent.runtimes import load_runtime\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == ""

"""The device agent on emulated aarch64: scripts/aarch64_smoke.sh under qemu-user.

Installs nothing on the host: the arm64 python3.11 sysroot, a qemu-aarch64 binary and the
aarch64 wheels are cached under $EDGERUN_AARCH64_CACHE (default ~/.cache/edgerun/aarch64).
A cold cache needs the Debian archive and PyPI (about a minute); a warm one under a minute
in all. See docs/aarch64.md.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scripts/aarch64_smoke.sh"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(platform.system() != "Linux", reason="qemu-user emulation needs Linux")
def test_agent_serves_the_sample_bundle_on_emulated_aarch64() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(SMOKE)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"aarch64 smoke failed (exit {proc.returncode}):\n{out[-6000:]}"
    assert "PASSED on emulated aarch64" in proc.stdout, out[-6000:]
    for runtime in ("onnxruntime", "litert"):
        assert f"{runtime}: SIGTERM -> exit 0" in proc.stdout, out[-6000:]
    # The figures, for `pytest -s` and for the log of a failing neighbour.
    print("\n".join(line for line in proc.stdout.splitlines() if "aarch64_smoke:" in line))

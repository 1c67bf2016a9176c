"""The console writer (`edge-fleet index`) builds an index a device accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.signing import load_public_key
from agent.update.index import IndexGuard
from tests.helpers import DEMO_KEY, DEMO_PUB, ROOT, SAMPLE_BUNDLE


def _index(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "fleet.cli",
        "index",
        "--key",
        str(DEMO_KEY),
        "--trust",
        str(DEMO_PUB),
    ]
    args += ["--base-url", "https://releases.example/models/", "--out", str(out), *extra]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


def test_edge_fleet_index_writes_an_index_the_device_accepts(tmp_path: Path) -> None:
    out = tmp_path / "index.json"
    run = _index(out, str(SAMPLE_BUNDLE))
    assert run.returncode == 0, run.stderr
    assert "counter 0" in run.stdout
    guard = IndexGuard(tmp_path / "state", [load_public_key(DEMO_PUB)])
    (tmp_path / "state").mkdir()
    index = guard.accept(out.read_bytes())
    [release] = index.releases
    assert (release.name, release.version) == ("digits", "1.0.0")
    assert release.size == SAMPLE_BUNDLE.stat().st_size
    assert release.url == "https://releases.example/models/digits-1.0.0.edgebundle"
    # Publishing again raises the counter, so devices take the new index.
    run = _index(out, str(SAMPLE_BUNDLE))
    assert run.returncode == 0, run.stderr
    assert guard.accept(out.read_bytes()).counter == 1
    # A counter that does not grow is refused on the console already.
    run = _index(out, "--counter", "1", str(SAMPLE_BUNDLE))
    assert run.returncode == 2 and "must exceed 1" in run.stderr
    assert json.loads(out.read_text())["signed"]["counter"] == 1


def test_edge_fleet_index_refuses_a_bundle_no_device_would_accept(tmp_path: Path) -> None:
    bad = tmp_path / "bad.edgebundle"
    bad.write_bytes(b"not a bundle")
    run = _index(tmp_path / "index.json", str(bad))
    assert run.returncode == 2 and "edge-fleet index:" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "index.json").exists()
    run = _index(tmp_path / "index.json", "--min-agent-version", "nope", str(SAMPLE_BUNDLE))
    assert run.returncode == 2 and "min_agent_version" in run.stderr, run.stderr

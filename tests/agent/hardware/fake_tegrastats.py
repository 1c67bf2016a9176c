"""A stand-in for NVIDIA's tegrastats that prints real captured lines (no Jetson here).

`write_fake(path, fixture, ...)` writes an executable script that, run as
`<script> --interval MS`, records its pid and argv, then prints the fixture's lines
(captured on real Jetsons: tests/agent/fixtures/tegrastats/*.SOURCE) one per interval,
cycling, like tegrastats does; `lines_then_exit` makes it die after that many lines.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TEGRASTATS = FIXTURES / "tegrastats"
SYSFS = FIXTURES / "jetson_sysfs"

_SCRIPT = """#!{python}
import itertools, os, sys, time
with open({pids!r}, "a") as f:
    f.write(f"{{os.getpid()}} {{' '.join(sys.argv[1:])}}\\n")
assert sys.argv[1] == "--interval", sys.argv
interval = int(sys.argv[2]) / 1000
lines = [l for l in open({fixture!r}).read().splitlines() if l]
for n, line in enumerate(itertools.cycle(lines)):
    if {limit} and n >= {limit}:
        sys.exit(3)
    print(line, flush=True)
    time.sleep(interval)
"""


def write_fake(path: Path, fixture: Path, pids: Path, lines_then_exit: int = 0) -> Path:
    path.write_text(
        _SCRIPT.format(
            python=sys.executable, pids=str(pids), fixture=str(fixture), limit=lines_then_exit
        )
    )
    path.chmod(0o755)
    return path


def started(pids: Path) -> list[tuple[int, str]]:
    """(pid, argv) of every fake started so far."""
    if not pids.exists():
        return []
    out = []
    for row in pids.read_text().splitlines():
        pid, _, argv = row.partition(" ")
        out.append((int(pid), argv))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"

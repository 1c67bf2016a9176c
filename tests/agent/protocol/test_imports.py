"""agent.protocol imports without the agent's runtime dependencies (what a console has)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BLOCKED = ("numpy", "psutil", "paho", "onnxruntime", "ai_edge_litert", "tflite_runtime")

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    for name in {blocked!r}:
        sys.modules[name] = None  # `import numpy` now raises ImportError
    import agent.protocol
    names = sorted(m.name for m in pkgutil.iter_modules(agent.protocol.__path__))
    for name in names:
        importlib.import_module("agent.protocol." + name)
    import agent.signing
    # What they pulled in: none of the agent's runtime modules.
    loaded = sorted(m for m in sys.modules if m.startswith("agent."))
    print(" ".join(names))
    print(" ".join(loaded))
    """
)


def test_every_protocol_module_imports_without_runtime_dependencies() -> None:
    code = SCRIPT.format(blocked=BLOCKED)
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    names, loaded = (line.split() for line in done.stdout.splitlines())
    assert {"events", "messages", "state", "topics", "update"} <= set(names)
    runtime = {"agent.service", "agent.link", "agent.serving", "agent.runtimes", "agent.bundle"}
    assert not [m for m in loaded if m in runtime or m.split(".")[:2] == ["agent", "link"]]

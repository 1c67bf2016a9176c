"""Coverage-guided fuzz harnesses (atheris) for the parsers that take bytes from outside.

Each harness is a script ``tests/fuzz/fuzz_<target>.py`` runnable on its own
(``python tests/fuzz/fuzz_bundle.py -runs=100000``, any libFuzzer flag) that
raises only when the parser breaks its contract (an exception outside its error
root, or a crash). ``run_harness`` runs one for a bounded number of inputs in a
child process, which is what the tests in ``make test`` do; long campaigns are
run by hand and what they find becomes a regression case in the hostile corpus.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def run_harness(
    name: str,
    runs: int,
    max_len: int,
    seeds: list[bytes] | None = None,
    workdir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `tests/fuzz/fuzz_<name>.py` for `runs` inputs (seeded corpus in `workdir`)."""
    args = [sys.executable, str(HERE / f"fuzz_{name}.py"), f"-runs={runs}", f"-max_len={max_len}"]
    args += ["-seed=1", "-print_final_stats=1"]  # fixed seed: the same inputs every CI run
    if workdir is not None:
        corpus = workdir / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds or []):
            (corpus / f"seed-{i}").write_bytes(seed)
        args.append(str(corpus))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        args, check=False, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )


__all__ = ["run_harness"]

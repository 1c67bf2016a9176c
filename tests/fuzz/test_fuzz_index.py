"""A bounded atheris run of the release index parser (a few seconds)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from agent.update.index import Release, build_index
from tests.fuzz import run_harness
from tests.fuzz.fuzz_index import KEY


def _seeds() -> list[bytes]:
    later = datetime(2030, 1, 1, tzinfo=UTC)
    good = build_index(
        [Release("digits", "1.2.0", "ab" * 32, 4096, "https://h.example/d-1.2.0.edgebundle"),
         Release("digits", "1.3.0", "cd" * 32, 9, "http://h/x", "0.1.0")],
        7, later, KEY,
    )  # fmt: skip
    expired = build_index([], 1, datetime(2020, 1, 1, tzinfo=UTC), KEY)
    compact = json.dumps(json.loads(good), separators=(",", ":")).encode()
    return [good, expired, compact, b'{"signed": {}, "sig": ""}', b"[" * 10]


def test_index_parser_holds_its_contract(tmp_path: Path) -> None:
    out = run_harness("index", runs=3000, max_len=2048, seeds=_seeds(), workdir=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "Done 3000 runs" in out.stderr, out.stderr[-2000:]

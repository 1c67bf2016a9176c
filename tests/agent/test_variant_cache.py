"""STATE/variant-choice.json is only ever replaced whole: `put` and `forget` alike.

Real files in a temporary state directory; the failing write is a real one (a file
size limit in a child process, as a full disk would fail it), not a mock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent.variants.cache import FILENAME, ChoiceCache

ROOT = Path(__file__).resolve().parents[2]


def record(chosen: str) -> dict[str, object]:
    return {"chosen": chosen, "results": [{"id": chosen, "pad": "x" * 200}], "batch": 1}


def filled(state: Path) -> ChoiceCache:
    cache = ChoiceCache(state)
    for i in range(4):
        cache.put(f"key-{i}", record(f"variant-{i}"))
    return cache


def test_forget_replaces_the_file_so_an_open_reader_keeps_the_whole_old_one(
    tmp_path: Path,
) -> None:
    cache = filled(tmp_path)
    before = cache.path.read_bytes()
    with cache.path.open("rb") as reader:  # a reader that opened it before the write
        inode = os.fstat(reader.fileno()).st_ino
        cache.forget("key-1")
        # Written in place, the reader would see a truncated or the new document.
        assert reader.read() == before
    assert cache.path.stat().st_ino != inode
    assert cache.get("key-1") is None and cache.get("key-2") is not None
    assert [p.name for p in tmp_path.iterdir()] == [FILENAME]  # no temporary file left


def test_a_forget_whose_write_fails_leaves_the_old_file_whole(tmp_path: Path) -> None:
    cache = filled(tmp_path)
    before = cache.path.read_bytes()
    # A file size limit below the new document: its write fails part way (EFBIG), as
    # on a full disk. In place, the file would be left truncated at the limit.
    child = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from agent.variants.cache import ChoiceCache\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))\n"
        "ChoiceCache(Path(sys.argv[1])).forget('key-1')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)],
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "cannot write" in done.stderr  # the write really failed
    assert cache.path.read_bytes() == before
    assert json.loads(before)["entries"]["key-1"]["chosen"] == "variant-1"
    assert cache.get("key-1") is not None
    assert [p.name for p in tmp_path.iterdir()] == [FILENAME]


def test_a_crashed_writers_temporary_is_removed_at_start(tmp_path: Path) -> None:
    from agent.atomicfile import temp_prefix

    cache = ChoiceCache(tmp_path)
    cache.put("k", {"chosen": "a", "results": [], "batch": 1})
    leftover = tmp_path / f"{temp_prefix(cache.path)}0123456789abcdef.tmp"
    leftover.write_bytes(b'{"half": ')  # what a crash mid-write leaves
    other = tmp_path / "unrelated.tmp"
    other.write_bytes(b"x")
    again = ChoiceCache(tmp_path)
    assert not leftover.exists() and other.exists()
    assert again.get("k") is not None

"""agent.atomicfile.write_atomic replaces a file whole, with the mode asked, and leaves no
temporary file behind when it fails.

Real files in a temporary directory; the failing writes are real ones (a file size
limit in a child process, as a full disk would fail it; a rename over a directory).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.atomicfile import remove_stale_temps, temp_prefix, write_atomic

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_target_is_replaced_whole_and_an_open_reader_keeps_the_old_bytes(
    tmp_path: Path,
) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"old content")
    with target.open("rb") as reader:
        old_inode = os.fstat(reader.fileno()).st_ino
        write_atomic(target, b"new and longer content")
        assert reader.read() == b"old content"  # the old inode, untouched
    assert target.read_bytes() == b"new and longer content"
    assert target.stat().st_ino != old_inode
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_empty_data_and_no_fsyncs_still_write_the_bytes(tmp_path: Path) -> None:
    target = tmp_path / "bitmap"
    write_atomic(target, b"x" * 10)
    write_atomic(target, b"", fsync=False, fsync_dir=False)
    assert target.read_bytes() == b""
    big = os.urandom(3 << 20)  # more than one os.write may take
    write_atomic(target, big, fsync=False, fsync_dir=False)
    assert target.read_bytes() == big


@pytest.mark.parametrize(("mode", "expected"), [(0o600, 0o600), (0o644, 0o644), (0o666, 0o644)])
@pytest.mark.usefixtures("umask_022")
def test_the_new_file_has_the_mode_asked_under_the_umask(
    tmp_path: Path, mode: int, expected: int
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"before")
    os.chmod(target, 0o640)  # the old file's mode does not carry over
    write_atomic(target, b"after", mode=mode)
    assert mode_of(target) == expected
    assert target.read_bytes() == b"after"


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "update.json"
    write_atomic(target, b"the old record")
    child = (
        "import errno, resource, signal, sys\n"
        "from pathlib import Path\n"
        "from agent.atomicfile import write_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    write_atomic(Path(sys.argv[1]), b'n' * 4096)\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode[exc.errno])\n"
        "    sys.exit(0)\n"
        "sys.exit('the write did not fail')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child, str(target)],
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "EFBIG"  # the write really failed, past 100 bytes
    assert target.read_bytes() == b"the old record"
    assert [p.name for p in tmp_path.iterdir()] == ["update.json"]


def test_a_rename_that_fails_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_bytes(b"")  # a non-empty directory: the rename must fail
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in target.iterdir()] == ["inside"]


def test_a_missing_directory_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "file", b"data")
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_temps_removes_only_that_files_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "update.json"
    write_atomic(target, b"{}")
    prefix = temp_prefix(target)
    leftovers = [tmp_path / f"{prefix}0123abcd.tmp", tmp_path / f"{prefix}tmp"]
    others = [
        tmp_path / ".update.jsonx.1.tmp",  # another file's temporary
        tmp_path / f"{prefix}1.part",  # not a temporary
        tmp_path / "update.json.tmp",  # not hidden: not one of ours
    ]
    for p in leftovers + others:
        p.write_bytes(b"torn")
    removed = remove_stale_temps(target)
    assert sorted(removed) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["update.json", *(p.name for p in others)]
    )
    assert remove_stale_temps(tmp_path / "nowhere" / "f") == []

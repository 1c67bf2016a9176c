""".ci/run starts PostgreSQL when it is down, and says what is wrong when it cannot.

The machine's real server is shared by every test, so it is never stopped here: the
script's `start_postgres` runs against stand-ins for pg_isready / pg_lsclusters /
pg_ctlcluster on a PATH that holds nothing else of PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKES = {
    # Ready once the "server" was started (the marker file exists).
    "pg_isready": '[ -e "$FAKE_DIR/started" ]',
    "pg_lsclusters": (
        'echo "15 main 5432 down postgres /var/lib/postgresql/15/main '
        '/var/log/postgresql/postgresql-15-main.log"'
    ),
    "pg_ctlcluster": (
        'echo "$@" >> "$FAKE_DIR/calls"; [ -e "$FAKE_DIR/broken" ] || touch "$FAKE_DIR/started"'
    ),
}


def _path(tmp: Path, fakes: bool) -> str:
    """A PATH with the shell tools the function uses (and the fakes, if asked)."""
    tools = tmp / "tools"
    tools.mkdir(exist_ok=True)
    for name in ("bash", "dirname", "seq", "sleep", "touch"):
        target = tools / name
        if not target.exists():
            found = shutil.which(name)
            assert found, name
            target.symlink_to(found)
    if fakes:
        for name, body in FAKES.items():
            script = tools / name
            script.write_text(f"#!/bin/sh\n{body}\n")
            script.chmod(0o755)
    return str(tools)


def start_postgres(
    tmp: Path, *, fakes: bool = True, wait_s: int = 5
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": _path(tmp, fakes), "FAKE_DIR": str(tmp), "PG_WAIT_S": str(wait_s)}
    return subprocess.run(
        [shutil.which("bash") or "/bin/bash", "-c", "source .ci/run && start_postgres"],
        cwd=ROOT,
        env={**env, "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_running_server_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "started").touch()
    done = start_postgres(tmp_path)
    assert done.returncode == 0, done
    assert not (tmp_path / "calls").exists()


def test_a_stopped_cluster_is_started_and_waited_for(tmp_path: Path) -> None:
    done = start_postgres(tmp_path)
    assert done.returncode == 0, done
    assert (tmp_path / "calls").read_text().split() == ["15", "main", "start"]
    assert "accepts connections" in done.stdout


def test_a_server_that_never_starts_fails_with_a_hint(tmp_path: Path) -> None:
    (tmp_path / "broken").touch()
    done = start_postgres(tmp_path, wait_s=1)
    assert done.returncode != 0
    assert "did not start" in done.stderr and "/var/log/postgresql" in done.stderr


def test_missing_postgresql_says_what_to_install(tmp_path: Path) -> None:
    done = start_postgres(tmp_path, fakes=False)
    assert done.returncode != 0
    assert "apt-get install postgresql" in done.stderr

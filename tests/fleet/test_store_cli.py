"""`edge-fleet history` and `edge-fleet db status|migrate` on a real SQLite file and the
machine's PostgreSQL, through the CLI's own entry point (no broker needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.cli import main
from fleet.ports import NewRecord, RecordKind
from fleet.store import open_store
from fleet.store.migrations import load
from tests.pg import fresh_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "fleet.db")
    else:
        with fresh_database() as pg:
            yield pg


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = cli(capsys, "--json", *argv)
    return code, json.loads(out)


def test_db_status_then_migrate(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    latest = len(load("sqlite"))
    if url.startswith("postgresql://"):
        code, out = cli_json(capsys, "--db", url, "db", "status")
        assert code == 0 and out["schema_version"] == 0 and len(out["pending"]) == latest
    else:
        code, out, _ = cli(capsys, "--db", url, "db", "status")
        assert code == 0 and "no record" in out
        assert not Path(url).exists()  # status does not create the file
    code, text, _ = cli(capsys, "--db", url, "db", "migrate")
    assert code == 0 and f"schema version 0 -> {latest}" in text
    code, out = cli_json(capsys, "--db", url, "db", "migrate")
    assert code == 0 and out["applied"] == [] and out["schema_version"] == latest
    code, text, _ = cli(capsys, "--db", url, "db", "status")
    assert code == 0 and "up to date" in text


def test_history_shows_who_what_when_result(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with open_store(url) as store:
        store.append(
            [
                NewRecord(RecordKind.ROLLOUT_CREATED, {"bundle": "digits-1.1.0"}, "r-1"),
                NewRecord(RecordKind.DEVICE_STARTED, {"job": "j-1"}, "r-1", "dev-1"),
                NewRecord(
                    RecordKind.GATE_RESULT,
                    {"gate": "p95_ms", "figure": 3.2, "limit": 2.4, "passed": False},
                    "r-1",
                    "dev-1",
                    "failed",
                ),
                NewRecord(RecordKind.COMMAND_SENT, {"name": "ping"}, None, "dev-2", "ok"),
            ],
            who=("ab12cd34", "alice"),
        )
    code, text, _ = cli(capsys, "--db", url, "history")
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["SEQ", "WHEN", "(UTC)", "WHO"]
    assert len(lines) == 5
    assert "alice (ab12cd34)" in lines[3] and "gate.result" in lines[3] and "failed" in lines[3]

    code, out = cli_json(capsys, "--db", url, "history", "--device", "dev-1")
    assert code == 0
    assert [r["kind"] for r in out["records"]] == ["device.started", "gate.result"]
    assert out["records"][1]["data"]["figure"] == 3.2
    assert out["records"][1]["operator"] == "alice"

    # The latest N, oldest first; kinds by comma or repeated.
    code, out = cli_json(capsys, "--db", url, "history", "--limit", "2")
    assert [r["kind"] for r in out["records"]] == ["gate.result", "command.sent"]
    code, out = cli_json(
        capsys, "--db", url, "history", "--kind", "rollout.created,gate.result", "--rollout", "r-1"
    )
    assert [r["kind"] for r in out["records"]] == ["rollout.created", "gate.result"]
    code, _, err = cli(capsys, "--db", url, "history", "--rollout", "nope")
    assert code == 2 and "console.not_found" in err


def test_bad_input_is_refused_with_a_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "fleet.db")
    code, _, err = cli(capsys, "--db", db, "history", "--kind", "rollout.exploded")
    assert code == 2 and "[console.bad_input]" in err and "gate.result" in err
    code, out, _ = cli(capsys, "--db", db, "history", "--limit", "0", "--json")
    assert code == 2 and json.loads(out)["error"]["code"] == "console.bad_input"
    code, _, err = cli(capsys, "--db", "mysql://x/y", "history")
    assert code == 2 and "[console.config]" in err


def test_history_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "typo.db"
    code, _, err = cli(capsys, "--db", str(missing), "history")
    assert code == 2 and "[console.not_found]" in err and str(missing) in err
    assert not missing.exists()


def test_too_new_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    db = tmp_path / "fleet.db"
    open_store(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 'future', 0)")
    conn.close()
    code, out = cli_json(capsys, "--db", str(db), "db", "status")
    assert code == 0 and out["too_new"] and out["schema_version"] == 99
    code, _, err = cli(capsys, "--db", str(db), "db", "migrate")
    assert code == 2 and "[console.store]" in err and "99" in err
    code, _, err = cli(capsys, "--db", str(db), "history")
    assert code == 2 and "newer than this edge-fleet" in err


def test_db_from_fleet_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "from-toml.db"
    config = tmp_path / "fleet.toml"
    config.write_text(f'db = "{db}"\n')
    code, _, _ = cli(capsys, "--config", str(config), "db", "migrate")
    assert code == 0 and db.is_file()


def test_no_traceback_reaches_the_operator(tmp_path: Path) -> None:
    from tests.mqtt_broker import free_port

    corrupt = tmp_path / "fleet.db"
    corrupt.write_bytes(b"not sqlite " * 100)
    for db in (str(corrupt), f"postgresql://ops:pw@127.0.0.1:{free_port()}/fleet"):
        done = subprocess.run(
            [sys.executable, "-m", "fleet.cli", "--db", db, "history"],
            cwd=ROOT,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("edge-fleet: [console.store]")


def test_fresh_databases_are_apart() -> None:
    # tests/pg.py: each call is its own database, dropped afterwards.
    with fresh_database() as a, fresh_database() as b:
        assert a != b
        with open_store(a) as store:
            store.append([NewRecord(RecordKind.COMMAND_SENT)], who=("k", uuid.uuid4().hex))
        with open_store(b) as store:
            assert store.records() == []


def test_fleet_extra_is_pinned_and_the_device_stays_small() -> None:
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    fleet = extras["fleet"]
    names = {req.split("[")[0].split("==")[0] for req in fleet}
    assert {"rich", "psycopg", "starlette", "uvicorn"} <= names
    assert all("==" in req for req in fleet), fleet  # every console package pinned exactly
    # Nothing of the console reaches a device install.
    assert not any(req.split("[")[0].split("==")[0] in names for req in extras["device"])
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "migrations/*/*.sql" in package_data["package-data"]["fleet.store"]
    makefile = (ROOT / "Makefile").read_text()
    assert "'.[device,litert,export,test,fleet]'" in makefile

"""The rollout commands as an operator runs them: real `edge-fleet` processes against a real
mosquitto and simulated devices, the record on SQLite and PostgreSQL.

- a console SIGKILLed during wave 2 leaves its lease to lapse; `edge-fleet rollout resume`
  from another console takes it over, asks the devices mid-update for their job and
  finishes the rollout, every device updated once;
- pause and resume from a second console while the first drives;
- `rollout rollback` of a finished rollout, and `rollback --to` of a device directly;
- wrong input is refused with a code and a message, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.ports import RecordKind
from fleet.simulate import Simulator
from fleet.store import SqlStore, open_store
from tests.fleet._sim import quick_sim, sample_bundle_v2
from tests.helpers import DEMO_PUB, SampleParts
from tests.mqtt_broker import Broker
from tests.pg import pg_database_fixture

ROOT = Path(__file__).resolve().parents[2]
pg_db = pg_database_fixture()


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("record") / "fleet.db")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """The kill-and-resume test runs on both records; the rest on SQLite (the code
    paths above the store are the same, and test_rollout.py covers both)."""
    return sqlite_url if request.param == "sqlite" else str(request.getfixturevalue("pg_db"))


@contextlib.contextmanager
def opened(url: str) -> Iterator[SqlStore]:
    s = open_store(url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def bundle_path(
    tmp_path_factory: pytest.TempPathFactory, sample_parts: SampleParts, demo_key: Any
) -> Path:
    return sample_bundle_v2(tmp_path_factory.mktemp("bundle"), sample_parts, demo_key)


class Fleet:
    """`edge-fleet` with this test's fleet.toml and record."""

    def __init__(self, config: Path, db: str) -> None:
        self.base = [sys.executable, "-m", "fleet.cli", "--config", str(config), "--db", db]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.base, *args], check=False, capture_output=True, text=True, timeout=timeout, env=self.env,
            cwd=ROOT,
        )  # fmt: skip

    def start(self, *args: str) -> Background:
        proc = subprocess.Popen(
            [*self.base, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.env, cwd=ROOT,
        )  # fmt: skip
        return Background(proc)


class Background:
    """A running `edge-fleet` whose stdout lines are collected as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def wait_for(
    pred: Callable[[], Any], timeout: float, what: str, proc: Background | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"edge-fleet exited ({proc.proc.returncode}) before {what}")
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def console_toml(fleet_toml: Callable[..., Path], tmp_path: Path) -> Path:
    return fleet_toml(tmp_path / "console", timeout_s=5)


@pytest.fixture
def fleet(console_toml: Path, sqlite_url: str) -> Fleet:
    return Fleet(console_toml, sqlite_url)


@pytest.fixture
def store(sqlite_url: str) -> Iterator[SqlStore]:
    with opened(sqlite_url) as s:
        yield s


@pytest.fixture
def sim_factory(broker: Broker, console_pub: Path) -> Iterator[Callable[..., Simulator]]:
    started: list[Simulator] = []

    def make(n: int, **kw: Any) -> Simulator:
        group, options = quick_sim(console_pub, "c")
        options.update(kw)
        sim = Simulator(broker.host, broker.port, n, **options)
        sim.__enter__()
        started.append(sim)
        sim.group = group  # type: ignore[attr-defined]
        return sim

    yield make
    for sim in started:
        sim.close()


def deploy_args(bundle: Path, sim: Simulator, *extra: str) -> list[str]:
    return [
        "deploy", str(bundle), "--to", f"group:{sim.group}",  # type: ignore[attr-defined]
        "--canary", "2", "--wave", "25%", "--soak", "0.3", "--device-timeout", "20",
        "--gate", "p95_ms<=1.2x,error_rate<=0.01", "--trust", str(DEMO_PUB),
        "--lease-ttl", "1", "--http-host", "127.0.0.1", *extra,
    ]  # fmt: skip


def rollout_of(bg: Background) -> str:
    line = wait_for(
        lambda: next((j for j in bg.json_lines() if j.get("kind") == "rollout.created"), None),
        30,
        "the rollout to be created",
    )
    return str(line["rollout_id"])


def served(sim: Simulator, device: str) -> str:
    return str(sim.state(device)["model"]["version"])


def test_a_console_killed_in_wave_two_is_resumed_by_another(
    console_toml: Path, any_url: str, sim_factory: Callable[..., Simulator], bundle_path: Path
) -> None:
    fleet = Fleet(console_toml, any_url)
    with opened(any_url) as store:
        killed_and_resumed(fleet, store, sim_factory, bundle_path)


def killed_and_resumed(
    fleet: Fleet, store: SqlStore, sim_factory: Callable[..., Simulator], bundle_path: Path
) -> None:
    sim = sim_factory(12)
    wave2 = sorted(sim.device_ids)[5:8]  # waves of 2 (canary), 3, 3, 3, 1
    # Wave 2's trial lasts 3 s: its devices are mid-update when the console dies.
    sim.set_knobs(wave2, latency={"trial": 3.0})
    first = fleet.start("--json", *deploy_args(bundle_path, sim))
    try:
        rid = rollout_of(first)
        wait_for(
            lambda: any(
                r.data["wave"] == 2
                for r in store.records(rollout_id=rid, kinds=[RecordKind.WAVE_STARTED])
            ),
            60,
            "wave 2 to start",
            first,
        )
        wait_for(
            lambda: store.records(rollout_id=rid, kinds=[RecordKind.DEVICE_STARTED], limit=99)[5:],
            30,
            "a device of wave 2 to start",
            first,
        )
    finally:
        first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    killed_at = store.records(rollout_id=rid)[-1].seq
    # The lease lapses (1 s, by the database's clock); another console, started at once,
    # waits for that and takes over.
    second = fleet.run(
        "--json", "--operator", "bob", "rollout", "resume", rid, "--wait", "20",
        "--trust", str(DEMO_PUB),
        "--lease-ttl", "1", "--http-host", "127.0.0.1", "--bundle-path", str(bundle_path),
        timeout=90,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])["summary"]
    assert summary["outcome"] == "succeeded" and summary["devices"] == {"succeeded": 12}
    assert all(served(sim, d) == "2.0.0" for d in sim.device_ids)
    records = store.records(rollout_id=rid)
    drivers = [r for r in records if r.kind is RecordKind.DRIVER_TOOK_OVER]
    assert len(drivers) == 2 and drivers[0].data["holder"] != drivers[1].data["holder"]
    assert drivers[1].operator == "bob" and drivers[1].seq > killed_at
    # Every device was started once and updated by that one job (none deployed twice).
    started = {r.device_id: r.data["job"] for r in records if r.kind is RecordKind.DEVICE_STARTED}
    assert len([r for r in records if r.kind is RecordKind.DEVICE_STARTED]) == 12
    for dev in sim.device_ids:
        assert sim.state(dev)["update"]["job"] == started[dev], dev
    outcomes = [r for r in records if r.kind is RecordKind.DEVICE_OUTCOME]
    assert sorted(str(r.device_id) for r in outcomes) == sorted(sim.device_ids)
    assert {r.data["message"] for r in outcomes} == {"committed"}
    # The new driver asked the devices that were mid-update for their job.
    asked = {
        r.device_id
        for r in store.records(kinds=[RecordKind.COMMAND_SENT], after_seq=killed_at)
        if r.data.get("name") == "update.status" and r.operator == "bob"
    }
    assert asked and asked <= set(wave2)


def test_ctrl_c_leaves_the_rollout_to_be_resumed_at_once(
    fleet: Fleet, store: SqlStore, sim_factory: Callable[..., Simulator], bundle_path: Path
) -> None:
    sim = sim_factory(4, latency={"trial": 0.5})
    driver = fleet.start("--json", *deploy_args(bundle_path, sim, "--lease-ttl", "60"))
    try:
        rid = rollout_of(driver)
        wait_for(
            lambda: store.records(rollout_id=rid, kinds=[RecordKind.DEVICE_STARTED]),
            30,
            "the canary to start",
            driver,
        )
        driver.proc.send_signal(signal.SIGINT)
        rc, err = driver.wait(30)
    finally:
        driver.kill()
    assert rc == 130 and "Traceback" not in err
    assert store.lease(f"rollout:{rid}") is None  # released, not left to lapse (60 s)
    resumed = fleet.run("--json", "rollout", "resume", rid, "--trust", str(DEMO_PUB),
                        "--http-host", "127.0.0.1", timeout=90)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["summary"]["outcome"] == "succeeded"
    assert all(served(sim, d) == "2.0.0" for d in sim.device_ids)


def test_pause_and_resume_from_a_second_console(
    fleet: Fleet, store: SqlStore, sim_factory: Callable[..., Simulator], bundle_path: Path
) -> None:
    sim = sim_factory(8, latency={"trial": 0.3})
    # The waves after the canary take a while: the pause (a process of its own) lands
    # well before the end even on a busy machine.
    sim.set_knobs(sorted(sim.device_ids)[2:], latency={"trial": 1.0})
    driver = fleet.start("--json", *deploy_args(bundle_path, sim))
    try:
        rid = rollout_of(driver)
        wait_for(
            lambda: store.records(rollout_id=rid, kinds=[RecordKind.WAVE_STARTED]),
            30,
            "the canary wave",
        )
        paused = fleet.run("--operator", "carol", "rollout", "pause", rid, "--reason", "lunch")
        assert paused.returncode == 0, paused.stderr
        assert f"pause requested for {rid}; driven by" in paused.stdout
        wait_for(
            lambda: store.records(rollout_id=rid, kinds=[RecordKind.ROLLOUT_PAUSED]),
            30,
            "the driver to pause",
        )

        # The devices in flight finish; no new one starts while paused.
        def settled() -> bool:
            started = store.records(rollout_id=rid, kinds=[RecordKind.DEVICE_STARTED])
            ended = store.records(rollout_id=rid, kinds=[RecordKind.DEVICE_OUTCOME])
            return len(started) == len(ended)

        wait_for(settled, 30, "the devices in flight to finish", driver)
        started = len(store.records(rollout_id=rid, kinds=[RecordKind.WAVE_STARTED]))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # bounded: a driver ignoring the pause starts one
            assert len(store.records(rollout_id=rid, kinds=[RecordKind.WAVE_STARTED])) == started
            time.sleep(0.05)
        shown = fleet.run("--json", "rollout", "show", rid)
        assert json.loads(shown.stdout)["paused"] is True
        # One driver at a time: another console cannot take a live lease.
        taken = fleet.run("--json", "rollout", "drive", rid, "--lease-ttl", "1")
        assert taken.returncode == 2
        error = json.loads(taken.stdout)["error"]
        assert (
            error["code"] == "console.lease_held"
            and f"rollout {rid} is driven by" in error["message"]
        )
        resumed = fleet.run("--operator", "carol", "rollout", "resume", rid)
        assert resumed.returncode == 0, resumed.stderr
        rc, err = driver.wait(60)
    finally:
        driver.kill()
    assert rc == 0, err
    records = store.records(rollout_id=rid)
    kinds = [r.kind for r in records]
    i_paused = kinds.index(RecordKind.ROLLOUT_PAUSED)
    i_resumed = kinds.index(RecordKind.ROLLOUT_RESUMED)
    assert RecordKind.WAVE_STARTED not in kinds[i_paused:i_resumed]
    request = next(r for r in records if r.kind is RecordKind.PAUSE_REQUESTED)
    assert request.operator == "carol" and request.data["reason"] == "lunch"
    assert all(served(sim, d) == "2.0.0" for d in sim.device_ids)


def test_rollout_rollback_and_a_direct_rollback(
    fleet: Fleet, store: SqlStore, sim_factory: Callable[..., Simulator], bundle_path: Path
) -> None:
    sim = sim_factory(3)
    ids = sorted(sim.device_ids)
    done = fleet.run("--json", *deploy_args(bundle_path, sim, "--canary", "1", "--wave", "2"))
    assert done.returncode == 0, done.stderr
    rid = json.loads(done.stdout.strip().splitlines()[-1])["summary"]["rollout_id"]
    assert all(served(sim, d) == "2.0.0" for d in ids)
    listed = fleet.run("rollout", "list")
    assert rid in listed.stdout and "succeeded" in listed.stdout
    # Roll the finished rollout back: every device it updated, to its own previous version.
    back = fleet.run("rollout", "rollback", rid, "--reason", "regression", "--lease-ttl", "1")
    assert back.returncode == 0, back.stdout + back.stderr
    assert "rolled back to 1.0.0" in back.stdout
    assert all(served(sim, d) == "1.0.0" for d in ids)
    shown = json.loads(fleet.run("--json", "rollout", "show", rid).stdout)
    assert shown["outcome"] == "rolled_back" and shown["devices"] == {"rolled_back": 3}
    # A direct rollback of one device (to the version it keeps as previous), recorded.
    direct = fleet.run("--json", "rollback", "--to", ids[0], "--wait", "30")
    assert direct.returncode == 0, direct.stderr
    result = json.loads(direct.stdout.strip().splitlines()[0])
    assert result == {**result, "device_id": ids[0], "ok": True, "to_version": "2.0.0"}
    assert served(sim, ids[0]) == "2.0.0"
    recorded = store.records(device_id=ids[0], kinds=[RecordKind.DEVICE_ROLLED_BACK])
    assert recorded[-1].rollout_id is None and recorded[-1].result == "ok"
    # Nothing left to roll back on that device's other versions: refused by the device.
    again = fleet.run("rollback", "--to", ids[1], "--version", "9.9.9", "--wait", "30")
    assert again.returncode == 1 and "update.no_such_version" in again.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--gate", "p99<=2x"], "console.bad_input", "unknown metric 'p99'; known metrics"),
        (["--canary", "0%"], "console.bad_input", "canary must be a share above 0%"),
        (["--window", "line-2=25:00-01:00"], "console.bad_input", "00:00 to 23:59"),
        (["--success", "most"], "console.bad_input", "--success must be a share"),
        (["--to", "group:"], "console.bad_input", "group:NAME"),
    ],
)
def test_bad_plans_are_refused_before_anything_is_sent(
    fleet: Fleet, bundle_path: Path, args: list[str], code: str, needle: str
) -> None:
    base = ["deploy", str(bundle_path), "--to", "all", "--trust", str(DEMO_PUB)]
    done = fleet.run("--json", *base, *args)
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error["code"] == code and needle in error["message"]
    assert "Traceback" not in done.stderr and f"[{code}]" in done.stderr


def test_bad_bundles_keys_and_ids_are_refused(
    fleet: Fleet, tmp_path: Path, bundle_path: Path
) -> None:
    junk = tmp_path / "junk.edgebundle"
    junk.write_bytes(b"not a tar archive at all")
    cases = [
        (["deploy", str(tmp_path / "nope.edgebundle"), "--to", "all", "--trust", str(DEMO_PUB)],
         "console.bundle", "no such file"),
        (["deploy", str(junk), "--to", "all", "--trust", str(DEMO_PUB)],
         "console.bundle", "does not verify"),
        (["deploy", str(bundle_path), "--to", "all"], "console.bundle", "--trust release.pub"),
        (["deploy", str(bundle_path), "--to", "all", "--trust", str(junk)],
         "console.bad_input", "not a PEM public key"),
        (["deploy", str(bundle_path), "--to", "never-seen", "--trust", str(DEMO_PUB)],
         "console.unknown_device", "--to never-seen: no such device was seen"),
        (["deploy", str(bundle_path), "--to", "group:empty-group", "--trust", str(DEMO_PUB)],
         "console.bad_input", "no device of group 'empty-group'"),
        (["--key", str(tmp_path / "no.key"), "deploy", str(bundle_path), "--to", "all",
          "--trust", str(DEMO_PUB)], "console.config", "no.key"),
        (["rollout", "show", "r-nope"], "console.not_found", "no rollout 'r-nope'"),
        (["rollout", "pause", "r-nope"], "console.not_found", "rollout list"),
        (["rollback", "--to", "all"], "console.bad_input", "rollback --to all is refused"),
        (["rollback", "--to", "x", "--version", "v1"], "console.bad_input", "--version"),
    ]  # fmt: skip
    for args, code, needle in cases:
        done = fleet.run("--json", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        error = json.loads(done.stdout)["error"]
        assert error["code"] == code and needle in error["message"], (args, error)
        assert "Traceback" not in done.stderr


def test_the_rollout_table_of_fleet_toml(
    console_toml: Path, sqlite_url: str, sim_factory: Callable[..., Simulator], bundle_path: Path
) -> None:
    wrong = console_toml.with_name("wrong.toml")
    wrong.write_text(console_toml.read_text() + "[rollout]\nsoak = 5\n")
    done = Fleet(wrong, sqlite_url).run("--json", "deploy", str(bundle_path), "--to", "all")
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "console.config" and "unknown key(s) soak" in error["message"]
    assert "soak_s" in error["message"]  # the known keys are named
    # Defaults from the table: the trusted key, the soak, the HTTP host.
    good = console_toml.with_name("good.toml")
    good.write_text(
        console_toml.read_text()
        + f'[rollout]\ntrust = ["{DEMO_PUB}"]\nsoak_s = 0.2\nhttp_host = "127.0.0.1"\n'
    )
    sim = sim_factory(2)
    ran = Fleet(good, sqlite_url).run(
        "--json", "deploy", str(bundle_path), "--to", f"group:{sim.group}",  # type: ignore[attr-defined]
        "--gate", "error_rate<=0.01", "--lease-ttl", "1",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    created = json.loads(ran.stdout.splitlines()[0])
    assert created["kind"] == "rollout.created" and created["data"]["plan"]["soak_s"] == 0.2

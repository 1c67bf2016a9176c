"""The dashboard's JSON API over a real socket: a uvicorn server in this process over
simulated devices on a real mosquitto, a real FleetView and an SQLite record
(tests/fleet/dashboard/_server.py). Paging at 2,000 devices runs on a broker of its own
so the two fleets never mix."""

from __future__ import annotations

import dataclasses
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.canonical import sign_body
from agent.protocol.messages import EventMessage, dumps
from agent.protocol.topics import DeviceTopics
from fleet.dashboard.app import create_app
from fleet.dashboard.devlog import DeviceLog
from fleet.dashboard.rollouts import rollout_json
from fleet.dashboard.rows import ROW_FIELDS, SORT_FIELDS, health_class, stale_after
from fleet.ports import DeviceRow, RecordKind
from fleet.rollout.bundle import BundleInfo
from tests.fleet.dashboard._server import DashboardServer, serve_app
from tests.mqtt_broker import Broker, free_port
from tests.pg import pg_database_fixture

SECURITY = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}
RETENTION_S = 4.0
pg_db = pg_database_fixture()


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("static")
    (d / "index.html").write_text("<!doctype html><title>fleet</title>")
    (d / "device.html").write_text("<!doctype html><title>device</title>")
    (d / "js").mkdir()
    (d / "js" / "app.js").write_text("export const x = 1;\n")
    return d


@pytest.fixture(scope="module")
def dash(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory, static_dir: Path
) -> Iterator[DashboardServer]:
    """20 devices; telemetry kept RETENTION_S and pruned every 0.25 s."""
    options = {"static_dir": static_dir, "retention_s": RETENTION_S, "prune_s": 0.25,
               "telemetry_flush_s": 0.2}  # fmt: skip
    with DashboardServer(broker, tmp_path_factory.mktemp("api"), app_options=options) as d:
        yield d


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardServer]:
    """2,000 devices on 20 connections, on a broker of their own."""
    with (
        Broker(tmp_path_factory.mktemp("big-broker")) as b,
        DashboardServer(
            b, tmp_path_factory.mktemp("big"), devices=2000, connections=20,
            telemetry_interval_s=2.0, groups=("a", "b", "c", "d"),
        ) as d,
    ):  # fmt: skip
        yield d


def _wait(pred: Any, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


# --------------------------------------------------------------------------- devices


def test_devices_lists_every_device_with_the_row_fields(dash: DashboardServer) -> None:
    # Telemetry arrives every 0.5 s: wait until every device has figures.
    assert _wait(
        lambda: all(r["p95_ms"] is not None for r in dash.get_json("/api/devices")[1]["rows"])
    )
    status, body = dash.get_json("/api/devices")
    assert status == 200
    assert (body["total"], body["offset"], body["limit"]) == (20, 0, 100)
    assert body["groups"] == ["line-1", "line-2"]
    ids = [r["device_id"] for r in body["rows"]]
    assert ids == sorted(dash.sim.device_ids)
    row = body["rows"][0]
    assert set(row) == {*ROW_FIELDS, "age_s", "health_class"}
    assert row["online"] is True and row["model_version"] == "1.0.0"
    assert row["groups"] == ["line-1"]
    assert 0 <= row["age_s"] < 30
    assert {r["health_class"] for r in body["rows"]} == {"ok"}
    assert isinstance(row["rss_mb"], float) and isinstance(row["live"], dict)


def test_filter_by_group_and_search(dash: DashboardServer) -> None:
    _, body = dash.get_json("/api/devices?group=line-2")
    assert body["total"] == 10
    assert all("line-2" in r["groups"] for r in body["rows"])
    assert body["groups"] == ["line-1", "line-2"]  # all groups, for the filter menu
    _, body = dash.get_json("/api/devices?q=DEV-001")  # case-insensitive, in the id
    assert [r["device_id"] for r in body["rows"]] == [f"dev-001{i}" for i in range(10)]
    _, body = dash.get_json("/api/devices?q=digits")  # the model name
    assert body["total"] == 20
    _, body = dash.get_json("/api/devices?q=nothing-like-this")
    assert (body["total"], body["rows"]) == (0, [])
    _, body = dash.get_json("/api/devices?group=no-such-group")
    assert body["total"] == 0


@pytest.mark.parametrize(
    ("query", "param", "allowed"),
    [
        ("sort=bogus", "sort", list(SORT_FIELDS)),
        ("sort=groups", "sort", list(SORT_FIELDS)),
        ("desc=2", "desc", ["0", "1"]),
        ("limit=0", "limit", None),
        ("limit=1001", "limit", None),
        ("limit=ten", "limit", None),
        ("offset=-1", "offset", None),
    ],
)
def test_bad_parameters_are_400_naming_what_is_allowed(
    dash: DashboardServer, query: str, param: str, allowed: list[str] | None
) -> None:
    status, body = dash.get_json(f"/api/devices?{query}")
    assert status == 400
    err = body["error"]
    assert err["code"] == "console.bad_input" and err["param"] == param
    if allowed is not None:
        assert err["allowed"] == allowed
        assert all(a in err["message"] for a in allowed)
    else:
        assert "1-1000" in err["message"] or "0-" in err["message"]


def test_paging_sorting_and_filtering_at_2000_devices(big: DashboardServer) -> None:
    status, first = big.get_json("/api/devices?limit=1000")
    _, second = big.get_json("/api/devices?limit=1000&offset=1000")
    _, beyond = big.get_json("/api/devices?limit=100&offset=1950")
    assert status == 200 and first["total"] == second["total"] == 2000
    ids = [r["device_id"] for r in first["rows"] + second["rows"]]
    assert ids == sorted(big.sim.device_ids) and len(set(ids)) == 2000
    assert len(beyond["rows"]) == 50 and beyond["rows"][-1]["device_id"] == ids[-1]
    _, desc = big.get_json("/api/devices?limit=5&desc=1")
    assert [r["device_id"] for r in desc["rows"]] == ids[::-1][:5]
    # By a figure, highest first; devices without one (no report yet) at the end.
    assert _wait(lambda: sum(r.p95_ms is not None for r in big.view.rows()) >= 1000, 30)
    _, by_p95 = big.get_json("/api/devices?sort=p95_ms&desc=1&limit=1000&group=b")
    assert by_p95["total"] == 500 and all("b" in r["groups"] for r in by_p95["rows"])
    figures = [r["p95_ms"] for r in by_p95["rows"]]
    known = [f for f in figures if f is not None]
    assert known == sorted(known, reverse=True) and len(known) >= 100
    assert figures == known + [None] * (len(figures) - len(known))
    _, asc = big.get_json("/api/devices?sort=p95_ms&limit=3&group=b")
    assert asc["rows"][0]["p95_ms"] <= asc["rows"][-1]["p95_ms"]
    _, found = big.get_json("/api/devices?q=dev-0199&sort=health_class")
    assert [r["device_id"] for r in found["rows"]] == ["dev-0199"]


# --------------------------------------------------------------------------- one device


def test_unknown_device_is_404_json(dash: DashboardServer) -> None:
    for path in ("/api/devices/nobody", "/api/devices/nobody/telemetry"):
        status, body = dash.get_json(path)
        assert status == 404
        assert body["error"]["code"] == "console.unknown_device"
        assert "nobody" in body["error"]["message"]
    status, body = dash.get_json("/api/no-such-endpoint")
    assert status == 404 and body["error"]["code"] == "dashboard.not_found"


def test_device_detail_has_its_row_events_and_models(dash: DashboardServer) -> None:
    device = "dev-0005"
    # A command signed by a key the device does not trust: it emits `command.refused`.
    now = time.time()
    command = {"id": uuid.uuid4().hex, "name": "ping", "args": {}, "issued_at": now,
               "expires_at": now + 60, "to": device}  # fmt: skip
    forged = dumps(sign_body(command, Ed25519PrivateKey.generate()))
    dash.client.publish(DeviceTopics(device).command("ping"), forged)
    assert _wait(lambda: dash.get_json(f"/api/devices/{device}")[1]["events"])
    status, body = dash.get_json(f"/api/devices/{device}")
    assert status == 200
    assert body["row"]["device_id"] == device and body["row"]["health_class"] in ("ok", "warn")
    event = body["events"][-1]
    assert set(event) == {"ts", "kind", "reason", "data"}
    assert event["kind"] == "command.refused" and event["data"]["id"] == command["id"]
    assert event["data"]["code"].startswith("command.")
    assert body["models"][-1]["version"] == "1.0.0" and body["models"][-1]["via"] is None


def test_telemetry_is_kept_in_columns_and_pruned(dash: DashboardServer) -> None:
    device = "dev-0003"
    assert _wait(lambda: len(dash.get_json(f"/api/devices/{device}/telemetry")[1]["ts"]) >= 3)
    status, cols = dash.get_json(f"/api/devices/{device}/telemetry")
    assert status == 200
    names = ("ts", "p95_ms", "rate_per_s", "error_rate", "rss_mb", "temperature_c")
    assert set(cols) == set(names)
    assert len({len(cols[k]) for k in names}) == 1  # aligned columns, as uPlot wants
    assert cols["ts"] == sorted(cols["ts"])
    assert all(v is not None for v in cols["p95_ms"] + cols["rss_mb"])
    later = cols["ts"][-1] + 1000
    assert dash.get_json(f"/api/devices/{device}/telemetry?since={later}")[1]["ts"] == []
    status, body = dash.get_json(f"/api/devices/{device}/telemetry?since=yesterday")
    assert status == 400 and body["error"]["param"] == "since"
    # Bounded retention: the server prunes by itself (every 0.25 s here). A sample from
    # an hour ago (a real one, moved back) goes; the recent ones stay and keep coming.
    kept = dash.store.telemetry(device_id=device, since=0)
    old = dataclasses.replace(kept[0], ts=time.time() - 3600)
    dash.store.add_telemetry([old])
    assert _wait(lambda: dash.store.telemetry(device_id=device, since=0)[0].ts > old.ts + 1)
    assert dash.retention.pruned >= 1
    start = time.time()
    assert _wait(lambda: dash.store.telemetry(device_id=device, since=start))
    assert dash.store.telemetry(since=0)[0].ts >= start - 3600 + 1


# --------------------------------------------------------------------------- rollouts


def test_a_real_rollout_in_the_api(dash: DashboardServer, dashboard_bundle: BundleInfo) -> None:
    devices = ["dev-0010", "dev-0011", "dev-0012"]
    engine = dash.engine()
    created = engine.create(dash.plan(devices), dashboard_bundle)
    rid = created.rollout_id
    status, listed = dash.get_json("/api/rollouts")
    assert status == 200 and listed["rollouts"][0]["rollout_id"] == rid
    status, before = dash.get_json(f"/api/rollouts/{rid}")
    assert status == 200 and before["rollout"]["phase"] == "created"
    assert [w["started_at"] for w in before["waves"]] == [None, None]
    thread = threading.Thread(target=engine.drive, args=(rid,), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    cache = dash.app.state.dashboard.rollout_cache(dash.store)
    rendered = cache.renders
    status, headers, raw = dash.request("GET", f"/api/rollouts/{rid}")
    assert status == 200 and headers["content-type"] == "application/json"
    # Nothing new in the record: the kept bytes are served, not serialised again.
    assert dash.request("GET", f"/api/rollouts/{rid}")[2] == raw
    assert cache.renders == rendered + 1
    body = json.loads(raw)
    # Served from the state folded at the first request plus the records since: the
    # same as folding the whole record again.
    assert body == json.loads(json.dumps(rollout_json(dash.store.records(rollout_id=rid))))
    assert body["rollout"]["rollout_id"] == rid and body["rollout"]["outcome"] == "succeeded"
    assert [len(w["devices"]) for w in body["waves"]] == [1, 2]
    for i, wave in enumerate(body["waves"]):
        assert wave["index"] == i and wave["passed"] is True
        assert wave["started_at"] <= wave["finished_at"]
        for d in wave["devices"]:
            assert d["status"] == "succeeded" and d["code"] is None
            assert {g["metric"] for g in d["gates"]} == {"p95_ms", "error_rate"}
            assert all(g["passed"] and g["figure"] is not None for g in d["gates"])
    assert len(body["gates"]) == 6 and body["halt_reason"] is None
    kinds = [r["kind"] for r in body["records"]]
    assert kinds[0] == "rollout.created" and kinds[-1] == "rollout.finished"
    assert body["records"][0]["operator"] == "dash-tester"
    # The device page names the rollout that put 2.0.0 there.
    assert _wait(lambda: dash.get_json("/api/devices/dev-0011")[1]["row"]["model_version"]
                 == "2.0.0")  # fmt: skip
    models = dash.get_json("/api/devices/dev-0011")[1]["models"]
    assert [m["version"] for m in models] == ["1.0.0", "2.0.0"]
    assert models[-1]["via"] == rid and models[-1]["sha256"] == dashboard_bundle.sha256
    status, body = dash.get_json("/api/rollouts/r-nope")
    assert status == 404 and body["error"]["code"] == "console.not_found"
    assert dash.store.records(rollout_id=rid, kinds=[RecordKind.ROLLOUT_FINISHED])


# --------------------------------------------------------------------------- headers


def test_every_response_carries_the_security_headers(dash: DashboardServer) -> None:
    paths = ["/", "/device/dev-0001", "/api/devices", "/api/devices/nobody", "/static/js/app.js",
             "/static/nothing.js", "/rollouts", "/api/session"]  # fmt: skip
    for path in paths:
        _, headers, _ = dash.request("GET", path)
        for name, value in SECURITY.items():
            assert headers.get(name) == value, (path, name)
        if path.startswith("/api/"):
            assert headers["cache-control"] == "no-store", path
    with dash.sse() as live:
        headers = {k.lower(): v for k, v in live.response.getheaders()}
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["content-security-policy"] == SECURITY["content-security-policy"]


def test_pages_and_static_files_are_served_with_revalidation(dash: DashboardServer) -> None:
    status, headers, body = dash.request("GET", "/device/dev-0001")
    assert status == 200 and b"<title>device</title>" in body
    assert headers["content-type"].startswith("text/html")
    status, headers, body = dash.request("GET", "/static/js/app.js")
    assert status == 200 and body == b"export const x = 1;\n"
    assert "javascript" in headers["content-type"] and headers["cache-control"] == "no-cache"
    etag = headers["etag"]
    status, _, body = dash.request("GET", "/static/js/app.js", headers={"If-None-Match": etag})
    assert (status, body) == (304, b"")
    status, _, _ = dash.request("GET", "/static/../app.py")
    assert status == 404
    status, _, body = dash.request("GET", "/login")  # not built in this static dir
    assert status == 404 and b"login.html" in body


# --------------------------------------------------------------------------- the CLI


def test_edge_fleet_serve_serves_and_stops_on_sigterm(
    dash: DashboardServer, broker: Broker, tmp_path: Path
) -> None:
    """The real `edge-fleet serve` process over the same fleet (the devices of `dash`)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "fleet.cli", "--json", "--broker",
        f"mqtt://{broker.host}:{broker.port}", "--db", str(tmp_path / "fleet.db"),
        "--key", str(dash.key_file), "serve", "--listen", f"127.0.0.1:{port}",
        "--credentials", str(dash.credentials_file),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[3])  # fmt: skip
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline() or "{}")
        assert started.get("url") == f"http://127.0.0.1:{port}", proc.stderr and proc.stderr.read()
        assert started["devices"] >= 20 and started["read_only"] is False
        # It listens before it prints the line: no retry needed.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/api/devices?q=dev-00&limit=1000")
        body = json.loads(conn.getresponse().read())
        conn.close()
        assert body["total"] == 20
        # A second server on the same port is refused with a clear message.
        taken = subprocess.run([*cmd[:-2]], capture_output=True, text=True, timeout=60,
                               check=False, cwd=Path(__file__).resolve().parents[3])  # fmt: skip
        assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


class _BrokenView:
    """The real view, except that listing rows fails: no real part fails on demand."""

    def __init__(self, view: Any) -> None:
        self.view = view

    def rows(self, group: str | None = None) -> Any:
        raise RuntimeError("secret internals /etc/passwd")

    def row(self, device_id: str) -> Any:
        return self.view.row(device_id)

    def add_listener(self, fn: Any) -> Any:
        return self.view.add_listener(fn)


def test_a_failure_inside_is_a_500_json_without_the_trace(
    dash: DashboardServer, caplog: pytest.LogCaptureFixture
) -> None:
    running = serve_app(create_app(_BrokenView(dash.view), None))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        conn.request("GET", "/api/devices")
        response = conn.getresponse()
        body = response.read()
        conn.close()
    finally:
        running.stop()
    assert response.status == 500
    assert json.loads(body)["error"]["code"] == "dashboard.internal"
    assert b"secret" not in body and b"Traceback" not in body
    assert response.getheader("x-frame-options") == "DENY"
    assert "secret internals" in caplog.text  # the operator's log has it


def test_health_colours_follow_the_error_rate(dash: DashboardServer) -> None:
    device = "dev-0007"

    def colour() -> str:
        return str(dash.get_json(f"/api/devices?q={device}")[1]["rows"][0]["health_class"])

    try:
        dash.sim.set_profile("1.0.0", devices=[device], error_rate=0.2)
        assert _wait(lambda: colour() == "bad"), colour()
        # Sorting by health puts the worst first (ok < warn < bad < offline < unknown).
        _, worst = dash.get_json("/api/devices?sort=health_class&desc=1&limit=1")
        assert worst["rows"][0]["device_id"] == device
        dash.sim.set_profile("1.0.0", devices=[device], error_rate=0.02)
        assert _wait(lambda: colour() == "warn"), colour()
    finally:
        dash.sim.set_profile("1.0.0", devices=[device], error_rate=0.0)
    assert _wait(lambda: colour() == "ok"), colour()


def test_on_postgresql(pg_db: str, tmp_path: Path, dashboard_bundle: BundleInfo) -> None:
    """The same server over the machine's PostgreSQL: telemetry kept and read back, an
    action recorded with the user, the rollout shown."""
    with (
        Broker(tmp_path / "broker") as b,
        DashboardServer(b, tmp_path / "pg", devices=3, prefix="pq", db=pg_db,
                        app_options={"telemetry_flush_s": 0.2}) as d,
    ):  # fmt: skip
        assert d.store.dialect == "postgresql"
        assert _wait(lambda: len(d.get_json("/api/devices/pq-0001/telemetry")[1]["ts"]) >= 2)
        rid = d.engine().create(d.plan(["pq-0000"]), dashboard_bundle).rollout_id
        s = d.login()
        status, body = d.post_json(f"/api/rollouts/{rid}/pause", {}, session=s)
        assert status == 200
        [record] = d.store.records(rollout_id=rid, kinds=[RecordKind.PAUSE_REQUESTED])
        assert (record.seq, record.operator) == (body["record"], "operator")
        status, shown = d.get_json(f"/api/rollouts/{rid}")
        assert status == 200 and shown["records"][-1]["kind"] == "rollout.pause_requested"


def test_device_events_are_bounded_per_device_and_over_the_fleet() -> None:
    """The device log alone (it only needs a view to listen to), fed real EventMessages."""

    class Listened:
        def add_listener(self, fn: Any) -> Any:
            return lambda: None

    log = DeviceLog(Listened(), events_kept=5, events_total=12)  # type: ignore[arg-type]

    def event(device: str, seq: int) -> None:
        message = EventMessage(device, seq, float(seq), "command.refused", f"#{seq}", {})
        log._on_view("event", device, message)

    for seq in range(1, 9):  # a chatty device: only its latest 5
        event("a", seq)
    assert [e["reason"] for e in log.events("a")] == [f"#{i}" for i in range(4, 9)]
    for seq in range(1, 6):
        event("b", seq)
        event("c", seq)
    # 15 kept by the per-device bound, 12 over the fleet: the 3 oldest (a's) went.
    assert [e["reason"] for e in log.events("a")] == ["#7", "#8"]
    assert len(log.events("b")) == len(log.events("c")) == 5
    for seq in range(9, 3000):  # stale order entries are compacted, not kept forever
        event("a", seq)
    assert len(log._order) <= 2 * 12 + 1000
    assert sum(len(log.events(d)) for d in "abc") == 12
    assert log.events("a")[-1]["reason"] == "#2999"


def test_a_silent_device_warns_after_three_of_its_intervals() -> None:
    now = 1_000_000.0
    row = DeviceRow("d", online=True, health="ready", seen_at=now - 40)
    assert health_class(row, now) == "warn"  # 40 s of silence, default 30 s
    assert health_class(row, now, stale_after(20.0)) == "ok"  # reports every 20 s: 60 s
    assert health_class(row, now + 30, stale_after(20.0)) == "warn"
    assert stale_after(None) == stale_after(1.0) == 30.0
    assert health_class(DeviceRow("d", online=False, health="ready"), now) == "offline"
    assert health_class(DeviceRow("d"), now) == "unknown"
    assert health_class(DeviceRow("d", online=True, health="not_ready", seen_at=now), now) == "bad"

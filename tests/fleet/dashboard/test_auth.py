"""Logins, sessions, CSRF and the actions they guard, over a real socket, with the
record on a real SQLite file; the credentials are files as `edge-fleet serve` reads
them (scrypt hashes made by `edge-fleet serve --hash-password`)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.dashboard.auth import Auth
from fleet.errors import FleetError
from fleet.ports import RecordKind
from fleet.rollout.bundle import BundleInfo
from tests.fleet.dashboard._server import PASSWORD, TOKEN, USER, DashboardServer
from tests.mqtt_broker import Broker, free_port, make_pki

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def dash(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardServer]:
    with DashboardServer(broker, tmp_path_factory.mktemp("auth"), devices=4, prefix="au") as d:
        yield d


@pytest.fixture(scope="module")
def rollout(dash: DashboardServer, dashboard_bundle: BundleInfo) -> str:
    """A rollout recorded (not driven: no console drives it, so requests stay requests)."""
    return dash.engine().create(dash.plan(["au-0000", "au-0001"]), dashboard_bundle).rollout_id


@pytest.fixture(autouse=True)
def _fresh_rate_limit(dash: DashboardServer) -> Iterator[None]:
    # Every test logs in from 127.0.0.1: one test's failures must not lock out the next.
    dash.auth._failures.clear()
    yield
    dash.auth._failures.clear()


def _login(dash: DashboardServer, body: object) -> tuple[int, dict[str, str], dict[str, object]]:
    status, headers, data = dash.request(
        "POST", "/api/login", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return status, headers, json.loads(data)


def test_login_sets_a_strict_httponly_cookie_and_gives_a_csrf_token(dash: DashboardServer) -> None:
    status, body = dash.get_json("/api/session")
    assert (status, body["logged_in"], body["user"], body["csrf"]) == (200, False, None, None)
    assert body["read_only"] is False
    status, headers, body = _login(dash, {"user": USER, "password": PASSWORD})
    assert status == 200 and body["user"] == USER and len(str(body["csrf"])) >= 32
    name, sid = headers["set-cookie"].split(";")[0].split("=", 1)
    assert name == "edgerun_session" and len(sid) >= 32
    # Plain http here: https adds "; Secure".
    assert headers["set-cookie"] == f"edgerun_session={sid}; HttpOnly; SameSite=Strict; Path=/"
    s = dash.login()
    status, body = dash.get_json("/api/session", session=s)
    assert (body["logged_in"], body["user"], body["csrf"]) == (True, USER, s.csrf)
    assert s.csrf != dash.login().csrf  # one token per session


def test_token_login(dash: DashboardServer) -> None:
    status, _, body = _login(dash, {"token": TOKEN})
    assert status == 200 and body["user"] == "token"
    status, _, body = _login(dash, {"token": TOKEN[:-1] + "x"})
    assert status == 401


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"user": USER, "password": "wrong"}, 401),
        ({"user": "nobody", "password": PASSWORD}, 401),
        ({"user": USER}, 400),
        ({"user": USER, "password": PASSWORD, "token": TOKEN}, 400),
        ([USER, PASSWORD], 400),
    ],
)
def test_bad_logins(dash: DashboardServer, body: object, status: int) -> None:
    got, headers, answer = _login(dash, body)
    assert got == status and "set-cookie" not in headers
    assert isinstance(answer["error"], dict) and answer["error"]["message"]


def test_not_json_is_a_clear_400(dash: DashboardServer) -> None:
    status, _, data = dash.request("POST", "/api/login", b"{user", {"Content-Type": "a/b"})
    assert status == 400 and json.loads(data)["error"]["message"] == "the body is not JSON"
    huge = json.dumps({"user": USER, "password": "x" * 100_000}).encode()
    status, _, data = dash.request("POST", "/api/login", huge, {"Content-Type": "application/json"})
    assert status == 413 and "64 KiB" in json.loads(data)["error"]["message"]


def test_actions_need_a_login_a_csrf_token_and_json(dash: DashboardServer, rollout: str) -> None:
    path = f"/api/rollouts/{rollout}/pause"
    status, body = dash.post_json(path, {})
    assert status == 401 and body["error"]["code"] == "dashboard.login_required"
    s = dash.login()
    status, body = dash.post_json(path, {}, session=s, csrf=None)
    assert status == 403 and body["error"]["code"] == "dashboard.csrf"
    status, body = dash.post_json(path, {}, session=s, csrf="not-the-token")
    assert status == 403
    status, body = dash.post_json(path, {}, session=s, csrf=dash.login().csrf)  # another's
    assert status == 403
    status, body = dash.post_json(path, b"reason=x", session=s, content_type="text/plain")
    assert status == 415
    assert not dash.store.records(rollout_id=rollout, kinds=[RecordKind.PAUSE_REQUESTED])
    status, _, _ = dash.request("GET", path, session=s)
    assert status == 405


def test_an_action_is_recorded_with_the_user(dash: DashboardServer, rollout: str) -> None:
    s = dash.login()
    status, body = dash.post_json(f"/api/rollouts/{rollout}/pause", {"reason": "lunch"}, session=s)
    assert status == 200 and body["ok"] is True
    [record] = dash.store.records(rollout_id=rollout, kinds=[RecordKind.PAUSE_REQUESTED])
    assert record.seq == body["record"]
    assert (record.key_id, record.operator) == (dash.client.key_id, USER)
    assert record.data["reason"] == "lunch" and record.result == "requested"
    status, body = dash.post_json(f"/api/rollouts/{rollout}/pause", {}, session=s)
    assert status == 409 and "already paused" in body["error"]["message"]
    status, body = dash.post_json(f"/api/rollouts/{rollout}/resume", {}, session=s)
    assert status == 200
    [resumed] = dash.store.records(rollout_id=rollout, kinds=[RecordKind.RESUME_REQUESTED])
    assert resumed.operator == USER and resumed.data["reason"] == "from the dashboard"
    _, shown = dash.get_json(f"/api/rollouts/{rollout}")
    assert shown["records"][-1]["kind"] == "rollout.resume_requested"
    status, body = dash.post_json("/api/rollouts/r-nope/abort", {}, session=s)
    assert status == 404 and body["error"]["code"] == "console.not_found"
    status, body = dash.post_json(f"/api/rollouts/{rollout}/explode", {}, session=s)
    assert status == 404 and body["error"]["allowed"] == ["pause", "resume", "abort", "rollback"]


def test_logout_ends_the_session(dash: DashboardServer, rollout: str) -> None:
    s = dash.login()
    status, headers, _ = dash.request("POST", "/api/logout", b"{}", session=s)
    assert status == 200 and "edgerun_session=;" in headers["set-cookie"]
    assert "Max-Age=0" in headers["set-cookie"]
    assert dash.get_json("/api/session", session=s)[1]["logged_in"] is False
    status, _ = dash.post_json(f"/api/rollouts/{rollout}/abort", {}, session=s)
    assert status == 401


def test_a_session_expires(dash: DashboardServer) -> None:
    ttl = dash.auth.session_ttl_s
    dash.auth.session_ttl_s = 0.3
    try:
        s = dash.login()
        assert dash.get_json("/api/session", session=s)[1]["logged_in"] is True
        deadline = time.monotonic() + 10
        while dash.get_json("/api/session", session=s)[1]["logged_in"]:
            assert time.monotonic() < deadline, "the session never expired"
            time.sleep(0.05)
        status, body = dash.post_json("/api/rollouts/any/pause", {}, session=s)
        assert status == 401
    finally:
        dash.auth.session_ttl_s = ttl


def test_five_failures_a_minute_then_429_even_for_the_right_password(
    dash: DashboardServer,
) -> None:
    for _ in range(5):
        assert _login(dash, {"user": USER, "password": "guess"})[0] == 401
    status, headers, body = _login(dash, {"user": USER, "password": PASSWORD})
    assert status == 429 and body["error"]["code"] == "dashboard.rate_limited"  # type: ignore[index]
    assert 0 < int(headers["retry-after"]) <= 60


def test_read_only_without_credentials(broker: Broker, tmp_path: Path) -> None:
    with DashboardServer(broker, tmp_path, devices=1, prefix="ro", credentials=False) as d:
        _, body = d.get_json("/api/session")
        assert body["read_only"] is True and body["logged_in"] is False
        status, _, answer = _login(d, {"user": USER, "password": PASSWORD})
        assert status == 403 and answer["error"]["code"] == "dashboard.read_only"  # type: ignore[index]
        assert d.post_json("/api/rollouts/x/pause", {})[0] == 401
        assert d.get_json("/api/devices")[0] == 200


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args], input=stdin, capture_output=True,
        text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip


def test_hash_password_and_bad_credentials_files(tmp_path: Path) -> None:
    out = _cli("serve", "--hash-password", "alice", stdin="correct horse\n")
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("alice:scrypt$")
    creds = tmp_path / "creds"
    creds.write_text(f"# ops\n\n{line}\n")
    auth = Auth.from_files(str(creds), None)
    assert auth.check_password("alice", "correct horse")
    assert not auth.check_password("alice", "correct horsE")
    creds.write_text("alice:plaintext\n")
    with pytest.raises(FleetError, match="line 1: not a scrypt hash"):
        Auth.from_files(str(creds), None)
    short = tmp_path / "token"
    short.write_text("abc\n")
    with pytest.raises(FleetError, match="at least 16 characters"):
        Auth.from_files(None, str(short))
    # The CLI says so, with the console's code, and no traceback.
    out = _cli("--db", str(tmp_path / "f.db"), "serve", "--credentials", str(creds))
    assert out.returncode == 2 and "[console.config]" in out.stderr
    assert "Traceback" not in out.stderr
    out = _cli("serve", "--hash-password", "bob", stdin="short\n")
    assert out.returncode == 2 and "at least 8 characters" in out.stderr
    out = _cli("serve", "--credentials", "credential:dash-users")
    assert out.returncode == 2 and "CREDENTIALS_DIRECTORY" in out.stderr


def test_over_https_with_credentials_from_the_credentials_directory(
    dash: DashboardServer, broker: Broker, tmp_path: Path
) -> None:
    """The real `edge-fleet serve` with --tls-cert/--tls-key and `credential:NAME`
    (systemd LoadCredential=): the session cookie is `Secure`."""
    pki = make_pki(tmp_path / "pki")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "dash-users").write_text(dash.credentials_file.read_text())
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "--json", "--broker",
         f"mqtt://{broker.host}:{broker.port}", "--db", str(tmp_path / "f.db"), "serve",
         "--listen", f"127.0.0.1:{port}", "--credentials", "credential:dash-users",
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline() or "{}")
        assert started.get("url") == f"https://127.0.0.1:{port}"
        assert started["users"] == 1 and started["read_only"] is False
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=context)
        conn.request("POST", "/api/login", json.dumps({"user": USER, "password": PASSWORD}),
                     {"Content-Type": "application/json"})  # fmt: skip
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 200
        assert str(response.getheader("set-cookie")).endswith(
            "; HttpOnly; SameSite=Strict; Path=/; Secure"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err

"""Pull updates: a real HTTP server serves the index; a recording UpdateService (a test
double of the port, until jobs.py lands) takes the deploys."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.update import DeployRequest, RollbackRequest
from agent.update.errors import UpdateCode, UpdateError
from agent.update.index import MAX_INDEX_BYTES, IndexGuard
from agent.update.poll import PullUpdates
from agent.update.repository import Repository, http_getter
from tests.agent.update.index.conftest import NAME, Served, release, signed


class RecordingService:
    def __init__(self) -> None:
        self.deploys: list[DeployRequest] = []
        self.refuse: UpdateError | None = None
        self.phase: str | None = None
        self.job: dict[str, Any] | None = None
        self.deployed = threading.Event()

    def deploy(self, request: DeployRequest) -> dict[str, Any]:
        if self.refuse is not None:
            raise self.refuse
        self.deploys.append(request)
        self.deployed.set()
        return {"job": f"j{len(self.deploys)}", "accepted": True}

    def rollback(self, request: RollbackRequest) -> dict[str, Any]:
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        if self.job is not None:
            return {"job": self.job}
        return {"job": None if self.phase is None else {"phase": self.phase}}

    def cancel(self) -> dict[str, Any]:
        raise NotImplementedError


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, kind: str, reason: str, **data: Any) -> None:
        self.seen.append((kind, reason, data))

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.seen]


def _pull(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    server: Served,
    served: list[tuple[str, str] | None],
    poll_s: float = 60,
) -> tuple[PullUpdates, RecordingService, Events]:
    guard = IndexGuard(tmp_path, [key.public_key()])
    repo = Repository(server.url(), guard, http_getter(5, 5, 2))
    service, events = RecordingService(), Events()
    pull = PullUpdates(
        repo, service, lambda: served[0], events, poll_s=poll_s, agent_version="1.0.0"
    )
    return pull, service, events


def test_poll_deploys_the_newest_newer_release(
    tmp_path: Path, key: Ed25519PrivateKey, http_server: Served
) -> None:
    http_server.files["/index.json"] = (
        200,
        signed(
            key, 1, release("1.0.0"), release("1.1.0"), release("1.3.0"), release("7.0.0", "other")
        ),
    )
    pull, service, events = _pull(tmp_path, key, http_server, [(NAME, "1.0.0")])
    answer = pull.check_once()
    assert answer == {"job": "j1", "accepted": True}
    [request] = service.deploys
    assert (request.version, request.origin, request.name) == ("1.3.0", "poll", NAME)
    assert request.source.to_json() == {"url": release("1.3.0").url}
    assert "update.pull" in events.kinds()
    # The same release is not deployed again at once (a failed job is not retried every poll).
    assert pull.check_once() is None and len(service.deploys) == 1


def test_poll_with_nothing_newer_deploys_nothing(
    tmp_path: Path, key: Ed25519PrivateKey, http_server: Served
) -> None:
    http_server.files["/index.json"] = (200, signed(key, 1, release("0.9.0"), release("1.0.0")))
    pull, service, _ = _pull(tmp_path, key, http_server, [(NAME, "1.0.0")])
    assert pull.check_once() is None and service.deploys == []
    assert pull.model_status() == "serving"


def test_a_marked_bad_release_is_skipped_for_the_next_one(
    tmp_path: Path, key: Ed25519PrivateKey, http_server: Served
) -> None:
    http_server.files["/index.json"] = (200, signed(key, 1, release("1.1.0"), release("1.2.0")))
    pull, service, events = _pull(tmp_path, key, http_server, [(NAME, "1.0.0")])
    service.refuse = UpdateError(UpdateCode.MARKED_BAD, "1.2.0 was rolled back before")
    assert pull.check_once() is None
    assert pull.model_status().startswith("failed: update.marked_bad")
    service.refuse = None
    pull.check_once()
    assert [r.version for r in service.deploys] == ["1.1.0"]
    assert pull.model_status() == "serving"


@pytest.mark.parametrize(
    ("files", "code"),
    [
        ({"/index.json": (500, b"oops")}, UpdateCode.DOWNLOAD_FAILED),
        ({}, UpdateCode.DOWNLOAD_FAILED),
        ({"/index.json": (200, b"{" * 10)}, UpdateCode.INDEX_INVALID),
        ({"/index.json": (200, b" " * (MAX_INDEX_BYTES + 10))}, UpdateCode.INDEX_INVALID),
        ({"/index.json": (302, b"file:///etc/passwd")}, UpdateCode.DOWNLOAD_FAILED),
        ({"/index.json": (302, b"/a"), "/a": (302, b"/b"), "/b": (302, b"/c"), "/c": (302, b"/d")}, UpdateCode.DOWNLOAD_FAILED),
    ],
)  # fmt: skip
def test_a_bad_repository_is_refused_and_nothing_deployed(
    tmp_path: Path, key: Ed25519PrivateKey, http_server: Served, files: dict, code: str
) -> None:
    http_server.files.update(files)
    pull, service, events = _pull(tmp_path, key, http_server, [(NAME, "1.0.0")])
    assert pull.check_once() is None
    assert service.deploys == []
    [(kind, reason, data)] = [e for e in events.seen if e[0] == "update.pull_refused"]
    assert data["code"] == code, reason
    assert pull.model_status() == f"failed: {code}: {reason}"
    # The same refusal on the next poll is not announced again.
    pull.check_once()
    assert events.kinds().count("update.pull_refused") == 1


def test_redirects_within_the_cap_are_followed(
    tmp_path: Path, key: Ed25519PrivateKey, http_server: Served
) -> None:
    http_server.files["/index.json"] = (302, b"/real.json")
    http_server.files["/real.json"] = (200, signed(key, 1, release("2.0.0")))
    pull, service, _ = _pull(tmp_path, key, http_server, [(NAME, "1.0.0")])
    pull.check_once()
    assert [r.version for r in service.deploys] == ["2.0.0"]


def test_an_older_index_after_a_newer_one_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, http_server: Served
) -> None:
    http_server.files["/index.json"] = (200, signed(key, 2, release("1.0.0")))
    pull, service, events = _pull(tmp_path, key, http_server, [(NAME, "1.0.0")])
    pull.check_once()
    http_server.files["/index.json"] = (200, signed(key, 1, release("1.0.0"), release("1.5.0")))
    pull.check_once()
    assert service.deploys == []
    assert events.seen[-1][2]["code"] == UpdateCode.INDEX_ROLLBACK


def test_a_desired_version_resolves_through_the_index(
    tmp_path: Path, key: Ed25519PrivateKey, http_server: Served
) -> None:
    http_server.files["/index.json"] = (200, signed(key, 1, release("1.1.0"), release("1.2.0")))
    served: list[tuple[str, str] | None] = [(NAME, "1.0.0")]
    pull, service, events = _pull(tmp_path, key, http_server, served, poll_s=0)
    pull.want("1.1.0")
    pull.check_once()
    [request] = service.deploys
    assert (request.version, request.origin) == ("1.1.0", "twin")
    # A desired version pins: the poll does not move past it.
    served[0] = (NAME, "1.1.0")
    pull.poll_s = 60
    assert pull.check_once() is None and len(service.deploys) == 1
    # Unknown version: an event and the twin status says why.
    pull.want("3.0.0")
    pull.check_once()
    status = pull.model_status()
    assert (
        status.startswith("failed: update.no_such_version")
        and "3.0.0" in status
        and "1.2.0" in status
    )
    # Not a version at all.
    pull.want("x" * 600)
    pull.check_once()
    assert pull.model_status().startswith("failed: update.bad_args")
    assert len(service.deploys) == 1


def test_model_status_shows_a_running_job(
    tmp_path: Path, key: Ed25519PrivateKey, http_server: Served
) -> None:
    pull, service, _ = _pull(tmp_path, key, http_server, [(NAME, "1.0.0")])
    service.phase = "downloading"
    assert pull.model_status() == "downloading"
    service.phase = "committed"
    assert pull.model_status() == "serving"
    # The job for the desired version failed: the twin says how, not "serving".
    pull.want("1.1.0")
    service.job = {
        "phase": "rolled_back",
        "version": "1.1.0",
        "code": "update.trial_failed",
        "reason": "p95 3x",
    }
    assert pull.model_status() == "rolled_back: update.trial_failed: p95 3x"
    pull.want("1.0.0")  # what is served
    assert pull.model_status() == "serving"


def test_the_thread_acts_on_want_and_stops(
    tmp_path: Path, key: Ed25519PrivateKey, http_server: Served
) -> None:
    http_server.files["/index.json"] = (200, signed(key, 1, release("1.1.0")))
    pull, service, _ = _pull(tmp_path, key, http_server, [(NAME, "1.0.0")], poll_s=0)
    pull.start()
    try:
        pull.want("1.1.0")
        assert service.deployed.wait(timeout=60)  # hang guard only
    finally:
        pull.stop()
    assert [r.version for r in service.deploys] == ["1.1.0"]


def test_a_fresh_device_given_a_version_pulls_the_one_model_the_index_lists(
    tmp_path: Path, key: Ed25519PrivateKey, http_server: Served
) -> None:
    http_server.files["/index.json"] = (200, signed(key, 1, release("1.0.0"), release("1.1.0")))
    pull, service, events = _pull(tmp_path, key, http_server, [None])
    # The poll waits for a served model (model.bundle may be installing at start) ...
    pull.check_once()
    assert service.deploys == [] and events.seen == []
    # ... a desired version on a fresh device resolves through the one name listed.
    pull.want("1.1.0")
    pull.check_once()
    assert [r.version for r in service.deploys] == ["1.1.0"]
    http_server.files["/index.json"] = (
        200,
        signed(key, 2, release("1.0.0"), release("1.0.0", "other")),
    )
    pull2, service2, events = _pull(tmp_path, key, http_server, [None])
    pull2.want("1.0.0")
    pull2.check_once()
    assert service2.deploys == [] and "2 model names" in events.seen[-1][1]


def test_a_trickling_repository_is_cut_at_the_deadline(tmp_path: Path) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not stop.wait(0.05):
            try:
                conn.sendall(b" ")
            except OSError:
                break
        conn.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    get = http_getter(5, 5, 0, deadline_s=0.5)
    try:
        with pytest.raises(UpdateError) as info:
            get(f"http://127.0.0.1:{listener.getsockname()[1]}/index.json")
    finally:
        stop.set()
        listener.close()
    assert info.value.code == UpdateCode.DOWNLOAD_FAILED
    assert "within the time allowed" in info.value.message

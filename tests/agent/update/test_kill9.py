"""SIGKILL of a real agent process in the middle of a deploy, then a restart: a verified
model always serves, and the job ends as the recovery table says.

Real parts: mosquitto, signed commands from a console, an HTTP server that drips the
bundle (so the test, not the agent, makes the download slow), agent processes."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.update.journal import Journal
from tests.agent.mqtt.conftest import (
    DEVICE,
    Console,
    broker,
    console,
    console_key,
    listening,
    wait_until,
)
from tests.agent.update.fetch.httpserver import HttpServer, Route
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE, AgentProcess, SampleParts, make_bundle
from tests.mqtt_broker import Broker

__all__ = ["broker", "console", "console_key"]  # fixtures shared with the MQTT tests


@pytest.fixture
def console_pub_path(tmp: Path, console_key: Ed25519PrivateKey) -> Path:
    from cryptography.hazmat.primitives import serialization

    path = tmp / "console.pub"
    path.write_bytes(
        console_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture
def served_over_http(tmp: Path) -> Iterator[HttpServer]:
    with HttpServer(tmp / "www") as server:
        yield server


def config(tmp: Path, broker: Broker, console_pub: Path, trial_s: float) -> Path:
    text = f"""
device_id = "{DEVICE}"
state_dir = "{tmp / "state"}"
[trust]
public_keys = ["{DEMO_PUB}"]
[api]
socket = "{tmp / "api.sock"}"
[model]
bundle = "{SAMPLE_BUNDLE}"
[mqtt]
enabled = true
port = {broker.port}
reconnect_min_s = 0.05
reconnect_max_s = 0.5
[commands]
console_keys = ["{console_pub}"]
[update.trial]
window_s = {trial_s}
"""
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


def phase(state: Path) -> str | None:
    try:
        job = json.loads((state / "update.json").read_text())["job"]
    except (OSError, ValueError):
        return None
    return None if job is None else str(job["phase"])


def served_version(console: Console) -> str:
    reply = console.request("status", timeout=30)
    assert reply["ok"], reply
    version: str = reply["result"]["model"]["version"]
    return version


def online(console: Console) -> None:
    """Wait until the agent answers commands (a command sent before it subscribed is lost)."""

    def answered() -> bool:
        try:
            return bool(console.request("ping", timeout=1)["ok"])
        except AssertionError:
            return False

    assert wait_until(answered, 60)


def start(path: Path, tmp: Path) -> AgentProcess:
    agent = AgentProcess(path, tmp / "api.sock")
    agent.wait_ready()
    return agent


@pytest.mark.parametrize("where", ["downloading", "trial"])
def test_kill_9_mid_deploy_then_restart(
    where: str,
    tmp: Path,
    broker: Broker,
    console: Console,
    console_pub_path: Path,
    served_over_http: HttpServer,
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
) -> None:
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    data = bundle.read_bytes()
    # Downloading: ~1 KiB every 5 ms, so the download lasts seconds and is killed mid-way.
    route = Route(data=data, drip_s=0.005 if where == "downloading" else 0.0)
    served_over_http.routes["/v2.edgebundle"] = route
    state = tmp / "state"
    path = config(tmp, broker, console_pub_path, trial_s=600 if where == "trial" else 0)
    agent = start(path, tmp)
    try:
        online(console)
        assert served_version(console) == "1.0.0"
        args: dict[str, Any] = {
            "url": served_over_http.url("/v2.edgebundle"),
            "sha256": route.sha256,
            "size": len(data),
            "version": "1.1.0",
        }
        reply = console.request("deploy", args, timeout=30)
        assert reply["ok"] and reply["result"]["accepted"], reply
        job_id = reply["result"]["job"]
        assert wait_until(lambda: phase(state) == where, 120), phase(state)
        if where == "downloading":
            assert wait_until(lambda: any((state / "incoming").glob("*.part")), 60)
            # ping answers while the job runs (it has a thread of its own)
            assert console.request("ping", timeout=30)["ok"]
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(30)
    finally:
        agent.stop()
    agent = start(path, tmp)
    try:
        online(console)
        if where == "downloading":
            # Resumed from the partial file, with a Range request, and committed.
            assert wait_until(lambda: phase(state) == "committed", 180), phase(state)
            assert served_version(console) == "1.1.0"
            assert any("Range" in seen.headers for seen in served_over_http.seen)
            # The retained state names the job, its phase and, at the end, the model.
            with listening(broker, f"edgerun/v1/{DEVICE}/state") as states:

                def final_state() -> bool:
                    bodies = [json.loads(b) for b in states.on("/state")]
                    return any(
                        (b.get("update") or {}).get("phase") == "committed"
                        and b["update"]["job"] == job_id
                        and b["update"]["model"]["version"] == "1.1.0"
                        for b in bodies
                    )

                assert wait_until(final_state, 30)
        else:
            assert phase(state) == "rolled_back"
            assert served_version(console) == "1.0.0"
            journal = Journal(state)
            assert journal.job is not None and journal.job.id == job_id
            assert journal.job.code == "update.interrupted"
            assert journal.state.crashes == {route.sha256: 1}
        status = console.request("update.status", timeout=30)
        assert status["ok"] and status["result"]["job"]["id"] == job_id
    finally:
        agent.stop()

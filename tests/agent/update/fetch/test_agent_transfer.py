"""A `transfer` deploy to a real agent process over a real mosquitto: the console's
ChunkSender serves the bundle (losing chunks on purpose), the agent fetches it through
its link, verifies, swaps and commits; killed mid-transfer and restarted, it resumes
from the bitmap on disk."""

from __future__ import annotations

import hashlib
import signal
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.update.fetch.mqtt import Bitmap
from fleet.transfer import ChunkSender
from tests.agent.mqtt.conftest import DEVICE, Console, broker, console, console_key, wait_until
from tests.agent.update.test_kill9 import config, console_pub_path, online, phase, served_version
from tests.agent.update.test_kill9 import start as start_agent
from tests.helpers import SampleParts, make_bundle
from tests.mqtt_broker import Broker

__all__ = ["broker", "console", "console_key", "console_pub_path"]


def deploy_args(data: bytes, transfer: str) -> dict[str, object]:
    return {"transfer": transfer, "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data), "version": "1.1.0"}  # fmt: skip


def test_transfer_deploy_to_a_real_agent_commits(
    tmp: Path, broker: Broker, console: Console, console_pub_path: Path,
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey,
) -> None:  # fmt: skip
    data = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0").read_bytes()
    sender = ChunkSender(console.listener.client, DEVICE, "t-agent", data, 4096,
                         skip=lambda i, before: i % 7 == 3 and before == 0).start()  # fmt: skip
    agent = start_agent(config(tmp, broker, console_pub_path, trial_s=0), tmp)
    try:
        online(console)
        reply = console.request("deploy", deploy_args(data, "t-agent"), timeout=30)
        assert reply["ok"] and reply["result"]["accepted"], reply
        assert wait_until(lambda: phase(tmp / "state") in ("committed", "failed"), 120)
        assert phase(tmp / "state") == "committed", (tmp / "state" / "update.json").read_text()
        assert served_version(console) == "1.1.0"
    finally:
        agent.stop()
    assert len(sender.needs) >= 2  # the start, then the chunks lost the first time


def test_agent_killed_mid_transfer_resumes_from_the_bitmap(
    tmp: Path, broker: Broker, console: Console, console_pub_path: Path,
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey,
) -> None:  # fmt: skip
    data = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0").read_bytes()
    hold = threading.Event()
    hold.set()
    sender = ChunkSender(console.listener.client, DEVICE, "t-kill", data, 4096,
                         skip=lambda i, before: i % 2 == 1 and hold.is_set()).start()  # fmt: skip
    state = tmp / "state"
    path = config(tmp, broker, console_pub_path, trial_s=0)
    agent = start_agent(path, tmp)
    sha = hashlib.sha256(data).hexdigest()
    bitmap = state / "incoming" / f"{sha}.part.bitmap"
    try:
        online(console)
        reply = console.request("deploy", deploy_args(data, "t-kill"), timeout=30)
        assert reply["ok"], reply
        assert wait_until(bitmap.exists, 60)  # saved about once a second
        held = Bitmap.load(bitmap, len(data), sha)
        assert held is not None and 0 < held.count < held.total
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(30)
    finally:
        agent.stop()
    hold.clear()
    asked_before = len(sender.needs)
    agent = start_agent(path, tmp)
    try:
        online(console)
        assert wait_until(lambda: phase(state) in ("committed", "failed"), 120), phase(state)
        assert phase(state) == "committed", (state / "update.json").read_text()
        assert served_version(console) == "1.1.0"
    finally:
        agent.stop()
    resumed = [n for n in sender.needs[asked_before:] if n.total is not None]
    assert resumed and len(resumed[0].indexes()) < resumed[0].total  # asked only for the rest

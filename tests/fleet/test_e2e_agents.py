"""End to end with real parts only: three `edge-agent run` processes on a real mosquitto,
updated by a real `edge-fleet deploy` process (a canary, then one wave, the bundle over
the console's own HTTP server), then rolled back by `edge-fleet rollback`. Every agent
ends on the version asked for, and the record says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.ports import RecordKind
from fleet.store import open_store
from tests.fleet._agents import agents
from tests.helpers import DEMO_PUB, ROOT, SampleParts, make_bundle
from tests.mqtt_broker import Broker
from tests.update_rig import served_version

DEVICES = ["e2e-1", "e2e-2", "e2e-3"]


def edge_fleet(config: Path, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", "--config", str(config), *argv],
        check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip


def test_three_real_agents_updated_and_rolled_back_by_the_console(
    tmp_path: Path,
    broker: Broker,
    console_pub: Path,
    fleet_toml: Callable[..., Path],
    sample_parts: SampleParts,
    demo_key: object,
) -> None:
    bundle = make_bundle(
        sample_parts,
        tmp_path / "digits-2.0.0.edgebundle",
        demo_key,
        version="2.0.0",  # type: ignore[arg-type]
    )
    config = fleet_toml(tmp_path / "console", timeout_s=20)
    with agents(tmp_path / "agents", broker, DEVICES, console_pub, groups=["e2e"]) as procs:
        # Until every agent is online in the console's view (its commands subscribed).
        for _ in range(300):
            listing = edge_fleet(config, "--json", "devices", "--group", "e2e")
            assert listing.returncode == 0, listing.stderr
            rows = json.loads(listing.stdout)
            if len(rows) == 3 and all(r["online"] for r in rows):
                break
        assert [r["device_id"] for r in rows] == DEVICES and all(r["online"] for r in rows)

        deploy = edge_fleet(
            config, "deploy", str(bundle), "--to", "group:e2e", "--canary", "1",
            "--wave", "100%", "--soak", "0.5", "--device-timeout", "120", "--via", "http",
            "--http-host", "127.0.0.1", "--trust", str(DEMO_PUB), "--trial-window", "0.5",
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert "Traceback" not in deploy.stdout + deploy.stderr
        for device, proc in procs.items():
            assert served_version(proc) == "2.0.0", device

        watch = edge_fleet(config, "watch", "--once", "--group", "e2e")
        assert watch.returncode == 0, watch.stderr
        assert "(digits 2.0.0): wave 2/2, 3 succeeded; finished: succeeded" in watch.stdout
        rows = json.loads(edge_fleet(config, "--json", "devices", "--group", "e2e").stdout)
        assert {r["model_version"] for r in rows} == {"2.0.0"}
        assert {r["previous_version"] for r in rows} == {"1.0.0"}  # each one's last-known-good

        back = edge_fleet(config, "rollback", "--to", "group:e2e", "--wait", "120")
        assert back.returncode == 0, back.stdout + back.stderr
        for device, proc in procs.items():
            assert served_version(proc) == "1.0.0", device

    store = open_store(tmp_path / "console" / "fleet.db")
    try:
        (rollout_id,) = store.rollout_ids()
        records = store.records(rollout_id=rollout_id)
        outcomes = {r.device_id: r.result for r in records if r.kind is RecordKind.DEVICE_OUTCOME}
        finished = [r for r in records if r.kind is RecordKind.ROLLOUT_FINISHED]
        waves = [r for r in records if r.kind is RecordKind.WAVE_STARTED]
        sent = store.records(kinds=[RecordKind.COMMAND_SENT])
    finally:
        store.close()
    assert outcomes == dict.fromkeys(DEVICES, "succeeded")
    assert len(waves) == 2 and len(finished) == 1
    assert finished[0].result == "succeeded", finished[0]
    assert [r.data["name"] for r in sent].count("deploy") == 3
    assert [r.data["name"] for r in sent].count("rollback") == 3
    assert {r.operator for r in sent} == {"tester"}


pytestmark = pytest.mark.timeout(400)

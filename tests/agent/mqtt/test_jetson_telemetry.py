"""A real agent process with a (stand-in) tegrastats child: telemetry over a real broker,
/metrics over real HTTP, and the child gone when the agent stops."""

from __future__ import annotations

import http.client
from pathlib import Path

from agent.hardware.tegrastats import parse_line
from agent.protocol.messages import TelemetryMessage
from tests.agent.hardware.fake_tegrastats import TEGRASTATS, alive, started, write_fake
from tests.agent.mqtt.conftest import json_on, listening, wait_until
from tests.helpers import AgentProcess, base_config, write_config
from tests.mqtt_broker import Broker

DEVICE = "test-device"
ORIN = TEGRASTATS / "jetpack6-orin-nano.txt"


def config(tmp: Path, broker: Broker, jetson: str) -> Path:
    text = base_config(tmp, api='tcp = "127.0.0.1:0"') + (
        f"[mqtt]\nenabled = true\nport = {broker.port}\nreconnect_min_s = 0.1\n"
        "reconnect_max_s = 0.5\n[telemetry]\ninterval_s = 0.2\n"
        "[commands]\nrequire_signature = false\n" + jetson
    )
    return write_config(tmp / "agent.toml", text)


def metrics_over_tcp(agent: AgentProcess) -> str:
    with agent.client() as api:
        status = api.get_json("/v2/edgerun/status")
    address = next(a for a in status["api"] if a.startswith("tcp:"))
    host, port = address.removeprefix("tcp:").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/metrics")
        reply = conn.getresponse()
        assert reply.status == 200
        return reply.read().decode()
    finally:
        conn.close()


def test_jetson_figures_reach_telemetry_and_metrics(tmp: Path) -> None:
    pids = tmp / "pids"
    fake = write_fake(tmp / "tegrastats", ORIN, pids)
    jetson = f'[jetson]\ntegrastats = "{fake}"\ninterval_ms = 100\nsysfs_root = "{tmp / "none"}"\n'
    known = [parse_line(line) for line in ORIN.read_text().splitlines() if line]
    loads = {k.gpu_load_ratio for k in known if k is not None}
    with Broker(tmp) as broker, listening(broker, f"edgerun/v1/{DEVICE}/telemetry") as feed:
        agent = AgentProcess(config(tmp, broker, jetson), tmp / "api.sock")
        try:
            agent.wait_ready()

            def with_accelerator() -> list[TelemetryMessage]:
                messages = [TelemetryMessage.from_json(b) for b in json_on(feed, "/telemetry")]
                return [m for m in messages if m.accelerator is not None]

            assert wait_until(with_accelerator, 30), agent.output()
            report = with_accelerator()[-1].accelerator
            assert report is not None and report.source == "tegrastats"
            assert report.gpu_load_ratio in loads
            assert report.power_mw.keys() == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
            assert "tj" in report.temperatures_c and report.ram_total_mb == 7620

            text = metrics_over_tcp(agent)
            gauges = dict(
                line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")
            )
            assert float(gauges['edgerun_gpu_load_ratio{source="tegrastats"}']) in loads
            assert float(gauges['edgerun_power_milliwatts{rail="VDD_IN"}']) > 0
            assert 20 < float(gauges['edgerun_temperature_celsius{zone="tj"}']) < 100
            assert float(gauges['edgerun_unified_memory_total_bytes{source="tegrastats"}']) == (
                7620 * 1024 * 1024
            )
            assert "# TYPE edgerun_power_milliwatts gauge" in text
            child = started(pids)[0][0]
            assert alive(child)
            assert agent.stop() == 0
        finally:
            agent.stop()
    assert all(not alive(pid) for pid, _ in started(pids))  # killed with the agent


def test_off_a_jetson_nothing_is_reported(tmp: Path) -> None:
    jetson = f'[jetson]\ntegrastats = "off"\nsysfs_root = "{tmp / "none"}"\n'
    with Broker(tmp) as broker, listening(broker, f"edgerun/v1/{DEVICE}/telemetry") as feed:
        agent = AgentProcess(config(tmp, broker, jetson), tmp / "api.sock")
        try:
            agent.wait_ready()
            assert wait_until(lambda: len(feed.on("/telemetry")) >= 2, 30), agent.output()
            assert all("accelerator" not in t for t in json_on(feed, "/telemetry"))
            text = metrics_over_tcp(agent)
            assert "edgerun_gpu_" not in text and "edgerun_power_milliwatts" not in text
            assert "edgerun_inference_requests_total" in text
            assert agent.stop() == 0
        finally:
            agent.stop()
    assert "tegrastats" not in agent.output()


def test_a_child_does_not_outlive_a_killed_agent(tmp: Path) -> None:
    pids = tmp / "pids"
    fake = write_fake(tmp / "tegrastats", ORIN, pids)
    jetson = f'[jetson]\ntegrastats = "{fake}"\ninterval_ms = 100\n'
    agent = AgentProcess(
        write_config(tmp / "agent.toml", base_config(tmp, extra=jetson)), tmp / "api.sock"
    )
    try:
        agent.wait_ready()
        assert wait_until(lambda: started(pids), 30), agent.output()
        child = started(pids)[0][0]
        agent.proc.kill()  # SIGKILL: no shutdown code runs
        agent.proc.wait()
        # Its stdout now leads nowhere: the next line it prints ends it.
        assert wait_until(lambda: not alive(child), 30)
    finally:
        agent.stop()

"""Real `edge-agent run` processes with their MQTT link on a test broker, for the
console's tests: the sample model served, signed commands from the console key."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE, AgentProcess, write_config
from tests.mqtt_broker import Broker


def agent_config(
    directory: Path,
    broker: Broker,
    device: str,
    console_pub: Path,
    *,
    groups: Sequence[str] = (),
    telemetry_s: float = 0.5,
    extra: str = "",
    host: str | None = None,
    mqtt_extra: str = "",
) -> str:
    """`mqtt_extra`: more lines for [mqtt] (username, password, [mqtt.tls] after them)."""
    group_list = ", ".join(f'"{g}"' for g in groups)
    return "\n".join([
        f'device_id = "{device}"',
        f'state_dir = "{directory / "state"}"',
        "[trust]",
        f'public_keys = ["{DEMO_PUB}"]',
        "[api]",
        f'socket = "{directory / "api.sock"}"',
        "[model]",
        f'bundle = "{SAMPLE_BUNDLE}"',
        "[mqtt]",
        "enabled = true",
        f'host = "{host or broker.host}"',
        f"port = {broker.port}",
        "reconnect_min_s = 0.05",
        "reconnect_max_s = 0.5",
        f"groups = [{group_list}]",
        mqtt_extra,
        "[telemetry]",
        f"interval_s = {telemetry_s}",
        "[commands]",
        f'console_keys = ["{console_pub}"]',
        extra,
    ]) + "\n"  # fmt: skip


def start_agent(
    directory: Path, broker: Broker, device: str, console_pub: Path, **kw: object
) -> AgentProcess:
    """Start (not wait for) an agent; `wait_ready()` it, then wait for its status."""
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(
        directory / "agent.toml",
        agent_config(directory, broker, device, console_pub, **kw),  # type: ignore[arg-type]
    )
    return AgentProcess(config, directory / "api.sock")


@contextlib.contextmanager
def agents(
    directory: Path, broker: Broker, devices: Sequence[str], console_pub: Path, **kw: object
) -> Iterator[dict[str, AgentProcess]]:
    """Several agents started together (their start-up overlaps), stopped at the end."""
    procs: dict[str, AgentProcess] = {}
    try:
        for device in devices:
            procs[device] = start_agent(directory / device, broker, device, console_pub, **kw)
        for proc in procs.values():
            proc.wait_ready(120)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()

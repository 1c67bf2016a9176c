"""Config: typed, strict, every problem reported with its key path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config.loader import ConfigError, load_config, parse_config, read_credential
from agent.config.model import AgentConfig


def issues(data: dict[str, object], env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env or {})
    return {i.path: i.message for i in info.value.issues}


def test_defaults_are_valid_and_offline() -> None:
    config = parse_config({}, {})
    assert config == AgentConfig()
    assert config.trust.public_keys == []  # nothing trusted by default
    assert config.batching.enabled is False
    assert config.api.tcp == ""


def test_unknown_keys_are_rejected_with_their_path() -> None:
    found = issues({"memory": {"max_mbs": 5}, "colour": "red"})
    assert "memory.max_mbs" in found and "allowed keys here" in found["memory.max_mbs"]
    assert "max_mb" in found["memory.max_mbs"]
    assert "colour" in found


def test_wrong_types_and_choices_name_the_value_and_allowed_ones() -> None:
    found = issues(
        {
            "log_level": "loud",
            "memory": {"max_mb": "lots"},
            "model": {"runtime": "tensorflow"},
            "runtimes": {"onnxruntime": {"graph_optimization": "max"}},
        }
    )
    assert "'loud' is not allowed" in found["log_level"] and "'debug'" in found["log_level"]
    assert "expected an integer, got 'lots'" in found["memory.max_mb"]
    assert "'onnxruntime'" in found["model.runtime"] and "'litert'" in found["model.runtime"]
    assert "'all'" in found["runtimes.onnxruntime.graph_optimization"]


def test_bounds_and_patterns() -> None:
    found = issues(
        {
            "device_id": "bad id!",
            "memory": {"soft_limit_fraction": 1.5},
            "api": {"tcp": "localhost", "max_connections": 0},
            "runtimes": {"litert": {"threads": 0}},
        }
    )
    assert "does not match" in found["device_id"]
    assert "above the maximum 1.0" in found["memory.soft_limit_fraction"]
    assert "does not match" in found["api.tcp"]
    assert "below the minimum 1" in found["api.max_connections"]
    assert "below the minimum 1" in found["runtimes.litert.threads"]


def test_list_items_are_checked_by_index() -> None:
    found = issues({"model": {"preference": ["onnxruntime", "tvm"]}})
    assert "model.preference[1]" in found


def test_environment_overrides_take_precedence() -> None:
    config = parse_config(
        {"memory": {"max_mb": 512}},
        {
            "EDGERUN_MEMORY__MAX_MB": "128",
            "EDGERUN_DEVICE_ID": "cam-7",
            "EDGERUN_BATCHING__ENABLED": "true",
            "EDGERUN_MODEL__PREFERENCE": "litert,onnxruntime",
            "EDGERUN_API__SOCKET": "/tmp/x.sock",
        },
    )
    assert config.memory.max_mb == 128
    assert config.device_id == "cam-7"
    assert config.batching.enabled is True
    assert config.model.preference == ["litert", "onnxruntime"]
    assert config.api.socket == Path("/tmp/x.sock")


def test_bad_environment_overrides_are_reported() -> None:
    found = issues({}, {"EDGERUN_MEMORY__MAXMB": "1", "EDGERUN_MEMORY__MAX_MB": "many"})
    assert "many" in found["memory.max_mb"]
    # A variable that names no setting is a warning, not a reason to stop a device.
    assert "memory.maxmb" not in found
    config = parse_config({}, {"EDGERUN_AARCH64_CACHE": "/x", "EDGERUN_MEMORY__MAXMB": "1"})
    assert config.memory.max_mb == 0


def test_check_config_warns_about_unknown_environment_variables(tmp: Path) -> None:
    from tests.helpers import DEMO_PUB

    path = tmp / "agent.toml"
    path.write_text(f'[trust]\npublic_keys = ["{DEMO_PUB}"]\n')
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "EDGERUN_MEMORY__MAXMB": "64"},
    )
    assert proc.returncode == 0
    assert (
        "warning: environment variable EDGERUN_MEMORY__MAXMB names no setting (ignored)"
        in proc.stdout
    )


def test_toml_file_errors(tmp: Path) -> None:
    bad = tmp / "bad.toml"
    bad.write_text("[memory\nmax_mb = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, {})
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp / "missing.toml", {})


def test_credentials_come_from_the_credentials_directory(tmp: Path) -> None:
    (tmp / "release.pub").write_bytes(b"KEY")
    env = {"CREDENTIALS_DIRECTORY": str(tmp)}
    assert read_credential("credential:release.pub", env) == b"KEY"
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        read_credential("credential:release.pub", {})
    with pytest.raises(ConfigError, match="plain file name"):
        read_credential("credential:../etc/passwd", env)
    with pytest.raises(ConfigError, match="cannot read"):
        read_credential("credential:missing", env)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, check=False
    )


def test_check_config_prints_every_problem_with_its_key_path(tmp: Path) -> None:
    path = tmp / "agent.toml"
    path.write_text(
        'device_id = "ok"\nlog_levle = "info"\n[memory]\nmax_mb = -5\n[api]\nmax_inflight = "x"\n'
    )
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 1
    assert "log_levle: unknown key" in proc.stdout
    assert "memory.max_mb: -5 is below the minimum 0" in proc.stdout
    assert "api.max_inflight: expected an integer" in proc.stdout


def test_check_config_semantic_problems(tmp: Path) -> None:
    path = tmp / "agent.toml"
    path.write_text(
        f'[model]\nbundle = "{tmp}/nope.edgebundle"\n[trust]\npublic_keys = ["{tmp}/k.pub"]\n'
    )
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 1
    assert "trust.public_keys[0]" in proc.stdout and "cannot read" in proc.stdout
    assert "model.bundle" in proc.stdout and "does not exist" in proc.stdout


def test_check_config_reports_cross_field_link_problems(tmp: Path) -> None:
    from tests.helpers import DEMO_PUB

    path = tmp / "agent.toml"
    path.write_text(
        f'[trust]\npublic_keys = ["{DEMO_PUB}"]\n'
        "[mqtt]\nenabled = true\nreconnect_min_s = 30.0\nreconnect_max_s = 5.0\n"
        '[mqtt.tls]\ncert_file = "/etc/edgerun/device.crt"\n'
    )
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 1
    assert "mqtt.reconnect_min_s: is above mqtt.reconnect_max_s" in proc.stdout
    assert "mqtt.tls.cert_file: mutual TLS needs both cert_file and key_file" in proc.stdout


def test_check_config_ok(tmp: Path) -> None:
    from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE

    path = tmp / "agent.toml"
    path.write_text(f'[model]\nbundle = "{SAMPLE_BUNDLE}"\n[trust]\npublic_keys = ["{DEMO_PUB}"]\n')
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 0, proc.stdout
    assert "OK" in proc.stdout

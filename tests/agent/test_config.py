"""Config: typed, strict, every problem reported with its key path."""

from __future__ import annotations

import os
import re
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
    # Not in the file, so the message says where it came from.
    assert found["memory.max_mb"].endswith("(set by EDGERUN_MEMORY__MAX_MB)")
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


# ------------------------------------------------------------ hostile values (issue 7)


def test_nan_and_inf_are_refused_for_every_float_field_from_toml_and_environment() -> None:
    import dataclasses
    import typing

    from agent.config.loader import _field_type

    def float_paths(cls: type, prefix: str = "") -> list[str]:
        out: list[str] = []
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                out += float_paths(tp, f"{prefix}{name}.")  # type: ignore[arg-type]
            elif tp is float:
                out.append(prefix + name)
        return out

    paths = float_paths(AgentConfig)
    assert len(paths) >= 10 and "memory.soft_limit_fraction" in paths
    for path in paths:
        assert _field_type(path.split(".")) is float
        *tables, leaf = path.split(".")
        for bad in (float("nan"), float("inf"), -float("inf")):
            data: dict[str, object] = {leaf: bad}
            for table in reversed(tables):
                data = {table: data}
            found = issues(data)
            assert "is not a finite number (allowed:" in found[path], (path, found)
        env = "EDGERUN_" + "__".join(p.upper() for p in path.split("."))
        for text in ("nan", "NaN", "inf", "-Infinity", "1e999"):
            found = issues({}, {env: text})
            assert "is not a finite number" in found[path], (path, text, found)


def test_messages_name_the_range_and_stay_short_for_huge_or_deep_values() -> None:
    found = issues(
        {
            "memory": {"check_interval_ms": 5, "max_mb": 2**62},
            "device_id": "x" * 100_000,
            "model": {"preference": [[[[[["deep"]]]]]]},
            "api": {"max_inflight": [1] * 100_000},
        }
    )
    assert found["memory.check_interval_ms"] == ("5 is below the minimum 10 (allowed: 10 to 10000)")
    assert "above the maximum" in found["memory.max_mb"]
    assert all(len(m) < 400 for m in found.values()), found


def test_nul_characters_in_strings_and_paths_are_refused() -> None:
    found = issues({"state_dir": "/var/lib/a\x00b", "device_id": "a\x00"})
    assert "has a NUL character" in found["state_dir"]
    assert "has a NUL character" in found["device_id"]


def test_undecodable_environment_names_are_reported_printably() -> None:
    from agent.config.loader import env_overrides

    _, unknown = env_overrides({"EDGERUN_X\udcff": "1"})
    assert unknown[0].message == "environment variable EDGERUN_X\\udcff names no setting"
    assert unknown[0].message.encode("utf-8")


def test_oversized_and_special_files_are_refused_without_blocking(tmp: Path) -> None:
    big = tmp / "big.toml"
    big.write_bytes(b"# " + b"x" * (2 * 1024 * 1024) + b"\n")
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    for path, message in (
        (big, "larger than the 1024 KiB"),
        (fifo, "is a FIFO (named pipe)"),
        (tmp, "is a directory"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            load_config(path, {})
        assert info.value.code == "config.unreadable"
    with pytest.raises(ConfigError, match="is a FIFO") as info:
        read_credential(str(fifo), {})


def test_deep_nesting_is_a_syntax_error_not_a_crash(tmp: Path) -> None:
    for text in (
        "a = " + "[" * 100_000 + "]" * 100_000,
        "a = " + "{b = " * 2000 + "1" + "}" * 2000,
        "[" + ".".join(["t"] * 40) + "]\nk = 1",
    ):
        path = tmp / "deep.toml"
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match="nested more than 16 levels") as info:
            load_config(path, {})
        assert info.value.code == "config.syntax"


def test_check_config_runs_the_start_up_checks(tmp: Path) -> None:
    from tests.helpers import DEMO_PUB

    (tmp / "file").write_text("")
    path = tmp / "agent.toml"
    path.write_text(
        f'state_dir = "{tmp}/file/state"\n[trust]\npublic_keys = ["{DEMO_PUB}"]\n'
        f'[api]\nsocket = "{tmp}/file/api.sock"\ntcp = "[::1]:99999"\n'
    )
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 1
    assert (
        f"[start.failed] state_dir: {tmp}/file/state: {tmp}/file exists and is not a directory"
        in proc.stdout
    )
    assert "[start.failed] api.socket:" in proc.stdout
    assert "[config.invalid] api.tcp:" in proc.stdout


def test_mqtt_config_set_takes_the_same_typed_checks() -> None:
    from agent.link.tunables import TunableError, validate

    for bad in (float("nan"), float("inf"), 0.0, "10"):
        with pytest.raises(TunableError, match=r"telemetry\.interval_s") as info:
            validate("telemetry.interval_s", bad)
        assert info.value.code == "config.invalid"
    assert validate("telemetry.interval_s", 2) == 2.0


def test_a_utf8_byte_order_mark_is_accepted(tmp: Path) -> None:
    path = tmp / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbfdevice_id = "cam-9"\n')
    assert load_config(path, {}).device_id == "cam-9"

"""The link's config sections: every bad value refused with its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config.loader import ConfigError, parse_config
from agent.link import components_for, settings
from agent.service import Agent, StartupError


def issues(data: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ=environ or {})
    return {i.path: i.message for i in info.value.issues}


def test_defaults_are_offline_and_strict() -> None:
    config = parse_config({}, environ={})
    assert config.mqtt.enabled is False
    assert config.mqtt.protocol == "5"
    assert config.commands.require_signature is True
    assert config.outbox.synchronous == "full"
    assert config.kubeedge.enabled is False


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"mqtt": {"port": 0}}, "mqtt.port"),
        ({"mqtt": {"port": 70000}}, "mqtt.port"),
        ({"mqtt": {"port": "1883"}}, "mqtt.port"),
        ({"mqtt": {"protocol": "3"}}, "mqtt.protocol"),
        ({"mqtt": {"host": "two words"}}, "mqtt.host"),
        ({"mqtt": {"client_id": "a/b"}}, "mqtt.client_id"),
        ({"mqtt": {"keepalive_s": 1}}, "mqtt.keepalive_s"),
        ({"mqtt": {"reconnect_max_s": 0}}, "mqtt.reconnect_max_s"),
        ({"mqtt": {"max_inflight": 0}}, "mqtt.max_inflight"),
        ({"mqtt": {"password": "hunter2"}}, "mqtt.password"),  # a secret, not a reference
        ({"mqtt": {"groups": "lab"}}, "mqtt.groups"),
        ({"mqtt": {"colour": "red"}}, "mqtt.colour"),
        ({"mqtt": {"tls": {"min_version": "1.1"}}}, "mqtt.tls.min_version"),
        ({"mqtt": {"tls": {"ca_file": "relative.pem"}}}, "mqtt.tls.ca_file"),
        ({"telemetry": {"interval_s": 0}}, "telemetry.interval_s"),
        ({"outbox": {"max_mb": 0}}, "outbox.max_mb"),
        ({"outbox": {"max_age_s": 0.5}}, "outbox.max_age_s"),
        ({"outbox": {"synchronous": "off"}}, "outbox.synchronous"),
        ({"commands": {"require_signature": "yes"}}, "commands.require_signature"),
        ({"commands": {"max_payload_kb": 0}}, "commands.max_payload_kb"),
        ({"commands": {"reply_cache_size": 0}}, "commands.reply_cache_size"),
        ({"commands": {"log_lines": 5}}, "commands.log_lines"),
        ({"kubeedge": {"namespace": "Prod"}}, "kubeedge.namespace"),
        ({"kubeedge": {"device_name": "-x"}}, "kubeedge.device_name"),
    ],
)
def test_bad_values_are_refused_with_their_key_path(data: dict[str, Any], path: str) -> None:
    found = issues(data)
    assert path in found, found
    assert found[path]


def test_environment_overrides_reach_the_new_sections() -> None:
    config = parse_config(
        {}, environ={"EDGERUN_MQTT__PORT": "8883", "EDGERUN_MQTT__TLS__ENABLED": "1"}
    )
    assert config.mqtt.port == 8883 and config.mqtt.tls.enabled
    assert "mqtt.port" in issues({}, {"EDGERUN_MQTT__PORT": "eighty"})


def check(data: dict[str, Any]) -> dict[str, str]:
    return {i.path: i.message for i in settings.check(parse_config(data, environ={}))}


def test_cross_field_checks() -> None:
    found = check({
        "mqtt": {"groups": ["ok", "not/ok", "ok"], "reconnect_min_s": 5.0, "reconnect_max_s": 1.0,
                 "password": "credential:pw", "tls": {"cert_file": "/c.pem"}},
        "kubeedge": {"enabled": True},
        "device_id": "Dev_A",
    })  # fmt: skip
    assert set(found) == {
        "mqtt.groups[1]", "mqtt.groups", "mqtt.reconnect_min_s", "mqtt.password",
        "mqtt.tls.cert_file", "mqtt.tls.enabled", "commands.console_keys", "kubeedge.device_name",
    }  # fmt: skip
    assert "no command could ever run" in found["commands.console_keys"]
    assert check({"commands": {"require_signature": False}}) == {}


def test_a_bad_link_config_stops_the_agent_with_the_key_named(tmp: Path) -> None:
    bad_key = tmp / "console.pub"
    bad_key.write_text("not a key")
    config = parse_config(
        {"state_dir": str(tmp / "s"), "api": {"socket": None},
         "mqtt": {"enabled": True}, "commands": {"console_keys": [str(bad_key)]}},
        environ={},
    )  # fmt: skip
    agent = Agent(config)
    with pytest.raises(StartupError, match=r"commands\.console_keys\[0\]"):
        components_for(agent)
    config = parse_config(
        {"state_dir": str(tmp / "s"), "api": {"socket": None}, "mqtt": {"enabled": True,
         "tls": {"enabled": True, "ca_file": str(tmp / "missing.pem")}},
         "commands": {"require_signature": False}},
        environ={},
    )  # fmt: skip
    with pytest.raises(StartupError, match=r"mqtt\.tls\.ca_file"):
        components_for(Agent(config))

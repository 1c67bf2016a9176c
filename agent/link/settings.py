"""Turn the `mqtt`, `commands` and `kubeedge` config sections into ready-to-use parts.

Checks that need more than one field (or a file) live here, and every problem is
reported with its config key path, like the loader does.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import __version__
from agent.config.loader import CREDENTIAL_PREFIX, read_credential, read_public_keys
from agent.config.model import AgentConfig, TlsConfig
from agent.config.typed import ConfigError, ConfigIssue
from agent.link.client import ClientSettings, Will
from agent.protocol.messages import Status, dumps
from agent.protocol.topics import (
    DeviceTopics,
    TopicError,
    TwinTopics,
    device_id,
    group_name,
    portability_problem,
)


def check(config: AgentConfig) -> list[ConfigIssue]:
    """Cross-field problems of the link's sections (single fields are checked on load)."""
    issues: list[ConfigIssue] = []
    mqtt = config.mqtt
    try:
        device_id(config.device_id)
    except TopicError as exc:
        issues.append(ConfigIssue("device_id", str(exc)))
    for i, group in enumerate(mqtt.groups):
        try:
            group_name(group)
        except TopicError as exc:
            issues.append(ConfigIssue(f"mqtt.groups[{i}]", str(exc)))
    if len(set(mqtt.groups)) != len(mqtt.groups):
        issues.append(ConfigIssue("mqtt.groups", "a group is listed twice"))
    if mqtt.reconnect_min_s > mqtt.reconnect_max_s:
        issues.append(ConfigIssue("mqtt.reconnect_min_s", "is above mqtt.reconnect_max_s"))
    if mqtt.password and not mqtt.username:
        issues.append(ConfigIssue("mqtt.password", "is set but mqtt.username is empty"))
    tls = mqtt.tls
    if bool(tls.cert_file) != bool(tls.key_file):
        issues.append(
            ConfigIssue("mqtt.tls.cert_file", "mutual TLS needs both cert_file and key_file")
        )
    if (tls.ca_file or tls.cert_file) and not tls.enabled:
        issues.append(ConfigIssue("mqtt.tls.enabled", "TLS files are set but TLS is off"))
    if config.commands.require_signature and not config.commands.console_keys:
        issues.append(
            ConfigIssue(
                "commands.console_keys",
                "empty while commands.require_signature is on: no command could ever run; "
                "add the fleet console's public key (or turn signatures off, for tests only)",
            )
        )
    if config.kubeedge.enabled:
        try:
            twin_topics(config)
        except TopicError as exc:
            key = "kubeedge.device_name" if not config.kubeedge.device_name else "kubeedge"
            issues.append(ConfigIssue(key, str(exc)))
    return issues


def portability_warnings(config: AgentConfig) -> list[str]:
    """Names in this config that clustered brokers such as NATS cannot carry in topics.
    Warnings, not errors: mosquitto, EMQX, HiveMQ and VerneMQ take them, and a fleet
    may already use them (docs/fleet.md "Clustered brokers")."""
    named = [("device_id", config.device_id)]
    named += [(f"mqtt.groups[{i}]", g) for i, g in enumerate(config.mqtt.groups)]
    if config.kubeedge.enabled:
        named.append(("kubeedge.device_name", config.kubeedge.device_name or config.device_id))
    found = []
    for key, value in named:
        problem = portability_problem(key, value)
        if problem is not None:
            found.append(problem)
    return found


def twin_topics(config: AgentConfig) -> TwinTopics:
    ke = config.kubeedge
    return TwinTopics(ke.namespace, ke.device_name or config.device_id)


def secret_path(ref: str, environ: Mapping[str, str] | None = None) -> Path:
    """A config file reference as a path: "credential:NAME" is $CREDENTIALS_DIRECTORY/NAME."""
    env = os.environ if environ is None else environ
    if ref.startswith(CREDENTIAL_PREFIX):
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                [ConfigIssue(ref, "CREDENTIALS_DIRECTORY is not set (systemd LoadCredential=)")]
            )
        return Path(directory) / ref[len(CREDENTIAL_PREFIX) :]
    return Path(ref)


def tls_context(tls: TlsConfig, environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        if tls.ca_file:
            ctx.load_verify_locations(cafile=str(secret_path(tls.ca_file, environ)))
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([ConfigIssue("mqtt.tls.ca_file", _why(exc))]) from exc
    if tls.cert_file:
        try:
            ctx.load_cert_chain(
                str(secret_path(tls.cert_file, environ)), str(secret_path(tls.key_file, environ))
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([ConfigIssue("mqtt.tls.cert_file", _why(exc))]) from exc
    return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read {exc.filename or 'file'}: {exc.strerror}"
    return f"not a usable PEM file: {exc}"


def offline_status(config: AgentConfig, since: float, reason: str) -> bytes:
    return dumps(Status(config.device_id, "offline", __version__, since, reason).to_json())


def client_settings(
    config: AgentConfig, since: float, environ: Mapping[str, str] | None = None
) -> ClientSettings:
    """Everything the MQTT client needs; raises ConfigError naming the key at fault."""
    mqtt = config.mqtt
    password = None
    if mqtt.password:
        try:
            password = read_credential(mqtt.password, environ).decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise ConfigError([ConfigIssue("mqtt.password", "secret is not UTF-8")]) from exc
        except ConfigError as exc:
            raise ConfigError(
                [ConfigIssue("mqtt.password", str(i.message)) for i in exc.issues]
            ) from exc
    will = Will(
        DeviceTopics(config.device_id).status,
        offline_status(config, since, "connection lost (last will)"),
    )
    return ClientSettings(
        host=mqtt.host,
        port=mqtt.port,
        client_id=mqtt.client_id or config.device_id,
        protocol=mqtt.protocol,
        keepalive_s=mqtt.keepalive_s,
        connect_timeout_s=mqtt.connect_timeout_s,
        username=mqtt.username or None,
        password=password,
        tls=tls_context(mqtt.tls, environ) if mqtt.tls.enabled else None,
        reconnect_min_s=mqtt.reconnect_min_s,
        reconnect_max_s=mqtt.reconnect_max_s,
        max_inflight=mqtt.max_inflight,
        will=will,
        max_packet_bytes=max_packet_bytes(config),
    )


# Room for the topic, properties and a twin document beside the largest command.
PACKET_HEADROOM = 64 * 1024


def max_packet_bytes(config: AgentConfig) -> int:
    """The largest packet the device accepts (MQTT v5): a command refused for its size
    still arrives (and gets its `command.too_large` reply) up to PACKET_HEADROOM past
    `commands.max_payload_kb`; anything bigger the broker never sends."""
    return config.commands.max_payload_kb * 1024 + PACKET_HEADROOM


def console_keys(
    config: AgentConfig, environ: Mapping[str, str] | None = None
) -> list[Ed25519PublicKey]:
    return read_public_keys(list(config.commands.console_keys), "commands.console_keys", environ)

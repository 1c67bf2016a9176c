"""Shared fixtures of the fleet console's tests (every fleet test module uses them).

broker          a real mosquitto, plain listener, anonymous; one per test module
                (retained messages of one module never leak into another)
secure_broker   mosquitto with TLS, passwords and the recommended device ACL
                (SecureBroker: .broker, .pki, .users, .console_user)
console_key     the console's ed25519 private key (one per session)
console_key_file, console_pub   its private / public key as PEM files
fleet_toml(dir, **keys) -> Path   a fleet.toml for `broker` and the console key;
                keys override (None drops one), e.g. fleet_toml(tmp_path, protocol="3.1.1")
fleet_config(**keys) -> FleetConfig   the same, loaded
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.config import FleetConfig
from tests.mqtt_broker import Broker, Pki, device_acl, make_pki

CONSOLE_USER = "console"
CONSOLE_PASSWORD = "console-secret"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker(tmp_path_factory.mktemp("broker")) as b:
        yield b


@dataclass
class SecureBroker:
    broker: Broker
    pki: Pki
    users: dict[str, str]
    console_user: str = CONSOLE_USER

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.broker.port}"


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """TLS (server certificate for localhost/127.0.0.1), usernames and passwords, and
    docs/mqtt.md's ACL: the console may use edgerun/v1/#, a device only its own topics.
    Devices `dev-1`..`dev-3` have password `pw-<id>`."""
    directory = tmp_path_factory.mktemp("secure-broker")
    pki = make_pki(directory / "pki")
    users = {CONSOLE_USER: CONSOLE_PASSWORD, **{f"dev-{i}": f"pw-dev-{i}" for i in (1, 2, 3)}}
    with Broker(directory, pki=pki, users=users, acl=device_acl([CONSOLE_USER])) as b:
        yield SecureBroker(b, pki, users)


@pytest.fixture(scope="session")
def console_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def console_key_file(
    tmp_path_factory: pytest.TempPathFactory, console_key: Ed25519PrivateKey
) -> Path:
    path = tmp_path_factory.mktemp("console-key") / "console.key"
    path.write_bytes(
        console_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def console_pub(console_key_file: Path, console_key: Ed25519PrivateKey) -> Path:
    path = console_key_file.with_name("console.pub")
    path.write_bytes(
        console_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"fleet_toml cannot write {value!r}")


def write_fleet_toml(path: Path, keys: dict[str, Any]) -> Path:
    lines = [f"{k} = {_toml_value(v)}" for k, v in keys.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fleet_toml(broker: Broker, console_key_file: Path) -> Callable[..., Path]:
    """fleet_toml(directory, **keys) -> the path of a fleet.toml written there."""

    def write(directory: Path, **keys: Any) -> Path:
        defaults: dict[str, Any] = {
            "broker": f"mqtt://{broker.host}:{broker.port}",
            "key": console_key_file,
            "operator": "tester",
            "console_id": f"test-{uuid.uuid4().hex[:8]}",
            "db": directory / "fleet.db",
            "timeout_s": 10,
        }
        defaults.update(keys)
        directory.mkdir(parents=True, exist_ok=True)
        return write_fleet_toml(directory / "fleet.toml", defaults)

    return write


@pytest.fixture
def fleet_config(fleet_toml: Callable[..., Path], tmp_path: Path) -> Callable[..., FleetConfig]:
    """fleet_config(**keys) -> FleetConfig for `broker` and the console key."""

    def load(**keys: Any) -> FleetConfig:
        return FleetConfig.load(fleet_toml(tmp_path / f"cfg-{uuid.uuid4().hex[:6]}", **keys))

    return load

"""The console's settings: `fleet.toml`, then the CLI's global options on top.

    broker = "mqtts://broker.example.net:8883"   # mqtt://host[:1883] or mqtts://host[:8883]
    protocol = "5"                               # or "3.1.1"
    username = "console"
    password_file = "credential:mqtt-password"   # or an absolute path; never the secret
    ca_file = "/etc/edgerun/broker-ca.pem"       # TLS (mqtts); cert_file + key_file: mutual
    key = "/etc/edgerun/console.key"             # ed25519 signing key (PEM)
    operator = "alice"                           # who is recorded (default: $USER)
    console_id = "ops-1"                         # reply topic name (default: host + random)
    db = "fleet.db"                              # or postgresql://…
    timeout_s = 10                               # how long a command waits for its reply
    command_lifetime_s = 60                      # expires_at - issued_at of every command
    shared_group = ""                            # $share/<group>/ for telemetry (workers)

Every value is checked when the file loads; a bad one is refused as FleetError
(console.config) naming the key, the value and what is allowed. Files (password, TLS,
key) are read only when a command needs them, so `history` works without a key.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.topics import NAME_RE
from fleet.errors import FleetCode, FleetError

CREDENTIAL_PREFIX = "credential:"
CREDENTIAL_RE = re.compile(r"credential:[A-Za-z0-9._-]{1,128}")
MAX_SECRET_BYTES = 64 * 1024
DEFAULT_FILE = Path("fleet.toml")
# Tables other parts of the console read (kept raw, checked by their owners).
SECTIONS = frozenset({"rollout", "watch", "simulate"})
KEYS = (
    "broker",
    "protocol",
    "username",
    "password_file",
    "ca_file",
    "cert_file",
    "key_file",
    "key",
    "operator",
    "console_id",
    "db",
    "timeout_s",
    "command_lifetime_s",
    "connect_timeout_s",
    "shared_group",
)
# Bounds of the numbers (seconds). A lifetime past the devices' default
# commands.max_lifetime_s (1 h) would be refused by every device that keeps it.
NUMBERS = {
    "timeout_s": (0.05, 3600.0),
    "command_lifetime_s": (1.0, 3600.0),
    "connect_timeout_s": (0.1, 300.0),
}


def _bad(key: str, value: object, allowed: str) -> FleetError:
    shown = repr(value) if isinstance(value, str) else str(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return FleetError(FleetCode.CONFIG, f"{key} = {shown} is not allowed: {allowed}", key=key)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_broker(value: object, key: str = "broker") -> BrokerAddress:
    """`mqtt://host[:port]` or `mqtts://host[:port]` (default ports 1883 / 8883)."""
    allowed = "mqtt://host[:port] or mqtts://host[:port] (port 1-65535)"
    if not isinstance(value, str) or not value:
        raise _bad(key, value, allowed)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise _bad(key, value, f"{allowed} ({exc})") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise _bad(key, value, allowed)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise _bad(key, value, f"{allowed}; no path, query or user in the URL")
    tls = parts.scheme == "mqtts"
    if port is None:
        port = 8883 if tls else 1883
    if not 1 <= port <= 65535:
        raise _bad(key, value, allowed)
    return BrokerAddress(parts.hostname, port, tls)


def default_console_id() -> str:
    """This host's name (cut to what a topic level allows) and a random suffix, so two
    consoles on one host never share a reply topic."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40].strip("-") or "console"
    return f"{host}-{os.urandom(3).hex()}"


def default_operator() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser() or "unknown"
    except (OSError, KeyError):
        return "unknown"


@dataclass(frozen=True)
class FleetConfig:
    broker: BrokerAddress = BrokerAddress("127.0.0.1", 1883, False)
    protocol: str = "5"
    username: str | None = None
    password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    key_path: str | None = None
    operator: str = field(default_factory=default_operator)
    console_id: str = field(default_factory=default_console_id)
    db: str = "fleet.db"
    timeout_s: float = 10.0
    command_lifetime_s: float = 60.0
    connect_timeout_s: float = 5.0
    shared_group: str | None = None
    source: str = "defaults"  # where the settings came from (for messages)
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: Path | str | None = None, **overrides: Any) -> FleetConfig:
        """`path` (or ./fleet.toml when it exists), then `overrides` (fleet.toml key
        names; None values are ignored) on top. Raises FleetError(console.config)."""
        data: dict[str, Any] = {}
        source = "defaults"
        if path is None and DEFAULT_FILE.is_file():
            path = DEFAULT_FILE
        if path is not None:
            path = Path(path)
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise FleetError(
                    FleetCode.CONFIG, f"cannot read the console config {path}: {exc.strerror}"
                ) from None
            try:
                data = tomllib.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise FleetError(FleetCode.CONFIG, f"{path} is not valid TOML: {exc}") from None
            source = str(path)
        for name, value in overrides.items():
            if value is not None:
                data[name] = value
        return cls.from_mapping(data, source)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "settings") -> FleetConfig:
        sections: dict[str, Mapping[str, Any]] = {}
        for name in data:
            if name in SECTIONS:
                if not isinstance(data[name], dict):
                    raise _bad(name, data[name], "a table ([" + name + "])")
                sections[name] = data[name]
            elif name not in KEYS:
                raise FleetError(
                    FleetCode.CONFIG,
                    f"unknown key {name!r} in {source}; the keys are {', '.join(KEYS)} "
                    f"and the tables [{'], ['.join(sorted(SECTIONS))}]",
                    key=name,
                )
        kw: dict[str, Any] = {"source": source, "sections": sections}
        if "broker" in data:
            kw["broker"] = parse_broker(data["broker"])
        if "protocol" in data:
            value = data["protocol"]
            if isinstance(value, int | float) and not isinstance(value, bool) and value == 5:
                value = "5"
            if value not in ("5", "3.1.1"):
                raise _bad("protocol", value, '"5" or "3.1.1"')
            kw["protocol"] = value
        for key, attr in (("username", "username"), ("operator", "operator")):
            if key in data:
                kw[attr] = _text(key, data[key])
        for key, attr in (
            ("password_file", "password_file"),
            ("ca_file", "tls_ca"),
            ("cert_file", "tls_cert"),
            ("key_file", "tls_key"),
            ("key", "key_path"),
        ):
            if key in data and data[key] != "":
                kw[attr] = _file_ref(key, data[key])
        if "console_id" in data:
            value = data["console_id"]
            if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
                raise _bad("console_id", value, "1-64 of A-Za-z0-9._- (it names a topic level)")
            kw["console_id"] = value
        if "db" in data:
            value = data["db"]
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            kw["db"] = _text("db", value)
        for key, (low, high) in NUMBERS.items():
            if key in data:
                kw[key] = _number(key, data[key], low, high)
        if "shared_group" in data and data["shared_group"] not in ("", None):
            value = data["shared_group"]
            if not isinstance(value, str) or not NAME_RE.fullmatch(value):
                raise _bad("shared_group", value, "1-64 of A-Za-z0-9._- (a $share group name)")
            kw["shared_group"] = value
        config = cls(**kw)
        if (config.tls_cert is None) != (config.tls_key is None):
            raise FleetError(
                FleetCode.CONFIG,
                "cert_file and key_file go together (mutual TLS): set both or neither",
                key="cert_file" if config.tls_cert is None else "key_file",
            )
        if config.password_file is not None and config.username is None:
            raise FleetError(
                FleetCode.CONFIG, "password_file is set but username is not", key="username"
            )
        return config

    def replace(self, **changes: Any) -> FleetConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ secrets

    def password(self, environ: Mapping[str, str] | None = None) -> str | None:
        if self.password_file is None:
            return None
        data = read_secret("password_file", self.password_file, environ)
        try:
            return data.decode("utf-8").strip("\r\n")
        except UnicodeDecodeError:
            raise _bad("password_file", self.password_file, "a UTF-8 text file") from None

    def signing_key(self, environ: Mapping[str, str] | None = None) -> Ed25519PrivateKey:
        """The console's ed25519 private key; FleetError(console.config) when none is
        configured or it is not one."""
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if self.key_path is None:
            raise FleetError(
                FleetCode.CONFIG,
                'no signing key: set key = "/path/console.key" in fleet.toml or pass --key '
                "(ed25519 PEM; `edge-agent keygen` makes one)",
                key="key",
            )
        data = read_secret("key", self.key_path, environ)
        try:
            key = load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise _bad(
                "key", self.key_path, f"an unencrypted ed25519 PEM private key ({exc})"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise _bad("key", self.key_path, "an ed25519 private key (this is another kind)")
        return key

    def tls_file(self, key: str) -> str | None:
        """A TLS file as a path paho can open; `credential:NAME` resolves to the file in
        $CREDENTIALS_DIRECTORY (checked readable here, so the error names the key)."""
        ref = {"ca_file": self.tls_ca, "cert_file": self.tls_cert, "key_file": self.tls_key}[key]
        if ref is None:
            return None
        path = resolve_ref(key, ref)
        read_secret(key, str(path))
        return str(path)


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _bad(key, value, "a non-empty string")
    return value


def _number(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(key, value, f"a number of seconds from {low:g} to {high:g}")
    if not low <= float(value) <= high:
        raise _bad(key, value, f"a number of seconds from {low:g} to {high:g}")
    return float(value)


def _file_ref(key: str, value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _bad(key, value, 'a file path or "credential:NAME"')
    if value.startswith(CREDENTIAL_PREFIX) and not CREDENTIAL_RE.fullmatch(value):
        raise _bad(key, value, '"credential:NAME" with NAME 1-128 of A-Za-z0-9._-')
    return value


def resolve_ref(key: str, ref: str, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if ref.startswith(CREDENTIAL_PREFIX):
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise _bad(key, ref, "CREDENTIALS_DIRECTORY is not set (systemd LoadCredential=)")
        return Path(directory) / ref[len(CREDENTIAL_PREFIX) :]
    return Path(ref).expanduser()


def read_secret(key: str, ref: str, environ: Mapping[str, str] | None = None) -> bytes:
    path = resolve_ref(key, ref, environ)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise _bad(key, ref, f"a readable file ({path}: {exc.strerror})") from None
    if len(data) > MAX_SECRET_BYTES:
        raise _bad(key, ref, f"a file of at most {MAX_SECRET_BYTES // 1024} KiB")
    return data

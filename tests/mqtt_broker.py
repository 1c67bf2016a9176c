"""A real mosquitto for tests: free port, generated config, optional TLS, users and ACL.

    with Broker(tmp_path) as broker:                 # plain, anonymous
    with Broker(tmp_path, pki=make_pki(tmp_path), require_certificate=True) as broker:
    with Broker(tmp_path, users={"dev-a": "pw"}, acl=device_acl(["console"])) as broker:
    with Broker(tmp_path, dynsec=deny_subscribe(["edgerun/v1/+/bundle/+/need"])) as broker:

`kill()` / `start()` simulate a broker crash and restart on the same port.
Fleet and system tests import this module too; it never touches 127.0.0.1:1883.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
DYNSEC_PLUGINS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- TLS


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    *,
    ca: bool = False,
    server: bool = False,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        assert issuer_key is not None
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if dns or ips:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@dataclass
class Pki:
    """A throw-away CA with a server certificate for 127.0.0.1/localhost."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    _ca: x509.Certificate = field(repr=False)
    _ca_private: ec.EllipticCurvePrivateKey = field(repr=False)

    def client(self, common_name: str) -> tuple[Path, Path]:
        """A client certificate (CN = `common_name`) and its key, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(common_name, key, self._ca.subject, self._ca_private)
        cert_path = self.directory / f"client-{common_name}.crt"
        key_path = self.directory / f"client-{common_name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path


def make_pki(directory: Path, name: str = "edgerun-test-ca") -> Pki:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(name, ca_key, None, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(
        "localhost", server_key, ca.subject, ca_key, server=True,
        dns=("localhost",), ips=("127.0.0.1",),
    )  # fmt: skip
    paths = {n: directory / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")}
    paths["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["ca.key"], ca_key)
    paths["server.crt"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["server.key"], server_key)
    return Pki(
        directory, paths["ca.crt"], paths["ca.key"], paths["server.crt"], paths["server.key"],
        ca, ca_key,
    )  # fmt: skip


# ----------------------------------------------------------------------------- ACL


def device_acl(consoles: list[str]) -> str:
    """The ACL docs/mqtt.md recommends: a device (username = device id) may write only
    its own streams and replies, and read only its own and group commands."""
    lines = []
    for console in consoles:
        lines += [f"user {console}", "topic readwrite edgerun/v1/#", "topic readwrite $hw/#", ""]
    lines += [
        "pattern write edgerun/v1/%u/status",
        "pattern write edgerun/v1/%u/state",
        "pattern write edgerun/v1/%u/telemetry",
        "pattern write edgerun/v1/%u/events",
        "pattern read edgerun/v1/%u/cmd/#",
        "pattern read edgerun/v1/group/+/cmd/#",
        "pattern write edgerun/v1/console/+/reply",
        "pattern read edgerun/v1/%u/bundle/+",
        "pattern write edgerun/v1/%u/bundle/+/need",
    ]
    return "\n".join(lines) + "\n"


def deny_subscribe(patterns: list[str]) -> dict[str, object]:
    """A dynamic-security config (mosquitto 2's plugin) under which anonymous clients
    may do anything but subscribe to `patterns`: the broker answers such a SUBSCRIBE
    with a failure code (0x80 in MQTT 3.1.1, 0x87 in 5). An `acl_file` cannot do this:
    mosquitto grants every SUBSCRIBE under it and only filters what it delivers."""
    return {
        "defaultACLAccess": {
            "publishClientSend": True,
            "publishClientReceive": True,
            "subscribe": True,
            "unsubscribe": True,
        },
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "denied"}]}],
        "roles": [
            {
                "rolename": "denied",
                "acls": [
                    {"acltype": "subscribePattern", "topic": p, "priority": 0, "allow": False}
                    for p in patterns
                ],
            }
        ],
        "anonymousGroup": "anonymous",
    }


def dynsec_plugin() -> str | None:
    return next((p for p in DYNSEC_PLUGINS if Path(p).exists()), None)


# ----------------------------------------------------------------------------- broker


class Broker:
    host = "127.0.0.1"

    def __init__(
        self,
        directory: Path,
        *,
        pki: Pki | None = None,
        require_certificate: bool = False,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        persistence: bool = False,
        port: int | None = None,
        dynsec: dict[str, object] | None = None,
    ) -> None:
        """`dynsec`: a dynamic-security plugin config (see `deny_subscribe`)."""
        self.directory = Path(directory) / f"broker-{os.urandom(3).hex()}"
        self.directory.mkdir(parents=True)
        self.pki = pki
        self.port = port or free_port()
        self.log_path = self.directory / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        lines = [
            "user root",  # tests run as root; keep access to the generated files
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if users or require_certificate else 'true'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_queued_messages 100000",
            "set_tcp_nodelay true",
        ]
        if persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.directory}/",
                "autosave_interval 1",
                "autosave_on_changes true",
            ]
        else:
            lines.append("persistence false")
        if pki is not None:
            lines += [
                f"cafile {pki.ca_cert}",
                f"certfile {pki.server_cert}",
                f"keyfile {pki.server_key}",
                "tls_version tlsv1.2",
            ]
            if require_certificate:
                lines += ["require_certificate true", "use_identity_as_username true"]
        if users:
            pw = self.directory / "passwords"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(pw), user, password],
                    check=True,
                    capture_output=True,
                )
            lines.append(f"password_file {pw}")
        if acl is not None:
            acl_path = self.directory / "acl"
            acl_path.write_text(acl)
            lines.append(f"acl_file {acl_path}")
        if dynsec is not None:
            plugin = dynsec_plugin()
            if plugin is None:
                raise RuntimeError("mosquitto's dynamic security plugin is not installed")
            dynsec_path = self.directory / "dynamic-security.json"
            dynsec_path.write_text(json.dumps(dynsec))
            lines += [f"plugin {plugin}", f"plugin_opt_config_file {dynsec_path}"]
        self.config = self.directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self, timeout: float = 10.0) -> Broker:
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(self.address, timeout=0.2):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, nothing saved."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ----------------------------------------------------------------------------- a listener


class Listener:
    """A paho client that records everything on its subscriptions (a stand-in console).

    It reconnects by itself and, with `session=True`, keeps a persistent session so a
    broker restart (with persistence on) does not lose what was queued for it.
    """

    def __init__(
        self,
        broker: Broker,
        filters: list[str],
        *,
        client_id: str | None = None,
        protocol: int = 5,
        username: str | None = None,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,  # (ca, cert, key)
        session: bool = False,
    ) -> None:
        self.filters = filters
        self.messages: list[tuple[str, bytes, bool, object]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        v5 = protocol == 5
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"listener-{os.urandom(4).hex()}",
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else not session,
        )
        self.client.reconnect_delay_set(0.02, 0.2)  # type: ignore[arg-type]  # floats work
        if username:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        connect_props = None
        if v5 and session:
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = 3600
        self.client.connect(
            broker.host,
            broker.port,
            keepalive=5,
            clean_start=not session if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect_props,
        )
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("listener could not subscribe")

    def _on_connect(
        self, client: object, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        sock = self.client.socket()
        if isinstance(sock, socket.socket):  # no Nagle: see agent/link/client.py
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.subscribe([(f, 1) for f in self.filters])

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        with self._cond:
            self.messages.append(
                (msg.topic, bytes(msg.payload), bool(msg.retain), getattr(msg, "properties", None))  # type: ignore[attr-defined]
            )
            self._cond.notify_all()

    def on(self, topic_suffix: str) -> list[bytes]:
        with self._cond:
            return [p for t, p, _, _ in self.messages if t.endswith(topic_suffix)]

    def wait_for(self, predicate: object, timeout: float = 10.0) -> bool:
        """Wait until `predicate(self)` is true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):  # type: ignore[operator]
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

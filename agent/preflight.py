"""Checks of a loaded config against this machine, shared by check-config and start-up.

The typed model checks each value alone; these check what only the machine can
answer: is the API address an address here, is the port free, does the socket path
fit in sun_path, can the state dir be created. `edge-agent check-config` runs all
of them and start-up runs the same functions, so a config check-config passes does
not fail at start.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config.model import AgentConfig
from agent.config.typed import INVALID, ConfigError, show
from agent.regular_files import check_regular

# Stable codes (DESIGN.md "Error codes") besides the config.* ones: the machine
# refuses what the config asks (port taken, directory not writable), the state dir
# is locked by another agent, or an unexpected internal failure.
START_FAILED = "start.failed"
START_LOCKED = "start.locked"
START_INTERNAL = "start.internal"

# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    code: str = INVALID
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class TcpAddressError(ValueError):
    pass


def parse_tcp(text: str) -> tuple[str, int]:
    """`api.tcp` as (host, port); host is an IP literal (brackets removed) or a name."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise TcpAddressError(f"{show(text)} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    if not port_text.isdigit() or not port_text.isascii():
        raise TcpAddressError(f"port {show(port_text)} is not a number")
    port = int(port_text)
    if port > 65535:
        raise TcpAddressError(
            f"port {port} is out of range (allowed: 1 to 65535; 0 lets the kernel choose)"
        )
    if host.startswith("[") != host.endswith("]"):
        raise TcpAddressError(f"host {show(host)} has an unmatched bracket")
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise TcpAddressError(f"[{show(host)}] is not an IPv6 address") from None
    return host, port


def tcp_family(host: str) -> socket.AddressFamily:
    # The same rule the API server binds by: a colon means IPv6.
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_tcp(text: str, in_use_note: str = "") -> list[Problem]:
    key = "api.tcp"
    try:
        host, port = parse_tcp(text)
    except TcpAddressError as exc:
        return [Problem(key, str(exc))]
    family = tcp_family(host)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            ip = "IPv6" if family == socket.AF_INET6 else "IPv4"
            return [Problem(key, f"host {show(host)} does not resolve to an {ip} address: {why}")]
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # e.g. IPv6 switched off in this kernel
        return [Problem(key, f"cannot listen on {text}: {exc.strerror or exc}", START_FAILED)]
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return [_bind_problem(key, text, exc, in_use_note)]
    return []


def _bind_problem(key: str, address: str, exc: OSError, in_use_note: str) -> Problem:
    if exc.errno == errno.EADDRINUSE:
        if in_use_note:
            return Problem(key, f"{address} is in use {in_use_note}", START_FAILED, warning=True)
        return Problem(key, f"{address} is in use by another process", START_FAILED)
    if exc.errno == errno.EADDRNOTAVAIL:
        return Problem(key, f"{address} is not an address of this machine")
    if exc.errno == errno.EACCES:
        return Problem(
            key,
            f"cannot listen on {address}: ports below 1024 need CAP_NET_BIND_SERVICE",
            START_FAILED,
        )
    return Problem(key, f"cannot listen on {address}: {exc.strerror or exc}", START_FAILED)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_directory(key: str, directory: Path) -> list[Problem]:
    """`directory` exists as a writable directory, or can be created."""
    base = _nearest_existing(directory)
    try:
        mode = os.stat(base).st_mode
    except OSError as exc:
        return [Problem(key, f"{directory}: {base} cannot be examined: {exc.strerror}")]
    if not stat.S_ISDIR(mode):
        return [Problem(key, f"{directory}: {base} exists and is not a directory", START_FAILED)]
    if not os.access(base, os.W_OK | os.X_OK):
        what = (
            "is not writable"
            if base == Path(os.path.abspath(directory))
            else (f"cannot be created: {base} is not writable")
        )
        return [Problem(key, f"{directory} {what} by this user (uid {os.getuid()})", START_FAILED)]
    return []


def check_state_dir(state_dir: Path) -> list[Problem]:
    """`state_dir` can be created or written, and what the store makes in it is usable."""
    problems = check_directory("state_dir", state_dir)
    if problems:
        return problems
    for name in ("bundles",):
        path = state_dir / name
        if os.path.lexists(path) and not path.is_dir():
            problems.append(
                Problem("state_dir", f"{path} exists and is not a directory", START_FAILED)
            )
    return problems


def check_socket(path: Path, in_use_note: str = "") -> list[Problem]:
    key = "api.socket"
    size = len(os.fsencode(str(path)))
    if size > MAX_SOCKET_PATH:
        return [
            Problem(
                key,
                f"{show(str(path))} is {size} bytes long; a Unix socket path may have at "
                f"most {MAX_SOCKET_PATH}",
            )
        ]
    problems = check_directory(key, path.parent)
    if problems:
        return problems
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [Problem(key, f"{path} cannot be examined: {exc.strerror}", START_FAILED)]
    if not stat.S_ISSOCK(mode):
        return [
            Problem(
                key,
                f"{path} exists and is not a socket; the agent does not replace it",
                START_FAILED,
            )
        ]
    # A socket file someone still accepts on belongs to a live server: replacing it
    # would leave that server running and unreachable.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return []  # left behind by a process that is gone: start replaces it
        except PermissionError:
            return [
                Problem(
                    key,
                    f"{path} exists and this user (uid {os.getuid()}) may not connect to it; "
                    "remove it if no server uses it",
                    START_FAILED,
                )
            ]
        except OSError:
            pass  # a server too busy to accept (full backlog) is still a live server
    if in_use_note:
        return [Problem(key, f"{path} is in use {in_use_note}", START_FAILED, warning=True)]
    return [Problem(key, f"{path} is in use by another running server", START_FAILED)]


def check_api(config: AgentConfig, in_use_note: str = "") -> list[Problem]:
    problems = []
    if config.api.socket is not None:
        problems += check_socket(Path(config.api.socket), in_use_note)
    if config.api.tcp:
        problems += check_tcp(config.api.tcp, in_use_note)
    problems += check_token(config)
    return problems


def check_token(config: AgentConfig) -> list[Problem]:
    """The API token as start-up reads it: required beyond loopback, readable, strong."""
    from agent.api.auth import ApiSetupError, load_token

    try:
        load_token(config.api)
    except ApiSetupError as exc:
        return [Problem("api.token", str(exc))]
    return []


def check_bundle(config: AgentConfig) -> list[Problem]:
    bundle = config.model.bundle
    if bundle is None:
        return []
    try:
        check_regular(Path(bundle))
    except FileNotFoundError:
        return [Problem("model.bundle", f"{bundle} does not exist")]
    except OSError as exc:
        return [Problem("model.bundle", f"{bundle} {exc.strerror or exc}")]
    return []


def check_keys(config: AgentConfig) -> list[Problem]:
    from agent.config.loader import read_public_keys

    if not config.trust.public_keys:
        return [Problem("trust.public_keys", "empty; no bundle can be verified")]
    try:
        read_public_keys(list(config.trust.public_keys), "trust.public_keys")
    except ConfigError as exc:
        return [Problem(i.path, i.message) for i in exc.issues]
    return []


def check_pull(config: AgentConfig) -> list[Problem]:
    """What pull updates read at start (agent/update/poll.py pull_for): the index keys
    and the CA file, when a release index (update.repository) is set."""
    if not (config.update.enabled and config.update.repository):
        return []
    from agent.config.loader import read_public_keys
    from agent.update.fetch.http import tls_context

    problems = []
    for run in (
        lambda: read_public_keys(list(config.update.index_keys), "update.index_keys"),
        lambda: tls_context(config.update.ca_file),
    ):
        try:
            run()
        except ConfigError as exc:
            problems += [Problem(i.path, i.message) for i in exc.issues]
    if not config.update.index_keys and not config.trust.public_keys:
        message = "empty, and so is trust.public_keys: no release index could be verified"
        problems.append(Problem("update.index_keys", message))
    return problems


def check_link(config: AgentConfig) -> list[Problem]:
    """What the link refuses when it starts: the same calls, made here for check-config."""
    if not (config.mqtt.enabled or config.kubeedge.enabled):
        return []
    from agent.link import settings

    problems = [Problem(i.path, i.message) for i in settings.check(config)]
    if not config.mqtt.enabled:
        return problems
    files = check_link_files(config)
    if files:
        return problems + files  # reading them below could block
    try:
        settings.client_settings(config, 0.0)  # the password, the TLS context
        settings.console_keys(config)
    except ConfigError as exc:
        problems += [Problem(i.path, i.message) for i in exc.issues]
    return problems


def check_link_files(config: AgentConfig) -> list[Problem]:
    """The TLS files the link hands to OpenSSL, which would block on a FIFO forever.

    Checked before the agent takes its lock; the link reads its other files (the
    password, console keys) through read_credential, which never blocks.
    """
    if not config.mqtt.enabled:
        return []
    from agent.link.settings import secret_path

    problems = []
    tls = config.mqtt.tls
    for key, ref in (
        ("mqtt.tls.ca_file", tls.ca_file),
        ("mqtt.tls.cert_file", tls.cert_file),
        ("mqtt.tls.key_file", tls.key_file),
    ):
        if not ref:
            continue
        try:
            check_regular(secret_path(ref))
        except ConfigError as exc:
            problems += [Problem(key, i.message) for i in exc.issues]
        except (OSError, ValueError) as exc:
            why = getattr(exc, "strerror", None) or exc
            problems.append(Problem(key, f"cannot read {ref}: {why}"))
    return problems


__all__ = [
    "MAX_SOCKET_PATH",
    "START_FAILED",
    "START_INTERNAL",
    "START_LOCKED",
    "Problem",
    "check_api",
    "check_bundle",
    "check_directory",
    "check_keys",
    "check_link",
    "check_link_files",
    "check_socket",
    "check_state_dir",
    "check_tcp",
    "parse_tcp",
]


def check_jetson(config: AgentConfig) -> list[Problem]:
    """A tegrastats path that cannot run would be retried forever: say so up front."""
    problems = []
    setting = config.jetson.tegrastats
    # os.path's tests: False (not a PermissionError, as Path's raise on Python 3.11) where
    # a directory on the way cannot be searched by this user.
    if setting not in ("auto", "off"):
        path = Path(setting)
        if not os.path.isfile(path):
            problems.append(
                Problem("jetson.tegrastats", f"{path} is not a file (or not reachable)")
            )
        elif not os.access(path, os.X_OK):
            problems.append(Problem("jetson.tegrastats", f"{path} is not executable by this user"))
    root = config.jetson.sysfs_root
    if not os.path.isdir(root):
        problems.append(
            Problem("jetson.sysfs_root", f"{root} is not a directory (or not reachable)")
        )
    return problems

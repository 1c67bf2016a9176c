"""`edge-fleet serve`: the fleet dashboard over this console's view and record.

    edge-fleet serve [--listen 127.0.0.1:8090] [--credentials FILE] [--token-file FILE]
                     [--retention-h 24] [--session-ttl-h 8] [--tls-cert F --tls-key F]
    edge-fleet serve --hash-password USER     # prints USER:scrypt$… for --credentials

Without credentials the dashboard is read-only (and says so). A listen address that is
not loopback is allowed, with a warning when nobody can log in: anyone who reaches it
sees the fleet.
"""

from __future__ import annotations

import getpass
import ipaddress
import json
import logging
import signal
import socket
import sys
from typing import Any

from fleet.errors import FleetCode, FleetError

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8090"


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the fleet dashboard (a web page)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to serve on (default {DEFAULT_LISTEN})")  # fmt: skip
    p.add_argument("--credentials", default=None, metavar="FILE",
                   help="user:scrypt-hash lines (a path or credential:NAME); none: read-only")  # fmt: skip
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="a bearer token that may log in (a path or credential:NAME)")  # fmt: skip
    p.add_argument("--retention-h", type=float, default=24.0, metavar="H",
                   help="keep telemetry for the charts H hours (default 24)")  # fmt: skip
    p.add_argument("--session-ttl-h", type=float, default=8.0, metavar="H",
                   help="a login lasts H hours (default 8)")  # fmt: skip
    p.add_argument("--tls-cert", default=None, help="serve https with this certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="its private key (PEM)")
    p.add_argument("--settle", type=float, default=10.0, metavar="S",
                   help="wait at most S seconds for the retained messages at start")  # fmt: skip
    p.add_argument("--hash-password", default=None, metavar="USER",
                   help="print a credentials line for USER (password from stdin) and exit")  # fmt: skip
    p.set_defaults(run=run)


def _bad(message: str) -> FleetError:
    return FleetError(FleetCode.BAD_INPUT, message)


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` (loopback)."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(f"--listen {value!r}: expected HOST:PORT with a port 1-65535 "
                   "(e.g. 127.0.0.1:8090, [::1]:8090, 0.0.0.0:8090)")  # fmt: skip
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or "127.0.0.1"
    if any(c.isspace() for c in host) or "/" in host:
        raise _bad(f"--listen {value!r}: {host!r} is not a host name or address")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _bad(f"--listen {host}:{port}: cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        # Listening now: a client that comes before uvicorn is up waits in the backlog.
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = " (another server is on this port?)" if exc.errno == 98 else ""
        raise _bad(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    return sock


def hash_password_line(user: str) -> str:
    from fleet.dashboard.auth import hash_password

    if not user or ":" in user or any(c.isspace() for c in user):
        raise _bad(f"--hash-password {user!r}: a user name is one word without ':'")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {user}: ")
        if getpass.getpass("again: ") != password:
            raise _bad("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise _bad("a dashboard password has at least 8 characters")
    return f"{user}:{hash_password(password)}"


def _check_range(name: str, value: float, low: float, high: float) -> float:
    if not low <= value <= high:
        raise _bad(f"{name} {value:g} is not allowed: a number from {low:g} to {high:g}")
    return value


def run(args: Any, ctx: Any) -> int:
    if args.hash_password is not None:
        print(hash_password_line(args.hash_password))
        return 0
    retention_h = _check_range("--retention-h", args.retention_h, 0.01, 24 * 366)
    ttl_h = _check_range("--session-ttl-h", args.session_ttl_h, 0.001, 24 * 31)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise _bad("--tls-cert and --tls-key go together")
    host, port = parse_listen(args.listen)
    try:
        import uvicorn

        from fleet.dashboard.app import create_app
        from fleet.dashboard.auth import Auth
    except ImportError as exc:
        raise FleetError(
            FleetCode.CONFIG,
            f"the dashboard needs the console's extra: pip install 'edgerun[fleet]' ({exc})",
        ) from None
    auth = Auth.from_files(args.credentials, args.token_file, session_ttl_s=ttl_h * 3600)
    sock = _bind(host, port)
    try:
        from fleet.view import FleetView

        store = ctx.store()
        ctx.record_commands = False  # the dashboard sends no commands: actions are records
        client = ctx.client()
        # Every device's telemetry, whatever `shared_group` says: a dashboard that got a
        # share of the reports would show the rest of the fleet as stale.
        view = FleetView(client, shared_group="").start(args.settle)
        reason = "" if auth.enabled else "started without --credentials or --token-file"
        if not auth.enabled and not is_loopback(host):
            log.warning("serving %s:%d read-only to anyone who reaches it", host, port)
            print(f"edge-fleet: warning: {host}:{port} is not loopback and nobody can log in: "
                  "the dashboard is read-only, and anyone who reaches it sees the fleet",
                  file=sys.stderr)  # fmt: skip
        app = create_app(view, store, client.key_id, auth, retention_s=retention_h * 3600,
                         read_only_reason=reason)  # fmt: skip
        scheme = "https" if args.tls_cert else "http"
        shown = f"[{host}]" if ":" in host else host
        url = f"{scheme}://{shown}:{sock.getsockname()[1]}"
        summary = {"url": url, "devices": len(view), "read_only": not auth.enabled,
                   "users": len(auth.users), "db": str(ctx.config.db)}  # fmt: skip
        if ctx.json:
            print(json.dumps(summary), flush=True)
        else:
            mode = "read-only" if not auth.enabled else f"{len(auth.users)} user(s)"
            mode += ", a token" if auth.tokens else ""
            print(f"edge-fleet serve: {url} ({summary['devices']} devices, {mode})", flush=True)
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            ssl_certfile=_ref(args.tls_cert),
            ssl_keyfile=_ref(args.tls_key),
            timeout_graceful_shutdown=3,
        )
        # uvicorn shuts down gracefully on SIGTERM, then raises it again once its own
        # handler is gone; with this one in place that ends here, so the console closes
        # the view and the store and exits 0 (SIGINT still ends as Ctrl-C: 130).
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            view.close()
    finally:
        sock.close()
    return 0


def _ref(value: str | None) -> str | None:
    if value is None:
        return None
    from fleet.config import _file_ref, resolve_ref

    path = resolve_ref("--tls", _file_ref("--tls", value))
    if not path.is_file():
        raise _bad(f"no file {path}")
    return str(path)

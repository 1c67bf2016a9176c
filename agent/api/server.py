"""The local API's HTTP/1.1 server (Unix socket and optional TCP), one thread per connection.

Blocking sockets with a thread per connection rather than asyncio: a request is then
one recv and one send, with no event-loop wake-ups in between, which halves the round
trip for small models (bench/overhead.py); onnxruntime and LiteRT release the GIL, so
connections run their models in parallel, and a long inference never delays a health
check on another connection.

What keeps it up under hostile clients: a deadline for a complete request head
(`api.head_timeout_s`) and body (`api.body_timeout_s`) apart from the idle timeout;
refusals written without blocking and closed by one linger thread (no thread per
refusal); an accept loop that survives EMFILE/ENFILE and thread-start failures by
refusing with a spare descriptor and backing off; bodies admitted against memory
before they are read (agent/api/bodies.py). `healthy()` tells the watchdog whether
the accept loops really work.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.api.auth import ApiSetupError, TokenCheck, load_token
from agent.api.bodies import MB, BodyBudget
from agent.api.http import (
    CONTINUE,
    Caller,
    RequestHead,
    RequestTimeoutError,
    Response,
    encode,
    error_response,
    find_head_end,
    json_response,
    parse_head,
)
from agent.api.limits import fit_connections
from agent.api.linger import Lingerer, send_nowait
from agent.api.routes import Router
from agent.api.shm import SharedMemoryRegistry
from agent.config.model import ApiConfig
from agent.errors import OverloadedError, ServingError, TooLargeError
from agent.serving import ModelHost

log = logging.getLogger(__name__)

# Errors that mean "out of descriptors/memory right now", not "this listener is broken".
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# A connection that vanished between the kernel queueing it and accept().
_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN, errno.EPERM}
# The listening socket itself is gone: no retry can help.
_BROKEN = {errno.EBADF, errno.EINVAL, errno.ENOTSOCK}
_BACKOFF_MAX_S = 0.1
_SHED_BATCH = 128  # the listen backlog
# Accept failing for this long without a single success counts as a deaf API.
DEAF_AFTER_S = 60.0
# An accept loop wakes up at least this often (its socket timeout) ...
_TICK_S = 0.2
# ... so one silent for this long is stuck.
_STUCK_AFTER_S = 10.0


# At the connection limit, a head still arriving after this long makes room (408)
# for a client whose whole head came within _HEAD_PEEK_S of its connection.
_SLOW_HEAD_S = 1.0
_HEAD_PEEK_S = 0.05


def _whole_head_waiting(sock: socket.socket, wait_s: float) -> bool:
    """Whether a complete request head is already queued on `sock` (peeked, not read)."""
    try:
        ready, _, _ = select.select([sock], [], [], wait_s)
        if not ready:
            return False
        data = sock.recv(_PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (OSError, ValueError):
        return False
    return b"\r\n\r\n" in data


_PEEK_BYTES = 16 * 1024


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_TCP_CALLER = Caller(uid=None, tcp=True)


def _caller(sock: socket.socket, tcp: bool) -> Caller:
    if tcp:
        return _TCP_CALLER
    try:
        _, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return _TCP_CALLER  # unknown: treated like TCP (no shared memory without a token)
    return Caller(uid=uid, tcp=False)


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    tcp: bool
    accepted: float
    caller: Caller = _TCP_CALLER
    timeout: float = -1.0  # the SO_RCVTIMEO now set
    idle_since: float | None = None  # waiting for the next request on keep-alive
    head_since: float | None = None  # a request head begun (or awaited) and not complete
    handed_off: bool = False  # closed by the lingerer, not by its thread

    def set_timeout(self, seconds: float) -> None:
        if abs(seconds - self.timeout) < 0.001:
            return
        whole = int(seconds)
        self.sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_RCVTIMEO,
            struct.pack("ll", whole, int((seconds - whole) * 1e6)),
        )
        self.timeout = seconds


@dataclass
class _ListenerState:
    last_tick: float = field(default_factory=time.monotonic)
    failing_since: float | None = None
    failures: int = 0
    last_warning: float = 0.0


class ApiServer:
    def __init__(
        self,
        host: ModelHost,
        config: ApiConfig,
        status: Callable[[], dict[str, Any]],
        metrics_text: Callable[[], str],
    ) -> None:
        self.host = host
        self.config = config
        self.max_body = int(config.max_request_mb * MB)
        self._token: TokenCheck | None = None  # read at start(), with the other checks
        self.bodies = BodyBudget(host.watcher, int(config.max_body_inflight_mb * MB))
        self.shm = SharedMemoryRegistry(
            self.bodies, config.max_shm_regions, int(config.max_shm_mb * MB)
        )
        self.router = Router(
            host, status, metrics_text, self._reserve, self.bodies.release, self.shm
        )
        self.max_connections = config.max_connections
        self.addresses: list[str] = []
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._state: dict[socket.socket, _ListenerState] = {}
        self._connections: set[_Conn] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._lingerer = Lingerer(capacity=config.max_connections)
        self._reserve_fd: int | None = None
        self._full = self._prebuilt(
            503,
            f"too many connections (api.max_connections = {config.max_connections}); retry later",
        )
        self._exhausted = self._prebuilt(
            503, "the agent is out of file descriptors or threads right now; retry later"
        )
        self._slow_head = encode(
            json_response(
                408,
                {
                    "error": "request head still incomplete after "
                    f"{_SLOW_HEAD_S:g} s while the agent is at api.max_connections; "
                    "send the whole head at once",
                    "code": "request.timeout",
                },
            ),
            keep=False,
        )

    @staticmethod
    def _prebuilt(status: int, message: str) -> bytes:
        response = json_response(status, {"error": message, "code": "overloaded"})
        response[2]["retry-after"] = "1"
        return encode(response, keep=False)

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        token = load_token(self.config)  # ApiSetupError: refuse to start exposed
        self._token = TokenCheck(token) if token is not None else None
        self.shm.tcp_allowed = self._token is not None
        self.max_connections = fit_connections(self.config)
        self._lingerer.start()
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY)
        if self.config.socket is not None:
            try:
                unix = self._bind_unix(Path(self.config.socket))
            except OSError as exc:
                raise ApiSetupError(
                    f"cannot listen on api.socket = {str(self.config.socket)!r}: {exc.strerror}"
                ) from exc
            self._listen(unix, f"unix:{self.config.socket}")
        if self.config.tcp:
            host, _, port = self.config.tcp.rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, int(port)))
            except (OSError, OverflowError) as exc:
                sock.close()
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ApiSetupError(
                    f"cannot listen on api.tcp = {self.config.tcp!r}: {why}"
                ) from exc
            name = sock.getsockname()
            self._listen(sock, f"tcp:{name[0]}:{name[1]}")
        log.info(
            "local API listening on %s%s",
            ", ".join(self.addresses),
            " (TCP needs a bearer token)" if self._token else "",
        )

    def _bind_unix(self, path: Path) -> socket.socket:
        mode = int(self.config.socket_mode, 8)
        gid = -1
        if self.config.socket_group:
            try:
                gid = grp.getgrnam(self.config.socket_group).gr_gid
            except KeyError:
                raise ApiSetupError(
                    f"api.socket_group = {self.config.socket_group!r} is not a group on this system"
                ) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind under a tight umask so the socket is never more open than configured,
        # not even between bind and chmod.
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        try:
            if gid != -1:
                os.chown(path, -1, gid)
            os.chmod(path, mode)
        except OSError as exc:
            sock.close()
            raise ApiSetupError(
                f"cannot give {path} group {self.config.socket_group!r} and mode "
                f"{self.config.socket_mode} (api.socket_group, api.socket_mode): {exc.strerror}"
            ) from exc
        return sock

    def _listen(self, sock: socket.socket, address: str) -> None:
        sock.listen(128)
        sock.settimeout(_TICK_S)  # accept() wakes up to notice a stop
        self._listeners.append(sock)
        self._state[sock] = _ListenerState()
        self.addresses.append(address)
        thread = threading.Thread(
            target=self._accept_loop, args=(sock,), name=f"api-accept {address}", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=2)
        for sock in self._listeners:
            sock.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        self._lingerer.stop()
        self.shm.close()
        if self._reserve_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._reserve_fd)
            self._reserve_fd = None
        if self.config.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(self.config.socket).unlink()

    def healthy(self) -> bool:
        """True while every accept loop runs and takes connections (for the watchdog)."""
        now = time.monotonic()
        for thread in self._threads:
            if not thread.is_alive():
                return False
        for state in self._state.values():
            if now - state.last_tick > _STUCK_AFTER_S:
                return False
            if state.failing_since is not None and now - state.failing_since > DEAF_AFTER_S:
                return False
        return self._lingerer.alive

    # ------------------------------------------------------------- accepting

    def _accept_loop(self, listener: socket.socket) -> None:
        state = self._state[listener]
        backoff = 0.0
        while not self._stopping.is_set():
            state.last_tick = time.monotonic()
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno in _TRANSIENT:
                    continue
                if exc.errno in _BROKEN:
                    log.error("the API socket %s is broken (%s); it accepts no more", listener, exc)
                    return  # healthy() turns false: the watchdog gets the agent restarted
                backoff = min(max(backoff * 2, 0.01), _BACKOFF_MAX_S)
                self._accept_failed(listener, state, exc)
                self._stopping.wait(backoff)
                continue
            try:
                admitted = self._admit_connection(sock, listener.family != socket.AF_UNIX)
            except Exception:  # MemoryError and the like: this loop must outlive them
                log.exception("unexpected error admitting an API connection")
                with contextlib.suppress(OSError):
                    sock.close()
                admitted = False
            if admitted:
                backoff = 0.0
                state.failing_since = None
            else:
                backoff = min(max(backoff * 2, 0.01), _BACKOFF_MAX_S)
                self._stopping.wait(backoff)

    def _accept_failed(self, listener: socket.socket, state: _ListenerState, exc: OSError) -> None:
        now = time.monotonic()
        state.failures += 1
        if state.failing_since is None:
            state.failing_since = now
        if now - state.last_warning > 10:
            state.last_warning = now
            log.warning(
                "API accept failed (%s), %d time(s) so far; refusing and backing off "
                "(raise LimitNOFILE= or lower api.max_connections)",
                os.strerror(exc.errno or 0),
                state.failures,
            )
        if exc.errno in _EXHAUSTED:
            self._shed_with_reserve(listener)

    def _shed_with_reserve(self, listener: socket.socket) -> None:
        """Out of descriptors: use the spare one to answer one waiting client with 503
        rather than leave it hanging in the backlog."""
        if self._reserve_fd is None:
            return
        os.close(self._reserve_fd)
        self._reserve_fd = None
        # Answer the whole backlog, one descriptor at a time: a waiting client gets a
        # 503 it can act on instead of hanging until its own timeout.
        for _ in range(_SHED_BATCH):
            try:
                sock, _ = listener.accept()
            except OSError:
                break
            send_nowait(sock, self._exhausted)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1 << 16, socket.MSG_DONTWAIT)  # read input closes without an RST
            sock.close()
        with contextlib.suppress(OSError):
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY)

    def _admit_connection(self, sock: socket.socket, tcp: bool) -> bool:
        """Serve `sock` on a thread of its own, or refuse it without one."""
        conn = _Conn(sock, tcp, time.monotonic(), _caller(sock, tcp))
        try:
            # Blocking socket with a kernel receive timeout: a Python-level timeout
            # would turn every recv into poll + recv.
            sock.setblocking(True)
            conn.set_timeout(self.config.head_timeout_s)
            if tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            return True
        with self._lock:
            full = len(self._connections) >= self.max_connections
        # Only a client whose whole head is already here may displace a slow head:
        # otherwise slow clients would displace each other and the lingering sockets
        # of the displaced would eat the descriptors good clients need.
        whole_head = full and _whole_head_waiting(sock, _HEAD_PEEK_S)
        with self._lock:
            if len(self._connections) >= self.max_connections:
                self._make_room(slow_heads=whole_head)
            full = len(self._connections) >= self.max_connections
            if not full:
                self._connections.add(conn)
        if full:
            send_nowait(sock, self._full)
            self._lingerer.close(sock)
            return True
        try:
            threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()
        except RuntimeError:  # can't start new thread: TasksMax / pids.max reached
            with self._lock:
                self._connections.discard(conn)
            send_nowait(sock, self._exhausted)
            self._lingerer.close(sock)
            log.warning("cannot start a thread for an API connection; refused it (TasksMax=?)")
            return False
        return True

    def _make_room(self, slow_heads: bool) -> None:
        """At the connection limit, a connection that is not serving makes room:
        first the longest-idle keep-alive one (a client between requests reconnects,
        one turned away may not come back), else the one whose request head has been
        arriving longest (a slow-drip client must not lock out those that send a head
        at once; it gets a 408)."""
        now = time.monotonic()
        idle = [c for c in self._connections if c.idle_since is not None]
        # A client that already hung up, whose thread has not noticed yet, goes first.
        gone = [c for c in idle if _peer_closed(c.sock)]
        victim = gone[0] if gone else None
        answer: bytes | None = None
        if victim is None and idle:
            oldest = min(idle, key=lambda c: c.idle_since or 0.0)
            if now - (oldest.idle_since or 0.0) >= 1.0:  # else it may be about to send
                victim = oldest
        if victim is None:
            if not slow_heads:
                return
            slow = [
                c
                for c in self._connections
                if c.idle_since is None
                and c.head_since is not None
                and now - c.head_since >= _SLOW_HEAD_S
            ]
            if not slow:
                return
            victim = min(slow, key=lambda c: c.head_since or 0.0)
            answer = self._slow_head
        self._connections.discard(victim)
        victim.idle_since = victim.head_since = None
        if answer is not None:
            send_nowait(victim.sock, answer)
        with contextlib.suppress(OSError):
            victim.sock.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and ends

    # ------------------------------------------------------------- serving

    def _serve(self, conn: _Conn) -> None:
        try:
            self._serve_requests(conn)
        except (ConnectionError, TimeoutError, OSError):
            pass  # the client went away
        except Exception:  # never let one connection take the agent down
            log.exception("unexpected error on an API connection")
        finally:
            with self._lock:
                self._connections.discard(conn)
            if not conn.handed_off:
                conn.sock.close()

    def _refuse(self, conn: _Conn, exc: ServingError, head_only: bool = False) -> None:
        """Answer with an error and close (the rest of the request stays unread)."""
        send_nowait(conn.sock, encode(error_response(exc), keep=False, head_only=head_only))
        conn.handed_off = True
        self._lingerer.close(conn.sock)

    def _serve_requests(self, conn: _Conn) -> None:
        buf = bytearray()
        first = True
        while not self._stopping.is_set():
            try:
                head = self._read_head(conn, buf, first)
            except ServingError as exc:
                self._refuse(conn, exc)
                return
            if head is None:
                return
            first = False
            head.caller = conn.caller
            reserved = 0
            try:
                try:
                    route = self._admit_request(conn, head)
                    reserved = self._reserve(head.content_length, "request body")
                except ServingError as exc:
                    self._refuse(conn, exc, head.method == "HEAD")
                    return
                if head.expect_continue and len(buf) < head.content_length:
                    conn.sock.sendall(CONTINUE)
                try:
                    body = self._read_body(conn, buf, head.content_length)
                except RequestTimeoutError as exc:
                    self._refuse(conn, exc)
                    return
                if body is None:
                    return
                response = self.router.dispatch(route, head, body)
                del body
                keep = head.keep_alive and not self._stopping.is_set()
                if keep and head.version == "HTTP/1.0":
                    response[2]["connection"] = "keep-alive"  # 1.0 closes unless told
                conn.sock.sendall(encode(response, keep, head.method == "HEAD"))
            finally:
                self.bodies.release(reserved)
            if not keep:
                return

    def _reserve(self, size: int, what: str) -> int:
        try:
            return self.bodies.reserve(size, what)
        except OverloadedError:
            # Shed like a request refused above the soft limit: counted the same way.
            self.host.watcher.shed_count += 1
            self.host.metrics.error(OverloadedError.code)
            raise

    def _admit_request(self, conn: _Conn, head: RequestHead) -> Any:
        """Everything that can be judged from the head, before the body is read."""
        if conn.tcp and self._token is not None:
            self._token.check(head.path, head.headers)
        route = self.router.resolve(head)
        if head.content_length > self.max_body:
            raise TooLargeError(
                f"request body of {head.content_length} bytes is above the limit of "
                f"{self.max_body} (api.max_request_mb = {self.config.max_request_mb:g}); "
                "send tensors with the binary extension (edge-agent infer --binary) or "
                "raise api.max_request_mb"
            )
        return route

    def _read_head(self, conn: _Conn, buf: bytearray, first: bool) -> RequestHead | None:
        deadline = conn.accepted + self.config.head_timeout_s if first else None
        conn.head_since = conn.accepted if first else (time.monotonic() if buf else None)
        if not first and not buf:
            conn.idle_since = time.monotonic()
        while (end := find_head_end(buf)) < 0:
            if deadline is None and buf:
                deadline = time.monotonic() + self.config.head_timeout_s
            if deadline is None:
                conn.set_timeout(self.config.idle_timeout_s)
            else:
                conn.set_timeout(max(deadline - time.monotonic(), 0.001))
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, TimeoutError):
                if deadline is None:
                    return None  # idle keep-alive connection: close quietly
                raise RequestTimeoutError(
                    f"request head not complete within {self.config.head_timeout_s:g} s "
                    "(api.head_timeout_s)"
                ) from None
            conn.idle_since = None
            if not data:
                return None
            if conn.head_since is None:
                conn.head_since = time.monotonic()
            buf += data
        conn.idle_since = conn.head_since = None
        head = parse_head(bytes(buf[:end]))
        del buf[:end]
        return head

    def _read_body(self, conn: _Conn, buf: bytearray, length: int) -> bytes | bytearray | None:
        if len(buf) >= length:
            body = bytes(buf[:length])
            del buf[:length]
            return body
        # Read straight into one buffer of the admitted size: no second copy.
        out = bytearray(length)
        have = len(buf)
        out[:have] = buf
        buf.clear()
        view = memoryview(out)
        deadline = time.monotonic() + self.config.body_timeout_s
        while have < length:
            conn.set_timeout(max(deadline - time.monotonic(), 0.001))
            try:
                n = conn.sock.recv_into(view[have:])
            except (BlockingIOError, TimeoutError):
                raise RequestTimeoutError(
                    f"request body of {length} bytes not complete within "
                    f"{self.config.body_timeout_s:g} s (api.body_timeout_s)"
                ) from None
            if n == 0:
                return None
            have += n
        view.release()
        return out  # a bytearray: json and numpy read it like bytes


def _peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


__all__ = ["ApiServer", "ApiSetupError", "Response"]

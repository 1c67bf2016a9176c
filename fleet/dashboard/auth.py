"""Who may act: credentials, sessions, CSRF tokens and the login rate limit.

Credentials come from files only (`--credentials FILE`, `--token-file FILE`, either
as `credential:NAME` from `$CREDENTIALS_DIRECTORY`):

    alice:scrypt$16384$8$1$<salt b64>$<hash b64>     # edge-fleet serve --hash-password alice
    # comments and blank lines are skipped

A token file holds one bearer token (at least 16 characters); logging in with it names
the user `token`. Without any credentials the dashboard is read-only.

Sessions live in this process (a restart logs everyone out): a random id in an
HttpOnly, SameSite=Strict cookie, and a CSRF token that every action must echo in
`X-CSRF-Token`. Each client address gets 5 failed logins a minute, then 429.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from fleet.config import _file_ref, resolve_ref
from fleet.errors import FleetCode, FleetError

COOKIE = "edgerun_session"
TOKEN_USER = "token"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MAX_FAILURES = 5
FAILURE_WINDOW_S = 60.0
MIN_TOKEN_CHARS = 16
MAX_TRACKED = 10_000  # client addresses with recent failures


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _check_hash(encoded: str, password: str) -> bool:
    _, n, r, p, salt, want = encoded.split("$")
    got = hashlib.scrypt(
        password.encode(),
        salt=base64.b64decode(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        dklen=len(base64.b64decode(want)),
        maxmem=256 * 1024 * 1024,
    )
    return hmac.compare_digest(got, base64.b64decode(want))


def _parse_hash(encoded: str, where: str) -> str:
    parts = encoded.split("$")
    try:
        ok = len(parts) == 6 and parts[0] == "scrypt"
        n, r, p = (int(x) for x in parts[1:4]) if ok else (0, 0, 0)
        salt, digest = (
            base64.b64decode(parts[4], validate=True),
            base64.b64decode(parts[5], validate=True),
        )
        ok = (
            ok
            and n >= 2
            and n & (n - 1) == 0
            and r >= 1
            and p >= 1
            and bool(salt)
            and len(digest) >= 16
        )
    except (ValueError, IndexError):
        ok = False
    if not ok:
        raise FleetError(
            FleetCode.CONFIG,
            f"{where}: not a scrypt hash (make one with `edge-fleet serve --hash-password USER`)",
            key="credentials",
        )
    return encoded


@dataclass(frozen=True)
class Session:
    sid: str
    user: str
    csrf: str
    expires_at: float  # monotonic


class Auth:
    """Credentials and sessions; thread-safe (logins hash off the event loop)."""

    def __init__(
        self,
        users: dict[str, str] | None = None,
        tokens: list[str] | None = None,
        *,
        session_ttl_s: float = 8 * 3600.0,
    ) -> None:
        self.users = dict(users or {})
        self.tokens = list(tokens or [])
        self.session_ttl_s = session_ttl_s
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        # Verifying an unknown user costs the same as a known one: no user probing.
        self._dummy = hash_password(secrets.token_hex(8))

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.tokens)

    @classmethod
    def from_files(
        cls,
        credentials: str | None,
        token_file: str | None,
        *,
        session_ttl_s: float = 8 * 3600.0,
    ) -> Auth:
        users: dict[str, str] = {}
        tokens: list[str] = []
        if credentials:
            path = _read_path(credentials, "--credentials")
            for n, raw in enumerate(_read_text(path, "--credentials").splitlines(), 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                user, sep, encoded = line.partition(":")
                where = f"{path} line {n}"
                if not sep or not user.strip():
                    raise FleetError(
                        FleetCode.CONFIG,
                        f"{where}: expected `user:scrypt$…` "
                        "(make one with `edge-fleet serve --hash-password USER`)",
                        key="credentials",
                    )
                users[user.strip()] = _parse_hash(encoded.strip(), where)
        if token_file:
            path = _read_path(token_file, "--token-file")
            token = _read_text(path, "--token-file").strip()
            if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
                raise FleetError(
                    FleetCode.CONFIG,
                    f"{path}: a token is one word of at least {MIN_TOKEN_CHARS} characters "
                    "(e.g. `openssl rand -hex 32`)",
                    key="token_file",
                )
            tokens.append(token)
        return cls(users, tokens, session_ttl_s=session_ttl_s)

    # ------------------------------------------------------------------ login

    def limited(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        now = time.monotonic()
        with self._lock:
            seen = self._failures.get(client)
            if seen is None:
                return 0.0
            while seen and now - seen[0] > FAILURE_WINDOW_S:
                seen.popleft()
            if not seen:
                del self._failures[client]
                return 0.0
            if len(seen) < MAX_FAILURES:
                return 0.0
            return max(0.1, FAILURE_WINDOW_S - (now - seen[0]))

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > MAX_TRACKED:  # many addresses: forget the stale ones
                for key in [k for k, v in self._failures.items() if now - v[-1] > FAILURE_WINDOW_S]:
                    del self._failures[key]
            self._failures.setdefault(client, deque(maxlen=MAX_FAILURES)).append(now)

    def check_password(self, user: str, password: str) -> bool:
        encoded = self.users.get(user)
        ok = _check_hash(encoded or self._dummy, password)
        return ok and encoded is not None

    def check_token(self, token: str) -> bool:
        return any(hmac.compare_digest(token.encode(), t.encode()) for t in self.tokens)

    # ------------------------------------------------------------------ sessions

    def open_session(self, user: str) -> Session:
        session = Session(
            secrets.token_urlsafe(32),
            user,
            secrets.token_urlsafe(32),
            time.monotonic() + self.session_ttl_s,
        )
        with self._lock:
            now = time.monotonic()
            for sid in [s for s, v in self._sessions.items() if v.expires_at <= now]:
                del self._sessions[sid]
            self._sessions[session.sid] = session
        return session

    def session(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            found = self._sessions.get(sid)
            if found is not None and found.expires_at <= time.monotonic():
                del self._sessions[sid]
                return None
            return found

    def close_session(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)


def _read_path(value: str, option: str) -> Path:
    # The console's own rules for a file or `credential:NAME` (fleet/config.py).
    return resolve_ref(option, _file_ref(option, value))


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FleetError(FleetCode.CONFIG, f"{option}: no file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FleetError(FleetCode.CONFIG, f"{option}: cannot read {path}: {exc}") from None

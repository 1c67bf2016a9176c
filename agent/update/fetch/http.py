"""Resumable HTTP(S) downloads of a signed bundle (stdlib `http.client` + `ssl`).

What a server sends is outside input: status, headers, redirects and bodies of any
length. The rules, in order of what can go wrong:

* TLS is verified (system CAs, or `update.ca_file`) and the host name checked; a
  certificate that does not verify is final (`update.download_failed`, naming
  `update.ca_file`).
* Redirects are followed at most `update.max_redirects` times; every hop's URL is
  checked like the deploy's own (http/https, a host, no credentials); https -> http
  is refused.
* At most the signed `size` bytes are ever written: a Content-Length above what is
  left, or a body that goes on, is `update.oversize` at once (the partial removed).
* Resumable: the partial file is kept across drops and agent restarts and resumed
  with `Range: bytes=N-` and `If-Range` (the strong ETag or Last-Modified saved in
  `.part.meta`), so a file changed on the server is never spliced. A 200 answer to a
  Range request, a 206 whose Content-Range does not start at N, or a 416 start over.
* Connection errors, timeouts (`update.connect_timeout_s`, `update.read_timeout_s`),
  408, 429 and 5xx are retried with a capped, jittered backoff; `update.max_retries`
  counts attempts in a row that brought no new byte, so a poor link that keeps
  making progress is never given up on. Other 4xx are final.
* `Content-Encoding` other than identity is refused: the signed bytes are needed as is.
* The sha256 is computed while streaming (a resumed file is hashed from disk once)
  and checked before the path is returned (`update.hash_mismatch`, partial removed).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from agent import __version__
from agent.config.loader import read_credential
from agent.config.model import UpdateConfig
from agent.config.typed import ConfigError, ConfigIssue
from agent.link.client import Backoff  # the link's jittered reconnect backoff
from agent.names import shown
from agent.protocol.update import DeployRequest, HttpSource
from agent.update.errors import UpdateCode, UpdateError
from agent.update.fetch.partial import PartialFile
from agent.update.fetch.ratelimit import TokenBucket, kbps_to_bytes_s
from agent.update.ports import Progress

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024  # http.client's own line cap; a header block beyond is refused
PROGRESS_EVERY_S = 0.25
REDIRECTS = frozenset({301, 302, 303, 307, 308})
RETRY_STATUS = frozenset({408, 429})
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)")
_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class HttpSettings:
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    max_redirects: int = 3
    max_retries: int = 8
    max_kbps: float = 0.0  # kbit/s, 0: no cap
    tls: ssl.SSLContext | None = None  # None: system CAs
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0

    @classmethod
    def from_config(
        cls, config: UpdateConfig, environ: Mapping[str, str] | None = None
    ) -> HttpSettings:
        return cls(
            connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s,
            max_redirects=config.max_redirects,
            max_retries=config.max_retries,
            max_kbps=config.max_kbps,
            tls=tls_context(config.ca_file, environ),
        )


def tls_context(ca_file: str = "", environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """Verified TLS 1.2+ with host name checks: `ca_file` (path or credential:NAME) or the
    system CAs. An unreadable CA file is a config error on `update.ca_file`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not ca_file:
        ctx.load_default_certs()
        return ctx
    try:
        pem = read_credential(ca_file, environ)
    except ConfigError as exc:
        raise ConfigError(
            [ConfigIssue("update.ca_file", i.message) for i in exc.issues], "update"
        ) from exc
    try:
        ctx.load_verify_locations(cadata=pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            [ConfigIssue("update.ca_file", f"not a PEM CA bundle: {exc}")], "update"
        ) from exc
    return ctx


def public_url(url: str) -> str:
    """A URL fit for messages and logs: scheme, host, port and path; no query, no fragment
    (signed URLs carry their credentials there)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return shown(url.split("?", 1)[0], 200)
    return shown(f"{parts.scheme}://{host}{port}{parts.path}", 200).strip("'")


def check_hop(url: str, came_from: str | None) -> str:
    """Every URL fetched, the deploy's or a redirect's, passes the same rule."""
    if len(url) > 2048 or not url.isascii() or any(c.isspace() or ord(c) < 0x21 for c in url):
        raise UpdateError(
            UpdateCode.DOWNLOAD_FAILED,
            f"redirected to {shown(url, 120)}: not an ASCII http(s) URL of at most 2048 characters",
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a bad port raises here)
    except ValueError as exc:
        raise UpdateError(UpdateCode.DOWNLOAD_FAILED, f"bad URL {public_url(url)}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpdateError(
            UpdateCode.DOWNLOAD_FAILED,
            f"{'redirected to' if came_from else 'URL'} {public_url(url)}: only http:// and "
            "https:// URLs with a host are followed",
        )
    if parts.username or parts.password:
        raise UpdateError(
            UpdateCode.DOWNLOAD_FAILED,
            f"redirected to {public_url(url)}: a URL with credentials is not followed",
        )
    if came_from is not None and urlsplit(came_from).scheme == "https" and parts.scheme == "http":
        raise UpdateError(
            UpdateCode.DOWNLOAD_FAILED,
            f"{public_url(came_from)} redirected to {public_url(url)}: https -> http is refused "
            "(the download would lose its TLS protection)",
        )
    return url


MAX_INTERIM = 8  # 1xx answers before the real one; http.client would read them forever


class _Response(http.client.HTTPResponse):
    """http.client skips any number of `100 Continue` answers; a server sending them
    without end would hold the fetch in `begin()` past every read timeout."""

    _interim = 0

    def _read_status(self) -> tuple[str, int, str]:
        self._interim += 1
        if self._interim > MAX_INTERIM:
            raise http.client.HTTPException(f"more than {MAX_INTERIM} interim (1xx) answers")
        return super()._read_status()  # type: ignore[misc, no-any-return]


class _Connection(http.client.HTTPConnection):
    response_class = _Response


class _TlsConnection(http.client.HTTPSConnection):
    response_class = _Response


class _Retry(Exception):
    """This attempt failed in a way another attempt may not (drop, timeout, 5xx)."""

    def __init__(self, message: str, restart: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.restart = restart  # the partial bytes are not usable: start from 0


class HttpFetcher:
    """The `Fetcher` for `url` deploys. One instance may serve many fetches, one at a time."""

    def __init__(
        self,
        settings: HttpSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or HttpSettings()
        self._tls = self.settings.tls or tls_context()
        self._clock = clock
        # Figures of the last fetch (for events and the benchmark).
        self.attempts = 0
        self.restarts = 0
        self.resumed_from = 0

    def fetch(
        self, request: DeployRequest, partial: Path, progress: Progress, cancel: threading.Event
    ) -> Path:
        if not isinstance(request.source, HttpSource):
            raise UpdateError(UpdateCode.INTERNAL, "HttpFetcher got a deploy without a url")
        url = check_hop(request.source.url, None)
        part = PartialFile(partial, request.size, request.sha256)
        done = part.done_already()
        if done is not None:
            progress(request.size, request.size)
            return done
        s = self.settings
        backoff = Backoff(s.backoff_min_s, s.backoff_max_s)
        bucket = TokenBucket(kbps_to_bytes_s(s.max_kbps))
        self.attempts = self.restarts = 0
        have = part.length()
        state = _Download(part, have, part.prefix_hash(have))
        self.resumed_from = have
        if have == part.size and state.digest.hexdigest() != part.sha256:
            state.restart()  # complete but wrong (a file changed under a resume): fetch anew
        reporter = _Reporter(progress, request.size, self._clock)
        reporter(state.have, force=True)
        idle = 0  # attempts in a row that brought no new byte
        try:
            while state.have < part.size:
                if cancel.is_set():
                    raise _cancelled(url, state.have, part.size)
                self.attempts += 1
                before = state.have
                try:
                    self._attempt(url, state, bucket, reporter, cancel)
                    continue
                except _Retry as exc:
                    if exc.restart:
                        self.restarts += 1
                        state.restart()
                    if state.have > before:
                        idle = 0
                        backoff.reset()
                    else:
                        idle += 1
                    if idle > s.max_retries:
                        raise UpdateError(
                            UpdateCode.DOWNLOAD_FAILED,
                            f"{public_url(url)}: gave up after {idle} attempt(s) in a row "
                            f"without progress (update.max_retries = {s.max_retries}); "
                            f"{state.have} of {part.size} bytes kept for a resume; last "
                            f"error: {exc.message}",
                            written=state.have,
                            size=part.size,
                            attempts=self.attempts,
                        ) from None
                    wait = backoff.next()
                    log.info(
                        "download of %s: %s; retrying in %.1f s (%d of %d bytes kept)",
                        public_url(url), exc.message, wait, state.have, part.size,
                    )  # fmt: skip
                    if cancel.wait(wait):
                        raise _cancelled(url, state.have, part.size) from None
        except UpdateError as exc:
            part.close()
            if exc.code == UpdateCode.OVERSIZE:
                part.remove()  # a lying source: nothing of it is kept
            raise
        reporter(state.have, force=True)
        return part.finish(state.digest.hexdigest(), public_url(url))

    # ----------------------------------------------------------------- one attempt

    def _attempt(
        self,
        url: str,
        state: _Download,
        bucket: TokenBucket,
        reporter: _Reporter,
        cancel: threading.Event,
    ) -> None:
        s = self.settings
        part = state.part
        size = part.size
        meta = part.load_meta() if state.have else {}
        current, came_from = url, None
        for hop in range(s.max_redirects + 2):
            if hop > s.max_redirects:
                raise UpdateError(
                    UpdateCode.DOWNLOAD_FAILED,
                    f"{public_url(url)}: more than {s.max_redirects} redirect(s) "
                    f"(update.max_redirects), last to {public_url(current)}",
                )
            check_hop(current, came_from)
            conn, response = self._open(current, state.have, meta)
            try:
                status = response.status
                if status in REDIRECTS:
                    location = response.getheader("Location")
                    if not location:
                        raise UpdateError(
                            UpdateCode.DOWNLOAD_FAILED,
                            f"{public_url(current)} answered {status} without a Location",
                        )
                    came_from, current = current, urljoin(current, location.strip())
                    continue
                if status in RETRY_STATUS or 500 <= status <= 599:
                    raise _Retry(f"{public_url(current)} answered {status} "
                                 f"{shown(response.reason, 60)}")  # fmt: skip
                if status == 416 and state.have:
                    raise _Retry(f"{public_url(current)} cannot resume at byte {state.have} "
                                 "(416)", restart=True)  # fmt: skip
                if status not in (200, 206):
                    raise UpdateError(
                        UpdateCode.DOWNLOAD_FAILED,
                        f"{public_url(current)} answered HTTP {status} "
                        f"{shown(response.reason, 60)} ({state.have} of {size} bytes down)",
                        status=status,
                        written=state.have,
                    )
                encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise UpdateError(
                        UpdateCode.DOWNLOAD_FAILED,
                        f"{public_url(current)} sent Content-Encoding {shown(encoding, 40)}: the "
                        "signed bytes are needed as they are (serve the bundle uncompressed)",
                    )
                start = self._start_of(response, current, state.have, size, meta)
                if start == 0 and state.have:
                    self.restarts += 1
                    state.restart()  # a 200 to a Range request: the whole file again
                length = _content_length(response, current)
                if length is not None and length > size - state.have:
                    raise UpdateError(
                        UpdateCode.OVERSIZE,
                        f"{public_url(current)} announces {length} bytes at byte {state.have}; "
                        f"the bundle is signed as {size} bytes",
                        announced=length,
                        size=size,
                    )
                if start == 0 and length is not None and length < size:
                    # The whole file, and it is shorter than the signed bundle: no retry
                    # or resume can make it the bundle that was signed.
                    raise UpdateError(
                        UpdateCode.DOWNLOAD_FAILED,
                        f"{public_url(current)} serves a file of {length} bytes; the deploy "
                        f"signed {size} bytes (size): not the signed bundle",
                        announced=length,
                        size=size,
                    )
                if start == 0:
                    part.save_meta(
                        url=public_url(url),
                        etag=response.getheader("ETag"),
                        last_modified=response.getheader("Last-Modified"),
                    )
                self._body(current, response, state, bucket, reporter, cancel)
                return
            finally:
                with contextlib.suppress(Exception):
                    conn.close()

    def _open(
        self, url: str, have: int, meta: Mapping[str, object]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        s = self.settings
        parts = urlsplit(url)
        host = parts.hostname or ""
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = _TlsConnection(host, parts.port, timeout=s.connect_timeout_s, context=self._tls)
        else:
            conn = _Connection(host, parts.port, timeout=s.connect_timeout_s)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        headers = {"User-Agent": f"edgerun-agent/{__version__}", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            validator = _validator(meta)
            if validator:
                headers["If-Range"] = validator
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(s.read_timeout_s)
            conn.request("GET", path, headers=headers)
            return conn, conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise UpdateError(
                UpdateCode.DOWNLOAD_FAILED,
                f"{public_url(url)}: TLS certificate not trusted ({exc.verify_message}); "
                "give the server's CA in update.ca_file",
            ) from None
        except TimeoutError:
            conn.close()
            raise _Retry(f"{public_url(url)}: timed out connecting or waiting for the answer "
                         f"(update.connect_timeout_s = {s.connect_timeout_s:g}, "
                         f"update.read_timeout_s = {s.read_timeout_s:g})") from None  # fmt: skip
        except (OSError, http.client.HTTPException, ValueError) as exc:
            conn.close()
            raise _Retry(f"{public_url(url)}: {_describe(exc)}") from None

    def _start_of(
        self,
        response: http.client.HTTPResponse,
        url: str,
        have: int,
        size: int,
        meta: Mapping[str, object],
    ) -> int:
        """Where the body starts in the file: 0 (a 200) or `have` (a matching 206)."""
        if response.status == 200:
            return 0
        value = response.getheader("Content-Range") or ""
        m = _CONTENT_RANGE.fullmatch(value.strip())
        if m is None:
            raise _Retry(f"{public_url(url)}: 206 with a bad Content-Range {shown(value, 80)}",
                         restart=True)  # fmt: skip
        first, last, total = int(m[1]), int(m[2]), m[3]
        if total != "*" and int(total) != size:
            if int(total) > size:
                raise UpdateError(
                    UpdateCode.OVERSIZE,
                    f"{public_url(url)}: the server's file has {total} bytes; the bundle is "
                    f"signed as {size} bytes",
                    announced=int(total),
                    size=size,
                )
            raise UpdateError(
                UpdateCode.DOWNLOAD_FAILED,
                f"{public_url(url)}: the server's file has {total} bytes, the deploy says "
                f"{size} (size): not the signed bundle",
            )
        if last >= size or last < first:
            raise UpdateError(
                UpdateCode.OVERSIZE,
                f"{public_url(url)}: Content-Range {shown(value, 80)} reaches past the signed "
                f"size of {size} bytes",
                size=size,
            )
        if first != have:
            raise _Retry(f"{public_url(url)}: asked for byte {have} on, got a range from "
                         f"{first}", restart=True)  # fmt: skip
        saved = meta.get("etag")
        etag = response.getheader("ETag")
        if isinstance(saved, str) and etag and etag != saved:
            # The server ignored If-Range: the rest belongs to another file.
            raise _Retry(f"{public_url(url)}: the file changed (ETag {shown(etag, 60)})",
                         restart=True)  # fmt: skip
        return have

    def _body(
        self,
        url: str,
        response: http.client.HTTPResponse,
        state: _Download,
        bucket: TokenBucket,
        reporter: _Reporter,
        cancel: threading.Event,
    ) -> None:
        part = state.part
        size = part.size
        part.open()
        try:
            while True:
                if cancel.is_set():
                    raise _cancelled(url, state.have, size)
                left = size - state.have
                # One byte more than is left: a body that goes on is seen at once.
                want = bucket.read_size(min(CHUNK, left + 1))
                try:
                    block = response.read1(want)
                except TimeoutError:
                    raise _Retry(
                        f"{public_url(url)}: no data for {self.settings.read_timeout_s:g} s "
                        f"(update.read_timeout_s) at byte {state.have}"
                    ) from None
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    raise _Retry(
                        f"{public_url(url)}: {_describe(exc)} at byte {state.have}"
                    ) from None
                if not block:
                    if state.have == size:
                        return
                    raise _Retry(f"{public_url(url)}: the connection ended at byte "
                                 f"{state.have} of {size}")  # fmt: skip
                if len(block) > left:
                    raise UpdateError(
                        UpdateCode.OVERSIZE,
                        f"{public_url(url)} sent more than the signed {size} bytes; stopped "
                        "reading and removed the partial file",
                        size=size,
                    )
                state.add(block)
                reporter(state.have)
                bucket.take(len(block), cancel)
                if state.have == size and response.length == 0:
                    return  # Content-Length said this was all: no need to wait for EOF
        finally:
            with contextlib.suppress(UpdateError):
                part.sync()


@dataclass
class _Download:
    """What is on disk and its running sha256: always the same bytes (written, then hashed)."""

    part: PartialFile
    have: int
    digest: hashlib._Hash

    def add(self, block: bytes) -> None:
        self.part.write_at(self.have, block)
        self.digest.update(block)
        self.have += len(block)

    def restart(self) -> None:
        self.part.truncate()
        self.have, self.digest = 0, hashlib.sha256()


class _Reporter:
    """Calls `progress` at most every PROGRESS_EVERY_S (and when forced)."""

    def __init__(self, progress: Progress, total: int, clock: Callable[[], float]) -> None:
        self.progress, self.total, self.clock = progress, total, clock
        self.last = float("-inf")

    def __call__(self, done: int, force: bool = False) -> None:
        now = self.clock()
        if force or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            try:
                self.progress(done, self.total)
            except Exception:  # a broken listener must not fail the download
                log.exception("progress callback failed")


def _validator(meta: Mapping[str, object]) -> str | None:
    etag = meta.get("etag")
    # If-Range takes only a strong ETag (RFC 9110 13.1.5); else the date.
    if isinstance(etag, str) and etag.startswith('"') and len(etag) <= 512:
        return etag
    modified = meta.get("last_modified")
    if isinstance(modified, str) and 0 < len(modified) <= 64 and modified.isascii():
        return modified
    return None


def _content_length(response: http.client.HTTPResponse, url: str) -> int | None:
    values = response.headers.get_all("Content-Length") or []
    if not values:
        return None
    if len({v.strip() for v in values}) != 1 or not _DIGITS.fullmatch(values[0].strip()):
        raise UpdateError(
            UpdateCode.DOWNLOAD_FAILED,
            f"{public_url(url)}: bad Content-Length {shown(', '.join(values), 80)}",
        )
    return int(values[0].strip())


def _cancelled(url: str, have: int, size: int) -> UpdateError:
    return UpdateError(
        UpdateCode.CANCELLED,
        f"download of {public_url(url)} cancelled at {have} of {size} bytes (kept for a resume)",
        written=have,
        size=size,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, http.client.IncompleteRead):
        return f"the body ended early ({len(exc.partial)} bytes of the last piece)"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without an answer"
    if isinstance(exc, http.client.LineTooLong):
        return f"a header line longer than {MAX_HEADER_BYTES} bytes"
    if isinstance(exc, http.client.BadStatusLine):
        return f"not an HTTP answer (status line {shown(exc.args[0] if exc.args else '', 60)})"
    if isinstance(exc, http.client.HTTPException):
        return f"bad HTTP answer: {shown(str(exc), 120)}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return shown(str(exc), 120) or type(exc).__name__


__all__ = ["HttpFetcher", "HttpSettings", "check_hop", "public_url", "tls_context"]

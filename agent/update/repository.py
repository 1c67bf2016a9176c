"""The release repository (`update.repository`): get index.json over HTTP(S), bounded, and
pass it through the IndexGuard (signature, expiry, counter).

The index is small (capped at MAX_INDEX_BYTES) and its size and hash are not known in
advance, so this is one bounded GET rather than the resumable bundle downloader of
fetch/http.py, with that module's rules: its TLS context (TLS 1.2+, verified against the
system CAs or `update.ca_file`), its check of every hop (`check_hop`: http/https only, no
credentials, no https -> http), URLs shown without their query (`public_url`), the same
timeouts and redirect cap; never more bytes read than the cap.
"""

from __future__ import annotations

import http.client
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO, Any

from agent.names import shown
from agent.update.errors import UpdateCode, UpdateError
from agent.update.fetch.http import check_hop, public_url, tls_context
from agent.update.index import MAX_INDEX_BYTES, IndexGuard, ReleaseIndex

Getter = Callable[[str], bytes]


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most `max_redirections` (set per getter), and only to http(s)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        check_hop(newurl, req.full_url)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def http_getter(
    connect_timeout_s: float,
    read_timeout_s: float,
    max_redirects: int,
    tls: ssl.SSLContext | None = None,
    cap: int = MAX_INDEX_BYTES,
    deadline_s: float | None = None,
) -> Getter:
    """A GET of at most `cap` bytes within `deadline_s` (default: 4x the two timeouts);
    raises UpdateError (download_failed / index_invalid)."""
    context = tls or tls_context()
    opener = urllib.request.build_opener(
        type("Redirects", (_Redirects,), {"max_redirections": max_redirects})(),
        urllib.request.HTTPSHandler(context=context),
    )
    timeout = max(connect_timeout_s, read_timeout_s)
    # Per-read timeouts alone let a server trickle a byte every few seconds for hours.
    budget = deadline_s if deadline_s is not None else 4 * (connect_timeout_s + read_timeout_s)

    def get(url: str) -> bytes:
        check_hop(url, None)
        shown_url = public_url(url)
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            with opener.open(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > cap:
                    raise _oversize(shown_url, int(length), cap)
                data = _read(response, cap + 1, time.monotonic() + budget, shown_url)
        except UpdateError:
            raise
        except urllib.error.HTTPError as exc:
            raise UpdateError(
                UpdateCode.DOWNLOAD_FAILED,
                f"release index {shown_url}: HTTP {exc.code} {shown(exc.reason)}",
                status=exc.code,
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            reason: Any = getattr(exc, "reason", exc)
            raise UpdateError(
                UpdateCode.DOWNLOAD_FAILED,
                f"release index {shown_url}: {shown(str(reason), 200)}",
            ) from None
        if len(data) > cap:
            raise _oversize(shown_url, len(data), cap)
        return data

    return get


def _read(response: Any, limit: int, deadline: float, url: str) -> bytes:
    parts: list[bytes] = []
    have = 0
    while have < limit:
        if time.monotonic() > deadline:
            raise UpdateError(
                UpdateCode.DOWNLOAD_FAILED,
                f"release index {url}: not complete after {have} bytes within the time "
                "allowed (4x update.connect_timeout_s + update.read_timeout_s)",
            )
        block: bytes = response.read1(min(65536, limit - have))
        if not block:
            break
        parts.append(block)
        have += len(block)
    return b"".join(parts)


def _oversize(url: str, size: int, cap: int) -> UpdateError:
    return UpdateError(
        UpdateCode.INDEX_INVALID,
        f"release index {url}: {size}+ bytes; the cap is {cap} bytes",
        cap=cap,
    )


class Repository:
    """Where releases are listed: `latest()` gets, checks and returns the current index."""

    def __init__(self, url: str, guard: IndexGuard, get: Getter) -> None:
        self.url = url
        self.guard = guard
        self.get = get

    def latest(self) -> ReleaseIndex:
        return self.guard.accept(self.get(self.url))


__all__ = ["Getter", "Repository", "http_getter"]

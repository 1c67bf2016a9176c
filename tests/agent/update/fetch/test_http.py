"""HttpFetcher against a real HTTP(S) server started here, directly and across a poor link."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from agent.protocol.update import DeployRequest
from agent.update.errors import UpdateCode, UpdateError
from agent.update.fetch import HttpFetcher, HttpSettings, complete_path
from agent.update.fetch.http import tls_context
from tests.agent.update.fetch.httpserver import HttpServer, Route
from tests.mqtt_broker import make_pki
from tests.poorlink import PoorLink

SIZE = 300_000


def blob(n: int = SIZE, seed: int = 1) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 8
    return bytes(out[:n])


def request(
    url: str, data: bytes, size: int | None = None, sha: str | None = None
) -> DeployRequest:
    return DeployRequest.from_args(
        {
            "url": url,
            "sha256": sha or hashlib.sha256(data).hexdigest(),
            "size": size if size is not None else len(data),
            "version": "2.0.0",
        }
    )


def fetcher(**kw: object) -> HttpFetcher:
    base: dict[str, object] = {
        "connect_timeout_s": 5.0,
        "read_timeout_s": 5.0,
        "max_retries": 3,
        "backoff_min_s": 0.01,
        "backoff_max_s": 0.05,
    }
    return HttpFetcher(HttpSettings(**{**base, **kw}))  # type: ignore[arg-type]


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


def run(
    f: HttpFetcher, req: DeployRequest, part: Path, cancel: threading.Event | None = None
) -> Path:
    return f.fetch(req, part, Progress(), cancel or threading.Event())


def refused(f: HttpFetcher, req: DeployRequest, part: Path) -> UpdateError:
    with pytest.raises(UpdateError) as info:
        run(f, req, part)
    return info.value


def on_disk(part: Path) -> int:
    return part.stat().st_size if part.exists() else 0


def test_plain_download_lands_verified_and_renamed(tmp: Path) -> None:
    data = blob()
    part = tmp / "incoming" / "x.part"
    with HttpServer(tmp, {"/b": Route(data)}) as srv:
        progress = Progress()
        got = HttpFetcher(HttpSettings()).fetch(
            request(srv.url("/b"), data), part, progress, threading.Event()
        )
    assert got == complete_path(part) and got.read_bytes() == data
    assert not part.exists() and not part.with_name("x.part.meta").exists()
    assert progress.calls[-1] == (SIZE, SIZE)
    assert srv.seen[0].headers.get("Accept-Encoding") == "identity"


def test_cut_several_times_across_a_poor_link_resumes_to_the_right_file(tmp: Path) -> None:
    data = blob()
    part = tmp / "x.part"
    with (
        HttpServer(tmp, {"/b": Route(data)}) as srv,
        PoorLink(("127.0.0.1", srv.port), rate_bytes_s=400_000, delay_s=0.002,
                 cut_after=[40_000, 70_000, 50_000, 90_000]) as link,
    ):  # fmt: skip
        f = fetcher()
        got = run(f, request(srv.url("/b", port=link.port), data), part)
    assert got.read_bytes() == data
    assert link.cuts >= 4 and f.attempts >= 5
    ranges = [s.headers.get("Range") for s in srv.seen]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:])
    assert all(s.headers.get("If-Range") == '"v1"' for s in srv.seen[1:])


def test_random_drops_with_a_seed_still_complete(tmp: Path) -> None:
    data = blob(500_000)
    with (
        HttpServer(tmp, {"/b": Route(data)}) as srv,
        PoorLink(("127.0.0.1", srv.port), cut_every=60_000, seed=7) as link,
    ):
        got = run(
            fetcher(max_retries=2), request(srv.url("/b", port=link.port), data), tmp / "p.part"
        )
    assert got.read_bytes() == data and link.cuts >= 3


def test_a_new_fetcher_resumes_what_a_killed_one_left(tmp: Path) -> None:
    data = blob()
    part = tmp / "x.part"
    with HttpServer(tmp, {"/b": Route(data)}) as srv:
        with PoorLink(("127.0.0.1", srv.port), cut_after=[100_000] + [0] * 10) as link:
            err = refused(
                fetcher(max_retries=0), request(srv.url("/b", port=link.port), data), part
            )
        assert err.code == UpdateCode.DOWNLOAD_FAILED and "max_retries" in err.message
        kept = on_disk(part)
        assert 0 < kept < SIZE
        f = fetcher()  # as after an agent restart: nothing in memory, the partial on disk
        got = run(f, request(srv.url("/b"), data), part)
    assert got.read_bytes() == data and f.resumed_from == kept
    assert srv.seen[-1].headers["Range"] == f"bytes={kept}-"


def test_range_ignored_by_the_server_starts_over(tmp: Path) -> None:
    data = blob()
    part = tmp / "x.part"
    part.write_bytes(data[:123_456])
    with HttpServer(tmp, {"/b": Route(data, honour_range=False)}) as srv:
        f = fetcher()
        got = run(f, request(srv.url("/b"), data), part)
    assert got.read_bytes() == data and f.restarts == 1


def test_changed_file_is_not_spliced(tmp: Path) -> None:
    old, new = blob(seed=1), blob(seed=2)
    part = tmp / "x.part"
    route = Route(old, etag='"old"')
    with HttpServer(tmp, {"/b": route}) as srv:
        with PoorLink(("127.0.0.1", srv.port), cut_after=[100_000] + [0] * 10) as link:
            refused(fetcher(max_retries=0), request(srv.url("/b", port=link.port), new), part)
        assert on_disk(part) > 0
        route.data, route.etag = new, '"new"'
        got = run(fetcher(), request(srv.url("/b"), new), part)
    assert got.read_bytes() == new
    assert srv.seen[-1].headers["If-Range"] == '"old"'  # asked; the server sent all of `new`


def test_server_ignoring_if_range_with_a_new_etag_starts_over(tmp: Path) -> None:
    data = blob()
    part = tmp / "x.part"
    part.write_bytes(blob(seed=9)[:50_000])
    part.with_name("x.part.meta").write_text(
        f'{{"sha256": "{hashlib.sha256(data).hexdigest()}", "size": {SIZE}, "etag": "\\"a\\""}}'
    )
    # The server answers 206 to any Range, whatever If-Range says, with another ETag.
    # The handler takes If-Range "a" as fresh (its Last-Modified) and answers 206 with ETag "b".
    route = Route(data, etag='"b"', last_modified='"a"')
    with HttpServer(tmp, {"/b": route}) as srv:
        f = fetcher()
        got = run(f, request(srv.url("/b"), data), part)
    assert got.read_bytes() == data and f.restarts >= 1


def test_redirects_followed_up_to_the_cap(tmp: Path) -> None:
    data = blob(10_000)
    with HttpServer(tmp) as srv:
        srv.routes.update({
            "/a": Route(status=302, location="/b"), "/b": Route(status=307, location=srv.url("/c")),
            "/c": Route(data),
        })  # fmt: skip
        assert run(fetcher(max_redirects=2), request(srv.url("/a"), data), tmp / "1.part").exists()
        err = refused(fetcher(max_redirects=1), request(srv.url("/a"), data), tmp / "2.part")
    assert err.code == UpdateCode.DOWNLOAD_FAILED and "update.max_redirects" in err.message


def test_redirect_loop_and_bad_schemes_are_refused(tmp: Path) -> None:
    data = blob(1000)
    with HttpServer(tmp) as srv:
        srv.routes.update({
            "/loop": Route(status=301, location="/loop"),
            "/ftp": Route(status=302, location="ftp://127.0.0.1/x"),
            "/file": Route(status=302, location="file:///etc/passwd"),
            "/creds": Route(status=302, location="http://u:p@127.0.0.1/x"),
        })  # fmt: skip
        for path, words in [("/loop", "redirect"), ("/ftp", "http://"), ("/file", "http://"),
                            ("/creds", "credentials")]:  # fmt: skip
            err = refused(fetcher(), request(srv.url(path), data), tmp / "p.part")
            assert err.code == UpdateCode.DOWNLOAD_FAILED and words in err.message, err.message
            assert "p@" not in err.message


def test_https_to_http_redirect_is_refused(tmp: Path) -> None:
    pki = make_pki(tmp / "pki")
    data = blob(1000)
    with HttpServer(tmp) as plain, HttpServer(tmp, pki=pki) as tls:
        plain.routes["/b"] = Route(data)
        tls.routes["/down"] = Route(status=302, location=plain.url("/b"))
        tls.routes["/b"] = Route(data)
        f = fetcher(tls=tls_context(str(pki.ca_cert)))
        assert run(f, request(tls.url("/b", host="localhost"), data), tmp / "ok.part").exists()
        err = refused(f, request(tls.url("/down"), data), tmp / "p.part")
    assert err.code == UpdateCode.DOWNLOAD_FAILED and "https -> http" in err.message


def test_untrusted_certificate_is_refused_at_once(tmp: Path) -> None:
    pki, other = make_pki(tmp / "pki"), make_pki(tmp / "other", name="someone-else")
    data = blob(1000)
    with HttpServer(tmp, {"/b": Route(data)}, pki=pki) as srv:
        for ctx in (tls_context(str(other.ca_cert)), tls_context("")):
            f = fetcher(tls=ctx, max_retries=5)
            err = refused(f, request(srv.url("/b"), data), tmp / "p.part")
            assert err.code == UpdateCode.DOWNLOAD_FAILED and "update.ca_file" in err.message
            assert f.attempts == 1  # not retried: a retry cannot make it trusted


def test_content_length_above_size_is_oversize_and_nothing_kept(tmp: Path) -> None:
    data = blob(50_000)
    with HttpServer(tmp, {"/b": Route(data)}) as srv:
        err = refused(fetcher(), request(srv.url("/b"), data[:20_000], size=20_000), tmp / "p.part")
    assert err.code == UpdateCode.OVERSIZE and "20000" in err.message
    assert on_disk(tmp / "p.part") <= 20_000


def _endless(handler: object) -> None:
    h = handler  # BaseHTTPRequestHandler
    h.send_response(200)  # type: ignore[attr-defined]
    h.send_header("Transfer-Encoding", "chunked")  # type: ignore[attr-defined]
    h.end_headers()  # type: ignore[attr-defined]
    piece = os.urandom(8192)
    try:
        for _ in range(100_000):
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))  # type: ignore[attr-defined]
    except OSError:
        pass


def test_endless_chunked_body_is_cut_at_the_signed_size(tmp: Path) -> None:
    part = tmp / "p.part"
    with HttpServer(tmp, {"/b": Route(raw=_endless)}) as srv:
        err = refused(fetcher(), request(srv.url("/b"), b"x" * 100_000), part)
    assert err.code == UpdateCode.OVERSIZE and "100000" in err.message
    assert on_disk(part) <= 100_000 and not complete_path(part).exists()


def test_wrong_hash_is_refused_and_the_partial_removed(tmp: Path) -> None:
    data = blob(40_000)
    part = tmp / "p.part"
    with HttpServer(tmp, {"/b": Route(data)}) as srv:
        err = refused(fetcher(), request(srv.url("/b"), data, sha="ab" * 32), part)
    assert err.code == UpdateCode.HASH_MISMATCH and hashlib.sha256(data).hexdigest() in err.message
    assert not part.exists() and not complete_path(part).exists()


def test_a_whole_file_shorter_than_the_signed_size_is_refused_at_once(tmp: Path) -> None:
    # A 200 with a complete Content-Length below `size` is another file: no retry or
    # resume can turn it into the signed bundle.
    data = blob(40_000)
    part = tmp / "p.part"
    with HttpServer(tmp, {"/short": Route(data[:-100])}) as srv:
        f = fetcher()
        err = refused(f, request(srv.url("/short"), data), part)
    assert err.code == UpdateCode.DOWNLOAD_FAILED, err
    assert "39900 bytes" in err.message and "40000" in err.message
    assert f.attempts == 1


def test_404_is_final_and_500_is_retried(tmp: Path) -> None:
    data = blob(5000)
    with HttpServer(
        tmp, {"/flaky": Route(data, fail_first=2), "/down": Route(data, fail_first=99)}
    ) as srv:
        f = fetcher()
        err = refused(f, request(srv.url("/missing?token=SECRET"), data), tmp / "1.part")
        assert err.code == UpdateCode.DOWNLOAD_FAILED and "404" in err.message and f.attempts == 1
        assert "SECRET" not in err.message and "/missing" in err.message
        assert run(f, request(srv.url("/flaky"), data), tmp / "2.part").read_bytes() == data
        err = refused(fetcher(max_retries=2), request(srv.url("/down"), data), tmp / "3.part")
    assert err.code == UpdateCode.DOWNLOAD_FAILED and "503" in err.message
    assert "update.max_retries" in err.message


def test_a_server_that_stops_sending_times_out_and_is_retried(tmp: Path) -> None:
    data = blob(20_000)

    def stall(h: object) -> None:
        h.send_response(200)  # type: ignore[attr-defined]
        h.send_header("Content-Length", str(len(data)))  # type: ignore[attr-defined]
        h.end_headers()  # type: ignore[attr-defined]
        h.wfile.write(data[:1000])  # type: ignore[attr-defined]
        h.wfile.flush()  # type: ignore[attr-defined]
        time.sleep(3)

    with HttpServer(tmp, {"/b": Route(raw=stall)}) as srv:
        f = fetcher(read_timeout_s=0.5, max_retries=1)
        err = refused(f, request(srv.url("/b"), data), tmp / "p.part")
    assert err.code == UpdateCode.DOWNLOAD_FAILED and "update.read_timeout_s" in err.message
    assert f.attempts == 3  # the first brought 1000 bytes (progress), then two without


def test_cancel_is_honoured_promptly(tmp: Path) -> None:
    data = blob(200_000)
    cancel = threading.Event()
    with HttpServer(tmp, {"/b": Route(data, drip_s=0.01)}) as srv:
        timer = threading.Timer(0.3, cancel.set)
        timer.start()
        with pytest.raises(UpdateError) as info:
            run(fetcher(), request(srv.url("/b"), data), tmp / "p.part", cancel)
    assert info.value.code == UpdateCode.CANCELLED
    assert 0 < on_disk(tmp / "p.part") < len(data)  # kept for a resume


def test_bandwidth_cap_slows_the_download_to_at_most_the_cap(tmp: Path) -> None:
    data = blob(120_000)
    kbps = 4000.0  # 500 kB/s: the cap-implied minimum is 0.24 s
    with HttpServer(tmp, {"/b": Route(data)}) as srv:
        start = time.monotonic()
        run(fetcher(max_kbps=kbps), request(srv.url("/b"), data), tmp / "p.part")
        elapsed = time.monotonic() - start
    # A cap can only slow a download down: this bound cannot flake on a busy machine.
    assert elapsed >= len(data) / (kbps * 1000 / 8) * 0.8, elapsed


def test_gzip_encoding_is_refused(tmp: Path) -> None:
    data = blob(1000)

    def gz(h: object) -> None:
        h.send_response(200)  # type: ignore[attr-defined]
        h.send_header("Content-Encoding", "gzip")  # type: ignore[attr-defined]
        h.send_header("Content-Length", "10")  # type: ignore[attr-defined]
        h.end_headers()  # type: ignore[attr-defined]
        h.wfile.write(b"\x1f\x8b" + b"\x00" * 8)  # type: ignore[attr-defined]

    with HttpServer(tmp, {"/b": Route(raw=gz)}) as srv:
        err = refused(fetcher(), request(srv.url("/b"), data), tmp / "p.part")
    assert err.code == UpdateCode.DOWNLOAD_FAILED and "gzip" in err.message


def test_refused_connections_for_a_while_are_retried(tmp: Path) -> None:
    data = blob(30_000)
    with HttpServer(tmp, {"/b": Route(data)}) as srv, PoorLink(("127.0.0.1", srv.port)) as link:
        link.refuse(0.3)
        f = fetcher(max_retries=50, backoff_min_s=0.05, backoff_max_s=0.1)
        assert run(f, request(srv.url("/b", port=link.port), data), tmp / "p.part").exists()
    assert f.attempts >= 2


def test_complete_file_from_an_earlier_run_is_returned_without_a_download(tmp: Path) -> None:
    data = blob(10_000)
    part = tmp / "p.part"
    complete_path(part).write_bytes(data)
    with HttpServer(tmp, {"/b": Route(data)}) as srv:
        assert run(fetcher(), request(srv.url("/b"), data), part).read_bytes() == data
    assert srv.seen == []


def test_disk_full_is_no_space_with_figures(tmp: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    data = blob(10_000)
    part = tmp / "p.part"
    part.symlink_to("/dev/full")
    with HttpServer(tmp, {"/b": Route(data)}) as srv:
        err = refused(fetcher(), request(srv.url("/b"), data), part)
    assert err.code == UpdateCode.NO_SPACE and "bytes free" in err.message


def test_tls_download_cut_across_a_poor_link_resumes(tmp: Path) -> None:
    pki = make_pki(tmp / "pki")
    data = blob(200_000)
    with (
        HttpServer(tmp, {"/b": Route(data)}, pki=pki) as srv,
        PoorLink(("127.0.0.1", srv.port), rate_bytes_s=500_000, cut_after=[60_000, 90_000]) as link,
    ):
        f = fetcher(tls=tls_context(str(pki.ca_cert)))
        got = run(f, request(srv.url("/b", port=link.port, host="localhost"), data), tmp / "p.part")
    assert got.read_bytes() == data and link.cuts >= 2 and f.attempts >= 3


def test_progress_is_reported_a_few_times_a_second_at_most(tmp: Path) -> None:
    data = blob(150_000)
    progress = Progress()
    with HttpServer(tmp, {"/b": Route(data)}) as srv:
        start = time.monotonic()
        fetcher(max_kbps=2400).fetch(request(srv.url("/b"), data), tmp / "p.part", progress,
                                     threading.Event())  # fmt: skip
        elapsed = time.monotonic() - start
    # One call at the start and one at the end, at most one per 0.25 s between.
    assert 3 <= len(progress.calls) <= elapsed / 0.25 + 3, (len(progress.calls), elapsed)
    done = [d for d, _ in progress.calls]
    assert done == sorted(done) and done[-1] == len(data)


def test_ca_file_from_a_credential_and_a_bad_ca_file_is_a_config_error(tmp: Path) -> None:
    from agent.config.typed import ConfigError

    pki = make_pki(tmp / "pki")
    creds = tmp / "creds"
    creds.mkdir()
    (creds / "update-ca").write_bytes(pki.ca_cert.read_bytes())
    data = blob(5000)
    with HttpServer(tmp, {"/b": Route(data)}, pki=pki) as srv:
        ctx = tls_context("credential:update-ca", {"CREDENTIALS_DIRECTORY": str(creds)})
        assert run(fetcher(tls=ctx), request(srv.url("/b"), data), tmp / "p.part").exists()
    (tmp / "junk.pem").write_text("not a certificate")
    for ref in (str(tmp / "junk.pem"), str(tmp / "missing.pem")):
        with pytest.raises(ConfigError) as info:
            tls_context(ref)
        assert info.value.issues[0].path == "update.ca_file"

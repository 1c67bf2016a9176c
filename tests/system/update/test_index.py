"""Pull updates through the signed release index, across real processes.

A good index resolves to a deploy that commits; an expired index (freeze attack) and an
index with a lower counter than one seen (rollback attack) are refused with their codes
while the old model keeps serving.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.system.update.flows import code_of, no_traceback, wait_version
from tests.update_rig import MODEL, Bundles, Load, Rig, served_version


def _index(rig: Rig, key: Ed25519PrivateKey, counter: int, expires_in: timedelta,
           releases: list[tuple[str, str]]) -> bytes:  # fmt: skip
    from agent.update.index import Release, build_index

    rows = []
    for version, path in releases:
        data = rig.server.routes[path].data
        import hashlib

        rows.append(Release(MODEL, version, hashlib.sha256(data).hexdigest(), len(data),
                            rig.server.url(path)))  # fmt: skip
    return build_index(rows, counter, datetime.now(UTC) + expires_in, key)


def _refusal(rig: Rig, timeout: float = 120) -> dict[str, Any]:
    """The first pull refusal about the index (or a committed job, which fails the test)."""
    deadline = time.monotonic() + timeout
    while True:
        for e in rig.console.events():
            if e["kind"] == "update.committed" or (
                e["kind"] == "update.pull_refused" and code_of(e).startswith("update.index")
            ):
                return e
        assert time.monotonic() < deadline, rig.console.kinds()
        time.sleep(0.05)


def _pull_agent(rig: Rig) -> None:
    rig.start_agent(update=f'repository = "{rig.server.url("/index.json")}"\npoll_s = 0.5\n'
                           '[update.trial]\nwindow_s = 0.5\nmin_requests = 0\nmax_p95_ratio = 50\n')  # fmt: skip


def test_a_good_index_pulls_and_commits(
    rig: Rig, bundles: Bundles, demo_key: Ed25519PrivateKey
) -> None:
    good = bundles.good("1.1.0")
    rig.server.add("/b", good.data)
    rig.server.add("/index.json", _index(rig, demo_key, 5, timedelta(hours=1), [("1.1.0", "/b")]))
    _pull_agent(rig)
    assert rig.agent is not None
    with Load(rig.agent.socket, clients=2) as load:
        final = rig.console.wait_event({"update.committed", "update.failed"}, 240)
        assert final["kind"] == "update.committed", final
        wait_version(rig, "1.1.0")
    assert "update.pull" in rig.console.kinds()
    assert load.report.failures == 0, load.report.failed


def test_an_expired_index_is_refused(
    rig: Rig, bundles: Bundles, demo_key: Ed25519PrivateKey
) -> None:
    good = bundles.good("1.1.0")
    rig.server.add("/b", good.data)
    rig.server.add("/index.json", _index(rig, demo_key, 5, timedelta(hours=-1), [("1.1.0", "/b")]))
    _pull_agent(rig)
    refused = _refusal(rig)
    assert code_of(refused) == "update.index_expired", refused
    assert rig.agent is not None and served_version(rig.agent) == "1.0.0"
    no_traceback(rig)


def test_an_older_index_is_refused(rig: Rig, bundles: Bundles, demo_key: Ed25519PrivateKey) -> None:
    good = bundles.good("1.1.0")
    rig.server.add("/b", good.data)
    rig.server.add("/a", bundles.good("1.0.0").data)
    # First the device sees counter 9 (nothing newer than what it serves) ...
    rig.server.add("/index.json", _index(rig, demo_key, 9, timedelta(hours=1), [("1.0.0", "/a")]))
    _pull_agent(rig)
    assert rig.agent is not None
    with rig.agent.client() as api:
        assert api.request("GET", "/v2/health/ready")[0] == 200
    rig.server.requests("/index.json")
    deadline = time.monotonic() + 60
    while not rig.server.requests("/index.json"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # ... then an older, validly signed index that lists a release: a rollback attack.
    rig.server.add("/index.json", _index(rig, demo_key, 3, timedelta(hours=1), [("1.1.0", "/b")]))
    refused = _refusal(rig)
    assert code_of(refused) == "update.index_rollback", refused
    assert served_version(rig.agent) == "1.0.0"
    no_traceback(rig)


def test_start_with_a_repository_reports_no_spurious_refusal(
    rig: Rig, bundles: Bundles, demo_key: Ed25519PrivateKey
) -> None:
    """The first poll must wait for the model served at start: a device that serves 1.0.0
    must not say "no model is served" on every start."""
    rig.server.add("/a", bundles.good("1.0.0").data)
    rig.server.add("/index.json", _index(rig, demo_key, 9, timedelta(hours=1), [("1.0.0", "/a")]))
    _pull_agent(rig)
    deadline = time.monotonic() + 60
    while len(rig.server.requests("/index.json")) < 3:  # a few polls
        assert time.monotonic() < deadline
        time.sleep(0.05)
    refusals = [e for e in rig.console.events() if e["kind"] == "update.pull_refused"]
    assert refusals == [], refusals

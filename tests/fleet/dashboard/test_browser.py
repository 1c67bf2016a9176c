"""The dashboard's pages in a real headless Chromium (tests/fleet/dashboard/_browser.py)
against the real server (tests/fleet/dashboard/_server.py: uvicorn on a free port, a
real FleetClient + FleetView over 300 simulated devices on a real mosquitto, an SQLite
record), with real rollouts driven by the engine against the simulator.

Each test looks at what an operator sees (the DOM), keeps a screenshot of its page in
.artifacts/dashboard/ (or $EDGERUN_ARTIFACTS/dashboard), and fails on any error in the
browser's console: a CSP refusal of an inline script or style would show there.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.signing import load_public_key
from fleet.ports import RecordKind
from fleet.rollout.bundle import BundleInfo, inspect_bundle
from fleet.rollout.control import request
from fleet.rollout.engine import RolloutEngine
from fleet.rollout.plan import RolloutPlan
from fleet.rollout.sources import console_sources
from fleet.rollout.state import RolloutState
from tests.fleet.dashboard._browser import Browser, browser
from tests.fleet.dashboard._server import PASSWORD, USER, DashboardServer
from tests.helpers import DEMO_PUB, SampleParts, make_bundle
from tests.mqtt_broker import Broker

__all__ = ["browser"]  # a fixture, used by name

DEVICES = 300
ROW_H = 28  # px, .vt tbody tr in app.css


@pytest.fixture(scope="module")
def dash(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardServer]:
    """300 devices on 10 connections (one process, cheap on 2 cores), telemetry every
    second, so the device page has points to draw within a few seconds."""
    with DashboardServer(
        broker,
        tmp_path_factory.mktemp("dash-browser"),
        devices=DEVICES,
        connections=10,
        telemetry_interval_s=1.0,
        prefix="pg",
    ) as d:
        yield d


@pytest.fixture(scope="module")
def bundle(
    tmp_path_factory: pytest.TempPathFactory, sample_parts: SampleParts, demo_key: Any
) -> BundleInfo:
    """The sample model as a real signed 2.0.0 bundle, verified as deploy does."""
    path = make_bundle(
        sample_parts, tmp_path_factory.mktemp("bundle") / "digits-2.0.0.edgebundle", demo_key,
        version="2.0.0",
    )  # fmt: skip
    return inspect_bundle(path, [load_public_key(DEMO_PUB)])


@pytest.fixture
def page(browser: Browser) -> Iterator[Browser]:
    """The browser with its console log emptied; after the test, no errors in it."""
    browser.clear_logs()
    yield browser
    errors = browser.console_errors()
    assert not errors, f"errors in the browser console: {errors}"


def ready(b: Browser, name: str, timeout: float = 20.0) -> None:
    b.wait_js(f"return document.documentElement.dataset.{name}", timeout)


def visible_ids(b: Browser) -> list[str]:
    return list(b.js("return [...document.querySelectorAll('#rows tr[data-device]')]"
                     ".map(tr => tr.dataset.device)"))  # fmt: skip


# --------------------------------------------------------------------------- the table


def test_the_table_lists_every_device_through_its_virtual_list(
    dash: DashboardServer, page: Browser
) -> None:
    page.open(f"{dash.url}/")
    ready(page, "tableReady")
    assert page.text("#count") == f"{DEVICES} devices"
    on_screen = visible_ids(page)
    # Only the rows on screen (plus a margin) are in the DOM, not all 300.
    assert 10 < len(on_screen) < 80, len(on_screen)
    assert on_screen[:3] == sorted(dash.sim.device_ids)[:3]
    first = page.text("#rows tr[data-device]") or ""
    assert "healthy" in first and "online" in first and "digits 1.0.0" in first, first
    page.screenshot("devices")
    # Scroll through it all, a screen at a time, collecting what each screen shows.
    seen: set[str] = set()
    height = page.js("return document.getElementById('scroller').clientHeight")
    top = 0
    while True:
        page.js("document.getElementById('scroller').scrollTop = arguments[0]", top)
        # Drawn on the next frame: wait until the rows of this scroll position are in.
        page.wait(
            lambda: page.js(
                "const s = document.getElementById('scroller');"
                "return document.getElementById('rows').dataset.drawnAt == s.scrollTop"
                "  && !document.querySelector('#rows tr.loading');"
            ),
            10,
            "the rows of this screen",
        )
        seen.update(visible_ids(page))
        at = page.js("return document.getElementById('scroller').scrollTop")
        if at < top or top > DEVICES * ROW_H:
            break  # the browser clamped the scroll: this was the last screen
        top += height
    assert seen == set(dash.sim.device_ids)
    page.screenshot("devices-end")


def test_sort_by_a_header_search_and_group(dash: DashboardServer, page: Browser) -> None:
    page.open(f"{dash.url}/")
    ready(page, "tableReady")
    page.click('th button[data-sort="p95_ms"]')
    page.wait_js("return location.search.includes('sort=p95_ms')", 5)
    assert (page.text('th[aria-sort="ascending"]') or "").startswith("p95 ms")
    page.wait(
        lambda: page.attr("#rows tr[data-index='0']", "data-device") not in (None, "pg-0000"),
        10,
        "the first row of the p95 order",
    )
    order = visible_ids(page)
    status, body = dash.get_json("/api/devices?sort=p95_ms&limit=1000")
    assert status == 200
    ranked = [r["device_id"] for r in body["rows"]]
    # Telemetry moves the figures every second, so the two snapshots differ a little:
    # most of the first screen is among the fastest devices.
    assert len(set(order[:20]) & set(ranked[:40])) >= 15, (order[:20], ranked[:40])
    page.screenshot("devices-sorted")

    target = sorted(dash.sim.device_ids)[123]
    box = page.find("#q")
    box.clear()
    box.send_keys(target)
    page.wait(lambda: page.text("#count") == "1 device", 10, "the search result")
    page.wait(lambda: visible_ids(page) == [target], 10, "only the match")

    page.js(
        "const q = document.getElementById('q'); q.value = '';"
        "q.dispatchEvent(new Event('input'));"
        "const s = document.getElementById('group'); s.value = 'line-2';"
        "s.dispatchEvent(new Event('change'))"
    )
    in_group = [d for d in dash.sim.device_ids if "line-2" in dash.sim.state(d)["groups"]]
    assert 0 < len(in_group) < DEVICES
    page.wait(lambda: page.text("#count") == f"{len(in_group)} devices", 10, "the group")


def test_a_device_going_offline_turns_its_row_within_seconds(
    dash: DashboardServer, page: Browser
) -> None:
    page.open(f"{dash.url}/")
    ready(page, "tableReady")
    page.wait(lambda: page.text("#live-state") == "live", 10, "the live stream")
    device = sorted(dash.sim.device_ids)[2]  # on the first screen
    row = f'#rows tr[data-device="{device}"]'
    assert page.attr(row, "data-health") == "ok"
    # The page must not be reloaded for it: a marker set now survives only in-place updates.
    page.js("window.__noReload = 1")
    dash.sim.offline(device)
    try:
        t0 = time.monotonic()
        page.wait(lambda: page.attr(row, "data-health") == "offline", 10, "the row offline")
        took = time.monotonic() - t0
        assert page.js("return window.__noReload") == 1
        text = page.text(row) or ""
        assert "offline" in text and "online" not in text, text
        page.screenshot("devices-offline")
    finally:
        dash.sim.online(device)
    page.wait(lambda: page.attr(row, "data-health") == "ok", 15, "the row back online")
    print(f"offline shown after {took:.2f} s")

    # A row further down (another page of rows, another live subscription) turns too.
    far = sorted(dash.sim.device_ids)[DEVICES - 3]
    row = f'#rows tr[data-device="{far}"]'
    page.js("const s = document.getElementById('scroller'); s.scrollTop = s.scrollHeight")
    page.wait(lambda: page.attr(row, "data-health") == "ok", 10, "the last rows drawn")
    # Rows there update in place: wait for its next report (a newer telemetry_ts).
    ts = float(page.attr(row, "data-telemetry-ts") or 0)
    page.wait(lambda: float(page.attr(row, "data-telemetry-ts") or 0) > ts, 10, "a live update")
    dash.sim.offline(far)
    try:
        page.wait(lambda: page.attr(row, "data-health") == "offline", 10, "the far row offline")
        assert page.js("return window.__noReload") == 1
    finally:
        dash.sim.online(far)
    page.wait(lambda: page.attr(row, "data-health") == "ok", 15, "the far row back online")


# --------------------------------------------------------------------------- device page


def test_the_device_page_draws_its_charts(dash: DashboardServer, page: Browser) -> None:
    device = sorted(dash.sim.device_ids)[7]
    # Telemetry reaches the store in batches: wait until the API has a few points.
    deadline = time.monotonic() + 20
    while True:
        status, cols = dash.get_json(f"/api/devices/{device}/telemetry?since=0")
        if (status == 200 and len(cols["ts"]) >= 3) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(cols["ts"]) >= 3, cols
    page.open(f"{dash.url}/device/{device}")
    ready(page, "chartsReady")
    assert page.text("#device-id") == device
    for series in ("p95_ms", "rate_per_s", "error_rate", "rss_mb"):
        fig = f'figure.chart[data-series="{series}"]'
        assert int(page.attr(fig, "data-points") or 0) >= 3, series
        assert page.js("return !!document.querySelector(arguments[0])", f"{fig} canvas"), series
    # The canvas is drawn: some of its pixels are not blank.
    inked = page.js(
        "const c = document.querySelector('figure.chart[data-series=p95_ms] canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;"
    )
    assert inked > 500, inked
    summary = page.text("#summary") or ""
    assert "online" in summary and "digits 1.0.0" in summary, summary
    # The variant the (simulated) device chose, and its reason.
    assert "Variant" in summary and "was the faster of 2 that passed" in summary, summary
    page.screenshot("device")


# --------------------------------------------------------------------------- rollouts


def engine(dash: DashboardServer) -> RolloutEngine:
    """The real rollout engine on the dashboard's own client, view and store (bundles
    over HTTP from 127.0.0.1), with quick ticks."""
    return RolloutEngine(
        dash.store,
        dash.view,
        dash.client,
        operator="browser-tester",
        sources=console_sources(dash.client, "127.0.0.1", [load_public_key(DEMO_PUB)]),
        tick_s=0.05,
        lease_ttl_s=5.0,
        command_timeout_s=5.0,
    )


def start(dash: DashboardServer, bundle: BundleInfo, devices: list[str], **plan: Any) -> str:
    """Record a rollout of `bundle` to `devices` (not driven yet); its id."""
    options: dict[str, Any] = {"targets": tuple(devices), "device_timeout_s": 10.0, **plan}
    return engine(dash).create(RolloutPlan(**options), bundle).rollout_id


def drive(dash: DashboardServer, rollout_id: str) -> threading.Thread:
    t = threading.Thread(target=engine(dash).drive, args=(rollout_id,), daemon=True)
    t.start()
    return t


GATE_ROWS = (
    "return [...document.querySelectorAll('#gates tr[data-gate]')]"
    ".map(tr => [tr.dataset.device, tr.dataset.gate, tr.dataset.passed])"
)


def test_a_rollouts_waves_and_gates_appear_as_it_runs(
    dash: DashboardServer, page: Browser, bundle: BundleInfo
) -> None:
    ids = sorted(dash.sim.device_ids)[200:206]
    bad = ids[1]  # a canary whose p95 is 1.5x its own: the 1.2x gate fails on it
    dash.sim.set_profile("2.0.0", p95_factor=1.5, devices=[bad])
    rid = start(dash, bundle, ids, canary=2, wave="2", soak_s=0.5,
                gates="p95_ms<=1.2x,error_rate<=0.05")  # fmt: skip
    page.open(f"{dash.url}/rollout/{rid}")
    ready(page, "rolloutReady")
    page.wait(lambda: page.text("#live-state") == "live", 10, "the live stream")
    page.js("window.__noReload = 1")
    assert page.attr('#timeline .lane[data-wave="0"]', "data-passed") == "pending"
    assert page.js(GATE_ROWS) == []
    thread = drive(dash, rid)
    try:
        # Live (rollout events): the failing gate appears with its figure and limit.
        failed = f'#gates tr[data-device="{bad}"][data-gate="p95_ms<=1.2x"][data-passed="false"]'
        page.wait(lambda: page.text(failed), 30, "the failed gate")
        cells = page.js(
            "return [...document.querySelector(arguments[0]).cells].map(c => c.innerText)", failed
        )
        figure, baseline, limit = (float(c) for c in cells[3:6])
        assert figure > limit == pytest.approx(1.2 * baseline, rel=0.02)
        page.wait(
            lambda: (
                "p95_ms<=1.2x" in (page.text("#halt") or "")
                and page.js("return !document.getElementById('halt').hidden")
            ),
            30,
            "the halt reason",
        )
        page.wait(
            lambda: page.attr('#timeline .lane[data-wave="0"]', "data-passed") == "false",
            15,
            "wave 0 failed on the timeline",
        )
        thread.join(60)
        assert not thread.is_alive()
        page.wait(lambda: "finished: halted" in (page.text("#rollout-phase") or ""), 15)
        assert page.js("return window.__noReload") == 1  # all of it arrived live
        # Every gate the record holds is on the page, passed or failed.
        state = RolloutState.fold(dash.store.records(rollout_id=rid))
        want = sorted([g.device_id, g.gate, json.dumps(g.passed)] for _, g in state.gate_results)
        assert len(want) == 4  # two canaries, two gates each
        page.wait(lambda: sorted(page.js(GATE_ROWS)) == want, 10, f"the gates {want}")
        status = f'#devices tr[data-device="{bad}"]'
        page.wait(lambda: page.attr(status, "data-status") == "rolled_back", 10)
        assert state.devices[bad].status == "rolled_back"
        untouched = f'#devices tr[data-device="{ids[5]}"]'
        assert page.attr(untouched, "data-status") == "pending"
        page.screenshot("rollout-halted")
    finally:
        thread.join(60)
    page.open(f"{dash.url}/rollouts")
    ready(page, "rolloutsReady")
    listed = page.text(f'#rollouts tr[data-rollout="{rid}"]') or ""
    assert "halted" in listed and "digits 2.0.0" in listed, listed
    page.screenshot("rollouts")


def test_pause_works_with_a_login_and_is_refused_without_one(
    dash: DashboardServer, page: Browser, bundle: BundleInfo
) -> None:
    ids = sorted(dash.sim.device_ids)[220:224]
    # A long soak keeps it running while the test looks at it; it is aborted at the end.
    rid = start(dash, bundle, ids, canary=1, wave="1", soak_s=60, gates="error_rate<=0.5")
    thread = drive(dash, rid)

    def pauses() -> list[Any]:
        return dash.store.records(rollout_id=rid, kinds=[RecordKind.PAUSE_REQUESTED])

    try:
        page.driver.delete_all_cookies()
        page.open(f"{dash.url}/rollout/{rid}")
        ready(page, "rolloutReady")
        assert page.js("return !!document.getElementById('action-pause')")
        assert not page.enabled("#action-pause"), "pause is offered without a login"
        assert "log in" in (page.text("#actions-note") or "")
        # A forged POST from the page without a session: 401, nothing recorded.
        status = page.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {method: 'POST', headers: {'Content-Type': 'application/json',"
            " 'X-CSRF-Token': 'forged'}, body: '{}'}).then(r => done(r.status));",
            f"/api/rollouts/{rid}/pause",
        )
        assert status == 401
        assert not pauses()
        page.clear_logs()  # the browser logs that refused POST as an error: expected here
        page.screenshot("rollout-read-only")

        page.open(f"{dash.url}/login?next=/rollout/{rid}")
        page.find("#user").send_keys(USER)
        page.find("#password").send_keys(PASSWORD)
        page.screenshot("login")
        page.click("#login-submit")
        page.wait_js(f"return location.pathname === '/rollout/{rid}'", 10)
        ready(page, "rolloutReady")
        assert f"signed in as {USER}" in (page.text("#who") or "")
        page.wait(lambda: page.enabled("#action-pause"), 10, "pause enabled")
        # The session cookie is HttpOnly: the page's script cannot read it.
        assert "edgerun_session" not in page.js("return document.cookie")
        page.click("#action-pause")
        page.wait(pauses, 10, "the pause request in the record")
        rec = pauses()[0]
        assert rec.operator == USER and rec.key_id == dash.client.key_id  # audited
        page.wait(lambda: "requested" in (page.text("#action-result") or ""), 10)
        # The driver obeys on its next tick; the page hears it live and offers resume.
        page.wait(lambda: page.enabled("#action-resume"), 15, "resume offered")
        assert not page.enabled("#action-pause")
        page.screenshot("rollout-paused")
    finally:
        request(dash.store, rid, "abort", (dash.client.key_id, "test"))
        thread.join(60)
        page.driver.delete_all_cookies()


def test_a_dashboard_without_credentials_says_it_is_read_only(
    broker: Broker, tmp_path: Path, page: Browser
) -> None:
    with DashboardServer(broker, tmp_path, devices=3, prefix="ro", credentials=False) as ro:
        # The module's broker also holds the other server's 300 devices: search for these.
        page.open(f"{ro.url}/?q=ro-")
        ready(page, "tableReady")
        assert page.text("#count") == "3 devices"
        assert page.text("#read-only") == "read-only dashboard"
        assert not page.js("return !!document.getElementById('login-link')")  # no login offered
        page.open(f"{ro.url}/login")
        page.wait(lambda: "read-only" in (page.text("#login-error") or ""), 10, "the reason")
        assert not page.enabled("#login-submit")
        page.screenshot("login-read-only")

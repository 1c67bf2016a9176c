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
from typing import Any

import pytest

from fleet.ports import RecordKind
from fleet.rollout.bundle import BundleInfo
from fleet.rollout.control import request
from fleet.rollout.state import RolloutState
from tests.fleet.dashboard._browser import Browser, browser
from tests.fleet.dashboard._server import PASSWORD, USER, DashboardServer, dashboard_bundle
from tests.mqtt_broker import Broker

__all__ = ["browser", "dashboard_bundle"]  # fixtures used by name

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
    assert page.find("#count").text == f"{DEVICES} devices"
    on_screen = visible_ids(page)
    # Only the rows on screen (plus a margin) are in the DOM, not all 300.
    assert 10 < len(on_screen) < 80, len(on_screen)
    assert on_screen[:3] == sorted(dash.sim.device_ids)[:3]
    first = page.find("#rows tr[data-device]")
    assert "healthy" in first.text and "online" in first.text and "digits 1.0.0" in first.text
    page.screenshot("devices")
    # Scroll through it all, a screen at a time, collecting what each screen shows.
    seen: set[str] = set()
    height = page.js("return document.getElementById('scroller').clientHeight")
    top = 0
    while True:
        page.js("document.getElementById('scroller').scrollTop = arguments[0]", top)
        page.wait(
            lambda: (
                (ids := visible_ids(page))
                and page.js("return !document.querySelector('#rows tr.loading')")
                and ids
            ),
            10,
            "the rows of this screen",
        )
        seen.update(visible_ids(page))
        at = page.js("const s = document.getElementById('scroller'); return s.scrollTop")
        if at < top or top > DEVICES * ROW_H:
            break
        top += height
    assert seen == set(dash.sim.device_ids)
    page.screenshot("devices-end")


def test_sort_by_a_header_search_and_group(dash: DashboardServer, page: Browser) -> None:
    page.open(f"{dash.url}/")
    ready(page, "tableReady")
    page.find('th button[data-sort="p95_ms"]').click()
    page.wait_js("return location.search.includes('sort=p95_ms')", 5)
    ready(page, "tableReady")

    def p95s() -> list[float]:
        return [
            float(t)
            for t in page.js(
                "return [...document.querySelectorAll('#rows tr[data-device] td:nth-child(5)')]"
                ".map(td => td.textContent)"
            )
            if t != "—"
        ]

    page.wait(lambda: len(p95s()) > 10, 10, "p95 figures")
    # Ascending over the figures (rows already re-sorted server-side; live updates
    # change figures in place, so compare a snapshot taken with the page's own order).
    assert page.find('th[aria-sort="ascending"]').text.startswith("p95 ms")
    order = page.js("return [...document.querySelectorAll('#rows tr[data-device]')]"
                    ".map(tr => tr.dataset.device)")  # fmt: skip
    status, body = dash.get_json("/api/devices?sort=p95_ms&limit=1000")
    assert status == 200
    ranked = [r["device_id"] for r in body["rows"]]
    # Telemetry moves figures every second: most of the first screen keeps its place.
    assert len(set(order[:20]) & set(ranked[:40])) >= 15
    page.screenshot("devices-sorted")

    target = sorted(dash.sim.device_ids)[123]
    box = page.find("#q")
    box.clear()
    box.send_keys(target)
    page.wait(lambda: page.find("#count").text == "1 device", 10, "the search result")
    assert page.wait(lambda: visible_ids(page) == [target], 10, "only the match")

    box.clear()
    box.send_keys("\b")
    page.wait(lambda: page.find("#count").text == f"{DEVICES} devices", 10)
    page.js(
        "const s = document.getElementById('group'); s.value = 'line-2';"
        "s.dispatchEvent(new Event('change'))"
    )
    in_group = [d for d in dash.sim.device_ids if "line-2" in dash.sim.state(d)["groups"]]
    page.wait(lambda: page.find("#count").text == f"{len(in_group)} devices", 10, "the group")


def test_a_device_going_offline_turns_its_row_within_seconds(
    dash: DashboardServer, page: Browser
) -> None:
    page.open(f"{dash.url}/")
    ready(page, "tableReady")
    page.wait_js("return document.getElementById('live-state').textContent === 'live'", 10)
    device = sorted(dash.sim.device_ids)[2]  # on the first screen
    row = f'#rows tr[data-device="{device}"]'
    assert page.find(row).get_attribute("data-health") == "ok"
    # The page must not be reloaded for it: a marker set now survives only in-place updates.
    page.js("window.__noReload = 1")
    dash.sim.offline(device)
    try:
        t0 = time.monotonic()
        page.wait(lambda: page.find(row).get_attribute("data-health") == "offline", 10, "offline")
        took = time.monotonic() - t0
        assert page.js("return window.__noReload") == 1
        text = page.find(row).text
        assert "offline" in text and "online" not in text
        page.screenshot("devices-offline")
    finally:
        dash.sim.online(device)
    page.wait(lambda: page.find(row).get_attribute("data-health") == "ok", 15, "back online")
    print(f"offline shown after {took:.2f} s")


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
    assert page.find("#device-id").text == device
    for series in ("p95_ms", "rate_per_s", "error_rate", "rss_mb"):
        fig = page.find(f'figure.chart[data-series="{series}"]')
        assert int(fig.get_attribute("data-points")) >= 3, series
        assert fig.find_elements("css selector", "canvas"), f"no canvas for {series}"
    # The canvas is drawn: some of its pixels are not blank.
    inked = page.js(
        "const c = document.querySelector('figure.chart[data-series=p95_ms] canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;"
    )
    assert inked > 500, inked
    summary = page.find("#summary").text
    assert "online" in summary and "digits 1.0.0" in summary
    page.screenshot("device")


# --------------------------------------------------------------------------- rollouts


def drive(dash: DashboardServer, rollout_id: str, **kw: Any) -> threading.Thread:
    engine = dash.engine(**kw)
    t = threading.Thread(target=engine.drive, args=(rollout_id,), daemon=True)
    t.start()
    return t


def test_a_rollouts_waves_and_gates_appear_as_it_runs(
    dash: DashboardServer, page: Browser, dashboard_bundle: BundleInfo
) -> None:
    ids = sorted(dash.sim.device_ids)[200:206]
    bad = ids[1]  # a canary whose p95 is 1.5x its own: the 1.2x gate fails on it
    dash.sim.set_profile("2.0.0", p95_factor=1.5, devices=[bad])
    plan = dash.plan(ids, canary=2, wave="2", soak_s=0.5, gates="p95_ms<=1.2x,error_rate<=0.05")
    created = dash.engine().create(plan, dashboard_bundle)
    rid = created.rollout_id
    page.open(f"{dash.url}/rollout/{rid}")
    ready(page, "rolloutReady")
    page.wait_js("return document.getElementById('live-state').textContent === 'live'", 10)
    page.js("window.__noReload = 1")
    assert page.find_all("#timeline .lane")[0].get_attribute("data-passed") == "undefined"
    assert not page.find_all("#gates tr[data-gate]")
    thread = drive(dash, rid)
    try:
        # Live (rollout events): the failing gate appears with its figure and limit.
        failed = f'#gates tr[data-device="{bad}"][data-gate="p95_ms<=1.2x"][data-passed="false"]'
        row = page.wait(lambda: page.find_all(failed), 30, "the failed gate")[0]
        cells = row.find_elements("css selector", "td")
        figure, baseline, limit = (float(c.text) for c in cells[3:6])
        assert figure > limit == pytest.approx(1.2 * baseline, rel=0.02)
        page.wait(
            lambda: "p95_ms<=1.2x" in page.find("#halt").text and page.find("#halt").is_displayed(),
            30,
            "the halt reason",
        )
        page.wait_js(
            "return document.querySelector('#timeline .lane[data-wave=\"0\"]')"
            ".dataset.passed === 'false'",
            15,
        )
        thread.join(60)
        assert not thread.is_alive()
        page.wait(lambda: "finished: halted" in page.find("#rollout-phase").text, 15, "halted")
        assert page.js("return window.__noReload") == 1  # all of it arrived live
        # Every gate the record holds is on the page, passed or failed.
        state = RolloutState.fold(dash.store.records(rollout_id=rid))
        on_page = page.js(
            "return [...document.querySelectorAll('#gates tr[data-gate]')]"
            ".map(tr => [tr.dataset.device, tr.dataset.gate, tr.dataset.passed])"
        )
        want = [[g.device_id, g.gate, json.dumps(g.passed)] for _, g in state.gate_results]
        page.wait(lambda: sorted(map(list, page.js(
            "return [...document.querySelectorAll('#gates tr[data-gate]')]"
            ".map(tr => [tr.dataset.device, tr.dataset.gate, tr.dataset.passed])"
        ))) == sorted(want), 10, f"the gates {want} (page: {on_page})")  # fmt: skip
        outcome = page.find(f'#devices tr[data-device="{bad}"]').get_attribute("data-status")
        assert outcome == state.devices[bad].status == "rolled_back"
        untouched = page.find(f'#devices tr[data-device="{ids[5]}"]').get_attribute("data-status")
        assert untouched == "pending"
        page.screenshot("rollout-halted")
    finally:
        thread.join(60)
    page.open(f"{dash.url}/rollouts")
    ready(page, "rolloutsReady")
    listed = page.find(f'#rollouts tr[data-rollout="{rid}"]')
    assert "halted" in listed.text and "digits 2.0.0" in listed.text
    page.screenshot("rollouts")


def test_pause_works_with_a_login_and_is_refused_without_one(
    dash: DashboardServer, page: Browser, dashboard_bundle: BundleInfo
) -> None:
    ids = sorted(dash.sim.device_ids)[220:224]
    # A long soak keeps it running while the test looks at it; it is aborted at the end.
    plan = dash.plan(ids, canary=1, wave="1", soak_s=60, gates="error_rate<=0.5")
    rid = dash.engine().create(plan, dashboard_bundle).rollout_id
    thread = drive(dash, rid)
    try:
        page.driver.delete_all_cookies()
        page.open(f"{dash.url}/rollout/{rid}")
        ready(page, "rolloutReady")
        pause = page.find("#action-pause")
        assert not pause.is_enabled(), "pause is offered without a login"
        assert "log in" in page.find("#actions-note").text
        # A forged POST from the page without a session: 401, nothing recorded.
        status = page.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {method: 'POST', headers: {'Content-Type': 'application/json',"
            " 'X-CSRF-Token': 'forged'}, body: '{}'}).then(r => done(r.status));",
            f"/api/rollouts/{rid}/pause",
        )
        assert status == 401
        assert not dash.store.records(rollout_id=rid, kinds=[RecordKind.PAUSE_REQUESTED])
        page.screenshot("rollout-read-only")

        page.open(f"{dash.url}/login?next=/rollout/{rid}")
        page.find("#user").send_keys(USER)
        page.find("#password").send_keys(PASSWORD)
        page.screenshot("login")
        page.find("#login-submit").click()
        page.wait_js(f"return location.pathname === '/rollout/{rid}'", 10)
        ready(page, "rolloutReady")
        assert f"signed in as {USER}" in page.find("#who").text
        page.wait(lambda: page.find("#action-pause").is_enabled(), 10, "pause enabled")
        # The session cookie is HttpOnly: the page's script cannot read it.
        assert "edgerun_session" not in page.js("return document.cookie")
        page.find("#action-pause").click()
        page.wait(
            lambda: dash.store.records(rollout_id=rid, kinds=[RecordKind.PAUSE_REQUESTED]),
            10,
            "the pause request in the record",
        )
        rec = dash.store.records(rollout_id=rid, kinds=[RecordKind.PAUSE_REQUESTED])[0]
        assert rec.operator == USER and rec.key_id == dash.client.key_id  # audited
        page.wait(lambda: "requested" in page.find("#action-result").text, 10)
        page.wait(lambda: page.find("#action-resume").is_enabled(), 15, "resume offered")
        page.screenshot("rollout-paused")
    finally:
        request(dash.store, rid, "abort", (dash.client.key_id, "test"))
        thread.join(60)
        page.driver.delete_all_cookies()

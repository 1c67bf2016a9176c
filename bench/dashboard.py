"""The dashboard in a real browser: how fast the device table comes up with 1,000 and
10,000 devices, what the server holds in memory, and how long a device's telemetry
takes to reach the page.

    python bench/dashboard.py [--sizes 1000,10000] [--runs 3] [--latency-s 15]

Per size, a fresh local mosquitto, `edge-fleet simulate N` in its own process (N/100
connections, telemetry every `--telemetry-interval` s, spread over it) and `edge-fleet
serve` in its own process (so its RSS is its own), read by a headless Chromium
(tests/fleet/dashboard/_browser.py). Medians of `--runs` page loads, each in a new
browser (nothing cached):

  - first render: the browser's first contentful paint (the page shell: header, toolbar);
  - full table: the page's `edgerun:table-ready` mark: the virtual list knows the total
    (every row is reachable by scrolling) and the first screen of rows is drawn;
  - last screen: from a jump to the bottom of the list until its last row is drawn
    (the page fetches that page of rows on demand);
  - server RSS (VmRSS of the `edge-fleet serve` process) once the table is up, and its
    peak (VmHWM);
  - update latency: for every row on screen, the page's clock when a row with a newer
    `telemetry_ts` entered the DOM minus that `telemetry_ts` (the simulated device's
    clock when it built the report: the same machine): publish -> broker -> the
    server's view -> the SSE hub (coalesced, at most every 250 ms) -> the page.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fleet.dashboard._browser import Browser  # noqa: E402
from tests.mqtt_broker import Broker, free_port  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# Records, in the page, when each row with a new telemetry_ts is put into the DOM.
OBSERVE = """
window.__lat = []; const seen = new Map();
const note = (tr) => {
  const ts = parseFloat(tr.dataset.telemetryTs); const id = tr.dataset.device;
  if (!ts || !id) return;
  const before = seen.get(id);
  if (before !== undefined && ts > before) window.__lat.push(Date.now() / 1000 - ts);
  if (before === undefined || ts > before) seen.set(id, ts);
};
document.querySelectorAll('#rows tr[data-device]').forEach(note);
new MutationObserver((ms) => { for (const m of ms) for (const n of m.addedNodes)
  if (n.nodeType === 1 && n.dataset && n.dataset.device) note(n); })
  .observe(document.getElementById('rows'), {childList: true});
"""


def write_key(directory: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    priv, pub = directory / "console.key", directory / "console.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return priv, pub


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def wait_for(pred: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except OSError:
            pass
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(
                    f"{p.args[:6]} exited with {p.returncode} while waiting for {what}"
                )
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.25)


def load_once(base: str, n: int) -> dict[str, float]:
    with Browser() as b:
        b.open(f"{base}/")
        b.wait_js("return document.documentElement.dataset.tableReady", 120)
        out = b.js(
            "const p = performance.getEntriesByName('first-contentful-paint')[0];"
            "const t = performance.getEntriesByName('edgerun:table-ready')[0];"
            "return {fcp: p ? p.startTime : null, table: t.startTime,"
            " count: document.getElementById('count').textContent};"
        )
        assert out["count"] == f"{n} devices", out
        # Jump to the end: the last page of rows is fetched and drawn.
        t0 = b.js(
            "const s = document.getElementById('scroller'); const t = performance.now();"
            "s.scrollTop = s.scrollHeight; return t;"
        )
        last = f"#rows tr[data-index='{n - 1}']"
        b.wait_js(f'return document.querySelector("{last}") !== null', 60)
        out["last_screen"] = b.js("return performance.now()") - t0
        return out


def latency(base: str, seconds: float) -> list[float]:
    with Browser() as b:
        b.open(f"{base}/")
        b.wait_js("return document.documentElement.dataset.tableReady", 120)
        b.wait_js("return document.getElementById('live-state').textContent === 'live'", 30)
        b.js(OBSERVE)
        time.sleep(seconds)  # a measurement window, not a wait for a condition
        return [float(x) for x in b.js("return window.__lat")]


def run_size(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    priv, pub = write_key(tmp)
    with Broker(tmp / f"broker-{n}") as broker:
        url = f"mqtt://{broker.host}:{broker.port}"
        sim = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "--broker", url, "simulate", str(n),
             "--prefix", f"d{n}", "--connections", str(max(1, n // 100)),
             "--telemetry-interval", str(args.telemetry_interval), "--console-key", str(pub),
             "--skip-download"],
            stdout=(tmp / f"sim-{n}.log").open("wb"), stderr=subprocess.STDOUT, env=ENV,
            cwd=ROOT,
        )  # fmt: skip
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        serve = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "--broker", url, "--key", str(priv),
             "--db", str(tmp / f"fleet-{n}.db"), "serve", "--listen", f"127.0.0.1:{port}",
             "--settle", "120"],
            stdout=(tmp / f"serve-{n}.log").open("wb"), stderr=subprocess.STDOUT, env=ENV,
            cwd=ROOT,
        )  # fmt: skip
        try:
            wait_for(lambda: get_json(f"{base}/api/devices?limit=1")["total"] >= n, 300,
                     f"{n} devices on the dashboard", [sim, serve])  # fmt: skip
            loads = [load_once(base, n) for _ in range(args.runs)]
            rss_mb = proc_kb(serve.pid, "VmRSS") / 1024
            lat = latency(base, args.latency_s)
            hwm_mb = proc_kb(serve.pid, "VmHWM") / 1024
        finally:
            for p in (serve, sim):
                p.terminate()
            for p in (serve, sim):
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    med = statistics.median
    return {
        "devices": n,
        "first_render_ms": med(x["fcp"] for x in loads if x["fcp"] is not None),
        "full_table_ms": med(x["table"] for x in loads),
        "last_screen_ms": med(x["last_screen"] for x in loads),
        "server_rss_mb": round(rss_mb, 1),
        "server_peak_rss_mb": round(hwm_mb, 1),
        "update_latency_ms_median": round(med(lat) * 1000, 1) if lat else None,
        "update_latency_ms_p90": (
            round(sorted(lat)[int(0.9 * (len(lat) - 1))] * 1000, 1) if lat else None
        ),
        "latency_samples": len(lat),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--latency-s", type=float, default=15.0, help="latency window (s)")
    ap.add_argument("--telemetry-interval", type=float, default=5.0)
    ap.add_argument("--json", action="store_true", help="one JSON object per size")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        for n in (int(s) for s in args.sizes.split(",")):
            r = run_size(n, args, Path(tmp_name))
            if args.json:
                print(json.dumps(r), flush=True)
                continue
            print(f"{n:>6} devices: first render {r['first_render_ms']:.0f} ms, full table "
                  f"{r['full_table_ms']:.0f} ms, last screen {r['last_screen_ms']:.0f} ms "
                  f"(medians of {args.runs}); server RSS {r['server_rss_mb']} MB "
                  f"(peak {r['server_peak_rss_mb']} MB); telemetry -> page median "
                  f"{r['update_latency_ms_median']} ms, p90 {r['update_latency_ms_p90']} ms "
                  f"({r['latency_samples']} updates)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

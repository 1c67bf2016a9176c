"""Over-the-air updates under steady load (issue 8): figures, no assertions.

Real parts (tests/update_rig.py): mosquitto with mutual TLS, an HTTPS bundle server,
a signing console, an `edge-agent run` process, client threads on the Unix socket.
Printed as a table, medians of --runs runs:

* failed requests during a deploy (target 0), under --clients clients;
* deploy sent -> first answer from the new model (download + verify + validate + swap),
  and the swap alone (`update.swapping` -> `update.trial` event times on the device);
* trial breach (first NaN answer of a model that breaks the trial) -> first answer of
  the old model again (target under 2 s);
* RSS growth over 50 swaps of a model with 8 MiB of weights (one run);
* shadow mode's cost to live latency (p50/p95 without a job and while a candidate runs
  in shadow on every request);
* download throughput of the sample with and without `update.max_kbps`.

    python bench/update.py [--runs 3] [--clients 4] [--swaps 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import ROOT, pct

sys.path.insert(0, str(ROOT))

from agent.signing import load_private_key
from tests.helpers import DEMO_KEY, unpack_sample
from tests.update_rig import (
    Bundles,
    Load,
    Rig,
    rss_mb,
    served_version,
    update_rig,
)

FINAL = {"update.committed", "update.failed", "update.rolled_back", "update.cancelled"}
QUICK = {"window_s": 0.5, "min_requests": 0, "max_p95_ratio": 50}  # p95 of 0.5 s is noise


def _deploy(rig: Rig, args: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    after = rig.console.last_seq()
    reply = rig.console.deploy(args)
    deadline = time.monotonic() + 30
    # A job whose final event was sent may still be ending (update.busy): retry, as a
    # console would (a job used to outlive its final event).
    while (reply.get("error") or {}).get("code") == "update.busy" and time.monotonic() < deadline:
        time.sleep(0.05)
        reply = rig.console.deploy(args)
    if not reply.get("ok"):
        raise RuntimeError(f"deploy refused: {reply.get('error')}")
    return rig.console.wait_event(FINAL, timeout, after=after)


def _event_ts(rig: Rig, kind: str, after_seq: int) -> float | None:
    for e in rig.console.events():
        if e["kind"] == kind and e["seq"] > after_seq:
            return float(e["ts"])
    return None


def bench_deploy(tmp: Path, bundles: Bundles, clients: int, version: str) -> dict[str, float]:
    with update_rig(tmp) as rig:
        agent = rig.start_agent()
        release = bundles.good(version)
        url = rig.server.add("/b", release.data)
        with Load(agent.socket, clients=clients) as load:
            load.wait_requests(300)
            seq = rig.console.last_seq()
            t0 = time.perf_counter()
            final = _deploy(rig, release.deploy_args(url, trial=QUICK))
            load.wait_requests(300)
        if final["kind"] != "update.committed":
            raise RuntimeError(f"not committed: {final}")
        first_new = load.report.first(t0, lambda v, f: v == version)
        swap = _event_ts(rig, "update.swapping", seq)
        trial = _event_ts(rig, "update.trial", seq)
        return {
            "failed": float(load.report.failures),
            "requests": float(load.report.ok),
            "deploy_to_new_s": (first_new - t0) if first_new else float("nan"),
            "swap_s": (trial - swap) if swap and trial else float("nan"),
        }


def bench_breach(tmp: Path, bundles: Bundles, clients: int, version: str) -> dict[str, float]:
    with update_rig(tmp) as rig:
        agent = rig.start_agent()
        bad = bundles.nan_on_live(version)
        url = rig.server.add("/nan", bad.data)
        trial = {"window_s": 60, "min_requests": 10, "max_nonfinite_rate": 0.0, "max_p95_ratio": 50}
        with Load(agent.socket, clients=clients, live=True) as load:
            load.wait_requests(100)
            t0 = time.perf_counter()
            final = _deploy(rig, bad.deploy_args(url, trial=trial))
            load.wait_requests(100)
        if final["kind"] != "update.rolled_back":
            raise RuntimeError(f"not rolled back: {final}")
        breach = load.report.first(t0, lambda v, f: not f)
        if breach is None:
            raise RuntimeError("no NaN answer seen before the rollback")
        back = load.report.first(breach, lambda v, f: v == "1.0.0" and f)
        return {
            "breach_to_old_s": (back - breach) if back else float("nan"),
            "nan_answers": float(load.report.nonfinite),
            "failed": float(load.report.failures),
        }


def bench_swaps(tmp: Path, bundles: Bundles, swaps: int) -> dict[str, float]:
    with update_rig(tmp) as rig:
        agent = rig.start_agent()
        readings = []
        with Load(agent.socket, clients=2) as load:
            for i in range(1, swaps + 1):
                release = bundles.weighty(f"1.0.{i}")
                url = rig.server.add(f"/b{i}", release.data)
                final = _deploy(rig, release.deploy_args(url, trial={"window_s": 0}))
                if final["kind"] != "update.committed":
                    raise RuntimeError(f"swap {i}: {final}")
                readings.append(rss_mb(agent.proc.pid))
        warm = min(5, len(readings) - 1)
        return {
            "rss_first_mb": readings[warm],
            "rss_last_mb": readings[-1],
            "rss_growth_mb": readings[-1] - readings[warm],
            "failed": float(load.report.failures),
            "served": float(served_version(agent) == f"1.0.{swaps}"),
        }


def bench_shadow(tmp: Path, bundles: Bundles, clients: int) -> dict[str, float]:
    with update_rig(tmp) as rig:
        agent = rig.start_agent()
        cand = bundles.good("1.1.0")
        url = rig.server.add("/s", cand.data)
        with Load(agent.socket, clients=clients) as base:
            base.wait_requests(2000)
        shadow = {"sample": 1.0, "min_requests": 1_000_000, "timeout_s": 3600}
        seq = rig.console.last_seq()
        reply = rig.console.deploy(cand.deploy_args(url, shadow=shadow))
        if not reply.get("ok"):
            raise RuntimeError(f"deploy refused: {reply.get('error')}")
        rig.console.wait_event({"update.shadow"}, 120, after=seq)
        with Load(agent.socket, clients=clients) as during:
            during.wait_requests(2000)
        rig.console.request("update.cancel")
        b, d = base.report.latencies_ms, during.report.latencies_ms
        return {
            "p50_ms": pct(b, 50),
            "p95_ms": pct(b, 95),
            "shadow_p50_ms": pct(d, 50),
            "shadow_p95_ms": pct(d, 95),
            "failed": float(base.report.failures + during.report.failures),
        }


def bench_download(tmp: Path, bundles: Bundles, kbps: float) -> dict[str, float]:
    with update_rig(tmp) as rig:
        rig.start_agent(update=f"max_kbps = {kbps}")
        release = bundles.good("1.1.0")
        url = rig.server.add("/d", release.data)
        seq = rig.console.last_seq()
        final = _deploy(rig, release.deploy_args(url, trial=QUICK))
        if final["kind"] != "update.committed":
            raise RuntimeError(f"not committed: {final}")
        start = _event_ts(rig, "update.downloading", seq)
        end = _event_ts(rig, "update.verifying", seq)
        seconds = (end - start) if start and end else float("nan")
        return {"kbit_per_s": release.size * 8 / 1000 / seconds, "seconds": seconds,
                "bytes": float(release.size)}  # fmt: skip


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _runs(label: str, n: int, fn: Callable[[int], dict[str, float]]) -> tuple[str, str]:
    results = []
    for i in range(n):
        try:
            results.append(fn(i))
        except (RuntimeError, AssertionError) as exc:
            return label, f"n/a: {str(exc)[:150]}"
    med = _median(results)
    return label, "  ".join(f"{k}={v:.3g}" for k, v in med.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--cap-kbps", type=float, default=1000.0)
    parser.add_argument("--only", default="deploy,breach,swaps,shadow,download",
                        help="comma-separated subset of the measurements")  # fmt: skip
    args = parser.parse_args()
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="er-bench-update-", dir="/tmp") as tmp_dir:
        tmp = Path(tmp_dir)
        parts = unpack_sample(tmp / "sample")
        bundles = Bundles(parts, load_private_key(DEMO_KEY), tmp / "bundles")
        counter = iter(range(10_000))

        def fresh() -> Path:
            path = tmp / f"run-{next(counter)}"
            path.mkdir()
            return path

        rows: list[tuple[str, str]] = []
        if "deploy" in only:
            rows.append(_runs(f"deploy under load ({args.clients} clients)", args.runs,
                  lambda i: bench_deploy(fresh(), bundles, args.clients, f"1.1.{i}")))  # fmt: skip
        if "breach" in only:
            rows.append(_runs("trial breach -> old model", args.runs,
                  lambda i: bench_breach(fresh(), bundles, args.clients, f"1.2.{i}")))  # fmt: skip
        if "swaps" in only:
            rows.append(_runs(f"{args.swaps} swaps in a row", 1,
                  lambda i: bench_swaps(fresh(), bundles, args.swaps)))  # fmt: skip
        if "shadow" in only:
            rows.append(_runs("shadow cost to live latency", args.runs,
                  lambda i: bench_shadow(fresh(), bundles, args.clients)))  # fmt: skip
        if "download" in only:
            rows.append(_runs("download, no cap", args.runs,
                              lambda i: bench_download(fresh(), bundles, 0)))  # fmt: skip
            rows.append(_runs(f"download, max_kbps={args.cap_kbps:g}", args.runs,
                  lambda i: bench_download(fresh(), bundles, args.cap_kbps)))  # fmt: skip
    width = max(len(label) for label, _ in rows)
    print(f"{'measurement':<{width}}  median of runs")
    for label, text in rows:
        print(f"{label:<{width}}  {text}")


if __name__ == "__main__":
    main()

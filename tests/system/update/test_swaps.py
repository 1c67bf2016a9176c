"""50 updates in a row under load: no request fails and RSS grows by less than a bound.

The candidates carry 8 MiB of weights (the sample's 150 KB would leak too little to be
seen): a reload that leaks its model (a session never closed, its weights, the unpacked
files mapped) costs at least that per swap, 360 MiB over 45 swaps, far above the bound.
"""

from __future__ import annotations

from tests.system.update.flows import deploy
from tests.update_rig import Bundles, Load, Rig, rss_mb, served_version

SWAPS = 50
WARM = 5  # swaps before the first reading (arenas and caches reach their size)
BOUND_MB = 64.0  # measured: a few MB


def test_50_swaps_in_a_row_grow_rss_less_than_a_bound(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    readings: list[float] = []
    with Load(agent.socket, clients=2) as load:
        for i in range(1, SWAPS + 1):
            release = bundles.weighty(f"1.0.{i}")
            url = rig.server.add(f"/b{i}", release.data)
            reply, final = deploy(
                rig, release.deploy_args(url, trial={"window_s": 0}), busy_retry_s=30
            )
            assert final is not None and final["kind"] == "update.committed", (i, reply, final)
            if i >= WARM:
                readings.append(rss_mb(agent.proc.pid))
    assert load.report.failures == 0, load.report.failed
    assert served_version(agent) == f"1.0.{SWAPS}"
    growth = readings[-1] - readings[0]
    print(f"RSS after swap {WARM}: {readings[0]:.1f} MB, after {SWAPS}: {readings[-1]:.1f} MB,"
          f" growth {growth:.1f} MB over {SWAPS - WARM} swaps")  # fmt: skip
    assert growth < BOUND_MB, readings

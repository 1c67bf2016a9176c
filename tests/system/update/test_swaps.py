"""50 updates in a row under load: no request fails and RSS grows by less than a bound.

A reload that leaks its model (session, arena, unpacked files mapped) would cost the
sample's runtime footprint (tens of MB, `figures.peak_memory_mb`) per swap: 45 swaps
would add far more than the bound.
"""

from __future__ import annotations

from tests.system.update.flows import deploy
from tests.update_rig import Bundles, Load, Rig, rss_mb, served_version

SWAPS = 50
WARM = 5  # swaps before the first reading (arenas and caches reach their size)
BOUND_MB = 48.0


def test_50_swaps_in_a_row_grow_rss_less_than_a_bound(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    readings: list[float] = []
    with Load(agent.socket, clients=2) as load:
        for i in range(1, SWAPS + 1):
            release = bundles.good(f"1.0.{i}")
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

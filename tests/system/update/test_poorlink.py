"""A download across a poor link (throttled, delayed, cut mid-transfer): resumed with
Range and committed, while the old model serves every request."""

from __future__ import annotations

from tests.poorlink import PoorLink
from tests.system.update.flows import deploy
from tests.update_rig import Bundles, Load, Rig, served_version


def test_https_download_across_a_poor_link_is_resumed_and_committed(
    rig: Rig, bundles: Bundles
) -> None:
    agent = rig.start_agent()
    release = bundles.good("1.1.0")
    rig.server.add("/b", release.data)
    with PoorLink(("127.0.0.1", rig.server.port), rate_bytes_s=150_000, delay_s=0.005,
                  cut_after=[60_000, 150_000]) as link:  # fmt: skip
        url = f"https://localhost:{link.port}/b"
        with Load(agent.socket, clients=2) as load:
            load.wait_requests(50)
            reply, final = deploy(rig, release.deploy_args(url, trial={"window_s": 0}))
            assert final is not None and final["kind"] == "update.committed", (reply, final)
        assert link.cuts >= 2, link.cuts
    ranges = [r.range for r in rig.server.requests("/b")]
    assert sum(1 for r in ranges if r and r.startswith("bytes=")) >= 2, ranges
    assert load.report.failures == 0, load.report.failed
    assert served_version(agent) == "1.1.0"

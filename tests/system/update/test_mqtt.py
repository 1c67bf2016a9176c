"""A good update over an MQTT chunk transfer under steady load, also across a poor link.

The console serves the bundle with fleet/transfer.py's ChunkSender on its own
connection; the device asks for what it lacks.
"""

from __future__ import annotations

from fleet.transfer import ChunkSender
from tests.poorlink import PoorLink
from tests.system.update.flows import (
    GOOD_PHASES,
    QUICK_TRIAL,
    deploy,
    is_subsequence,
    no_traceback,
    wait_version,
)
from tests.update_rig import DEVICE, Bundles, Load, Rig, served_version


def _transfer_args(sender: ChunkSender, version: str) -> dict[str, object]:
    return {"transfer": sender.transfer_id, "sha256": sender.sha256, "size": sender.size,
            "version": version, "trial": QUICK_TRIAL}  # fmt: skip


def test_good_update_over_an_mqtt_chunk_transfer_under_load(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    release = bundles.good("1.1.0")
    # A lossy sender: every 5th chunk is dropped the first time, so the device must ask again.
    sender = ChunkSender(rig.console.listener.client, DEVICE, "t-110", release.path,
                         skip=lambda index, sent: index % 5 == 0 and sent == 0).start()  # fmt: skip
    try:
        with Load(agent.socket, clients=4) as load:
            load.wait_requests(200)
            reply, final = deploy(rig, _transfer_args(sender, "1.1.0"))
            assert reply["ok"], reply
            assert final is not None and final["kind"] == "update.committed", final
            wait_version(rig, "1.1.0")
            load.wait_requests(100)
    finally:
        sender.stop()
    assert load.report.failures == 0, load.report.failed
    assert is_subsequence(GOOD_PHASES, rig.console.kinds()), rig.console.kinds()
    assert len(sender.needs) >= 2  # asked again for the dropped chunks
    rig.console.wait_state(lambda s: s.get("model", {}).get("version") == "1.1.0")
    no_traceback(rig)


def test_mqtt_transfer_survives_a_link_that_keeps_dropping(rig: Rig, bundles: Bundles) -> None:
    with PoorLink(rig.broker.address, rate_bytes_s=200_000, delay_s=0.005, cut_every=120_000,
                  seed=3) as link:  # fmt: skip
        agent = rig.start_agent(mqtt_port=link.port)
        release = bundles.good("1.1.0")
        sender = ChunkSender(rig.console.listener.client, DEVICE, "t-poor", release.path).start()
        try:
            with Load(agent.socket, clients=2) as load:
                load.wait_requests(50)
                reply, final = deploy(rig, _transfer_args(sender, "1.1.0"), timeout=400)
                assert reply["ok"], reply
                assert final is not None and final["kind"] == "update.committed", final
        finally:
            sender.stop()
        assert link.cuts >= 1, "the link was never cut: the test proved nothing"
    assert load.report.failures == 0, load.report.failed
    assert served_version(agent) == "1.1.0"

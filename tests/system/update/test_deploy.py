"""A good update under steady load: committed, the new version served, zero failed requests."""

from __future__ import annotations

from agent.protocol.state import ReportedState
from agent.protocol.update import JobAccepted, Phase, UpdateStatus
from tests.system.update.flows import (
    GOOD_PHASES,
    QUICK_TRIAL,
    after_final,
    deploy,
    is_subsequence,
    no_traceback,
    wait_version,
)
from tests.update_rig import Bundles, Load, Rig, served_version


def test_good_update_over_https_under_load_fails_no_request(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    release = bundles.good("1.1.0")
    url = rig.server.add("/digits-1.1.0.edgebundle", release.data)
    with Load(agent.socket, clients=4) as load:
        load.wait_requests(200)
        reply, final = deploy(rig, release.deploy_args(url, trial=QUICK_TRIAL))
        assert reply["ok"], reply
        assert final is not None and final["kind"] == "update.committed", final
        wait_version(rig, "1.1.0")
        # ... and the new model keeps answering under the same load.
        load.wait_requests(200)
    report = load.report
    assert report.failures == 0, report.failed
    assert report.nonfinite == 0
    assert report.versions["1.0.0"] > 0 and report.versions["1.1.0"] > 0, report.versions
    assert served_version(agent) == "1.1.0"
    kinds = rig.console.kinds()
    assert is_subsequence(GOOD_PHASES, kinds), kinds
    progress = [e for e in rig.console.events() if e["kind"] == "update.downloading"]
    assert progress and all(
        0 <= (e.get("data") or {}).get("percent", -1) <= 100 for e in progress
    ), progress
    state = rig.console.wait_state(lambda s: s.get("model", {}).get("version") == "1.1.0")
    assert state["model"]["sha256"] == release.sha256, state
    # ... with the job, its phase and version (docs/mqtt.md "the retained state").
    job = rig.console.wait_state(lambda s: (s.get("update") or {}).get("phase") == "committed")
    assert job["update"]["job"] == reply["result"]["job"] and job["update"]["version"] == "1.1.0"
    # Read as a console does: the typed state names the device's own rollback target.
    typed = ReportedState.from_json(job)
    assert typed.last_known_good is not None and typed.last_known_good.version == "1.0.0"
    assert typed.last_known_good.sha256 == typed.slots.previous
    assert typed.update is not None and typed.update.final
    assert JobAccepted.from_json(reply["result"]).job == typed.update.job
    # status and ping answered all along; update.status reports the finished job.
    status = rig.console.request("update.status")
    assert status["ok"], status
    read = UpdateStatus.from_json(status["result"])
    assert read.job is not None and read.job.known_phase is Phase.COMMITTED, status
    assert read.previous is not None and read.previous.version == "1.0.0"
    no_traceback(rig)


def test_ping_and_status_answer_while_a_slow_download_runs(rig: Rig, bundles: Bundles) -> None:
    rig.start_agent()
    release = bundles.good("1.1.0")
    # 16 KiB every 0.1 s: the download lasts about 2 s.
    url = rig.server.add("/slow.edgebundle", release.data, delay_s=0.1)
    after = rig.console.last_seq()
    reply = rig.console.deploy(release.deploy_args(url, trial=QUICK_TRIAL))
    assert reply["ok"], reply
    rig.console.wait_event({"update.downloading"}, 60, after=after)
    assert rig.console.request("ping", timeout=10)["ok"]
    assert rig.console.request("status", timeout=10)["ok"]
    busy = rig.console.deploy(bundles.good("1.2.0").deploy_args(url))
    assert not busy["ok"] and busy["error"]["code"] == "update.busy", busy
    final = rig.console.wait_event({"update.committed", "update.failed"}, 240, after=after)
    assert final["kind"] == "update.committed", final


def test_rollback_command_returns_to_the_previous_version(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    release = bundles.good("1.1.0")
    url = rig.server.add("/r.edgebundle", release.data)
    _, final = deploy(rig, release.deploy_args(url, trial=QUICK_TRIAL))
    assert final is not None and final["kind"] == "update.committed", final
    with Load(agent.socket, clients=2) as load:
        load.wait_requests(50)
        reply = after_final(rig, "rollback", {})
        assert reply["ok"], reply
        wait_version(rig, "1.0.0")
        load.wait_requests(50)
    assert load.report.failures == 0, load.report.failed
    rig.console.wait_state(lambda s: s.get("model", {}).get("version") == "1.0.0")


def test_cancel_during_a_slow_download_keeps_the_old_model(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    release = bundles.good("1.1.0")
    url = rig.server.add("/slow", release.data, delay_s=0.2, chunk=8192)  # ~8 s in all
    with Load(agent.socket, clients=2) as load:
        after = rig.console.last_seq()
        reply = rig.console.deploy(release.deploy_args(url, trial=QUICK_TRIAL))
        assert reply["ok"], reply
        rig.console.wait_event({"update.downloading"}, 60, after=after)
        cancel = rig.console.request("update.cancel")
        assert cancel["ok"], cancel
        final = rig.console.wait_event(
            {"update.cancelled", "update.committed", "update.failed"}, 60, after=after
        )
        load.wait_requests(20)
    assert final["kind"] == "update.cancelled", final
    assert load.report.failures == 0, load.report.failed
    assert served_version(agent) == "1.0.0"
    nothing = after_final(rig, "update.cancel", {})
    assert not nothing["ok"] and nothing["error"]["code"] == "update.nothing_to_cancel", nothing


def test_a_deploy_sent_on_the_committed_event_is_accepted(rig: Rig, bundles: Bundles) -> None:
    """A console that sees `update.committed` (a final phase) may send the next deploy."""
    rig.start_agent()
    for i in range(30):
        version = f"1.1.{i}"
        release = bundles.good(version)
        url = rig.server.add(f"/n{i}", release.data)
        reply, final = deploy(rig, release.deploy_args(url, trial={"window_s": 0}))
        assert reply["ok"], (version, reply)
        assert final is not None and final["kind"] == "update.committed", final

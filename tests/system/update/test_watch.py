"""The ML watchdog and shadow evaluation across real processes.

A model that validates but answers NaN to live traffic is rolled back by itself and
marked bad; shadow disagreement blocks promotion; shadow agreement promotes.
"""

from __future__ import annotations

import time

from tests.system.update.flows import (
    QUICK_TRIAL,
    after_final,
    code_of,
    deploy,
    no_traceback,
    wait_version,
)
from tests.update_rig import Bundles, Load, Rig, served_version


def test_a_model_breaking_the_trial_is_rolled_back_and_marked_bad(
    rig: Rig, bundles: Bundles
) -> None:
    agent = rig.start_agent()
    bad = bundles.nan_on_live("1.1.0")
    url = rig.server.add("/nan", bad.data)
    # Only the non-finite bound is under test (p95 loosened so it cannot trip first).
    trial = {"window_s": 60, "min_requests": 10, "max_nonfinite_rate": 0.0, "max_p95_ratio": 50}
    with Load(agent.socket, clients=2, live=True) as load:
        load.wait_requests(50)
        reply, final = deploy(rig, bad.deploy_args(url, trial=trial))
        assert reply["ok"], reply
        assert final is not None and final["kind"] == "update.rolled_back", final
        assert code_of(final) == "update.trial_failed", final
        wait_version(rig, "1.0.0")
        # After the rollback, live rows are answered again, finite, by 1.0.0 (a few
        # requests first: one in flight at the rollback may still end on the candidate).
        load.wait_requests(10)
        nonfinite = load.report.nonfinite
        load.wait_requests(50)
    assert load.report.nonfinite == nonfinite, load.report
    kinds = rig.console.kinds()
    assert "update.swapping" in kinds and "update.trial" in kinds, kinds
    # The reason names the bound and carries the figures.
    assert "nonfinite" in str(final).lower() or "non-finite" in str(final).lower(), final
    assert served_version(agent) == "1.0.0"
    rig.console.wait_state(lambda s: s.get("model", {}).get("version") == "1.0.0")
    # A second deploy of it is refused at once ...
    again = after_final(rig, "deploy", bad.deploy_args(url, trial=trial))
    assert not again["ok"] and code_of(again) == "update.marked_bad", again
    # ... and the mark survives a restart.
    agent.stop()
    agent = rig.start_agent()
    again = rig.console.deploy(bad.deploy_args(url, trial=trial))
    assert not again["ok"] and code_of(again) == "update.marked_bad", again
    no_traceback(rig)


def test_shadow_disagreement_blocks_promotion(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    other = bundles.permuted("1.1.0")
    url = rig.server.add("/perm", other.data)
    shadow = {"sample": 1.0, "min_requests": 20, "min_agreement": 0.9, "timeout_s": 120}
    with Load(agent.socket, clients=2) as load:
        load.wait_requests(20)
        reply, final = deploy(rig, other.deploy_args(url, shadow=shadow))
        assert reply["ok"], reply
        load.wait_requests(20)
    assert final is not None and final["kind"] == "update.failed", final
    assert code_of(final) == "update.shadow_disagreed", final
    assert "update.shadow" in rig.console.kinds()
    assert "update.swapping" not in rig.console.kinds()
    # Every live answer came from the served model.
    assert load.report.failures == 0 and set(load.report.versions) == {"1.0.0"}, load.report
    assert served_version(agent) == "1.0.0"
    no_traceback(rig)


def test_shadow_agreement_promotes_with_figures(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    good = bundles.good("1.1.0")
    url = rig.server.add("/good", good.data)
    shadow = {"sample": 1.0, "min_requests": 20, "min_agreement": 0.9, "timeout_s": 120}
    with Load(agent.socket, clients=2) as load:
        load.wait_requests(20)
        reply, final = deploy(rig, good.deploy_args(url, shadow=shadow, trial=QUICK_TRIAL))
        load.wait_requests(20)
    assert final is not None and final["kind"] == "update.committed", final
    assert "update.shadow" in rig.console.kinds()
    # The agreement and both latencies are reported (in the events after the verdict).
    keys = {k for e in rig.console.events() for k in (e.get("data") or {})}
    assert any("agreement" in k for k in keys), sorted(keys)
    assert final is not None and any("agreement" in k for k in final["data"]), final
    assert load.report.failures == 0, load.report.failed
    assert served_version(agent) == "1.1.0"


def test_trial_passes_on_a_healthy_model_and_commits(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    good = bundles.good("1.1.0")
    url = rig.server.add("/good", good.data)
    t0 = time.monotonic()
    with Load(agent.socket, clients=2, live=True) as load:
        load.wait_requests(20)
        _, final = deploy(
            rig,
            good.deploy_args(url, trial={"window_s": 3, "min_requests": 5, "max_p95_ratio": 10}),
        )
    assert final is not None and final["kind"] == "update.committed", final
    assert time.monotonic() - t0 >= 3  # the trial window was honoured
    assert load.report.failures == 0, load.report.failed


def test_a_much_slower_model_is_rolled_back_on_its_p95(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    # 250 layers (~0.5 GFLOP a row, ~9 ms idle): well past twice the previous p95 (which
    # counts as 2 ms at least) also on an idle box, where 20 layers (0.6 ms) did not.
    slow = bundles.slow("1.1.0", layers=250)
    url = rig.server.add("/slow", slow.data)
    trial = {"window_s": 60, "min_requests": 20, "max_p95_ratio": 2.0}
    with Load(agent.socket, clients=2) as load:
        load.wait_requests(200)  # the baseline p95 of 1.0.0 on this device
        reply, final = deploy(rig, slow.deploy_args(url, trial=trial))
        assert reply["ok"], reply
        assert final is not None and final["kind"] == "update.rolled_back", final
        wait_version(rig, "1.0.0")
        load.wait_requests(20)
    assert code_of(final) == "update.trial_failed", final
    assert "p95" in str(final), final
    assert load.report.failures == 0, load.report.failed
    assert load.report.versions["1.1.0"] > 0  # it did serve, and was caught live

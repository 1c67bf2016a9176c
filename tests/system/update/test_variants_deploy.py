"""An over-the-air deploy goes through the same variant choice as a start-up install:
a real agent, a real broker, the bundle over HTTPS; the INT8 variant's golden file is
deliberately wrong, so a float variant must serve, and the console must see which."""

from __future__ import annotations

from agent.protocol.state import ReportedState
from tests.system.update.flows import QUICK_TRIAL, deploy, no_traceback, wait_version
from tests.update_rig import Bundles, Release, Rig
from tests.variant_bundles import variant_bundle


def test_a_deploy_measures_the_variants_on_the_device_and_reports_the_choice(
    rig: Rig, bundles: Bundles
) -> None:
    agent = rig.start_agent()
    path = variant_bundle(bundles.parts, bundles.key, bundles.dir / "variants", "1.1.0",
                          wrong=("onnx-int8",), label="ota")  # fmt: skip
    release = Release(path, "1.1.0")
    url = rig.server.add("/digits-variants-1.1.0.edgebundle", release.data)
    reply, final = deploy(rig, release.deploy_args(url, trial=QUICK_TRIAL))
    assert reply["ok"], reply
    assert final is not None and final["kind"] == "update.committed", final
    wait_version(rig, "1.1.0")
    chosen = [e for e in rig.console.events("variant.") if e["kind"] == "variant.selected"]
    assert len(chosen) == 1, chosen
    data = chosen[0]["data"]
    assert data["measured"] == 3 and data["cached"] is False
    by_id = {v["id"]: v for v in data["variants"]}
    assert by_id["onnx-int8"]["status"] == "failed"
    assert by_id["onnx-int8"]["code"] == "bundle.golden_mismatch"
    assert data["variant"] in ("onnx-fp32", "tflite-fp32")
    assert by_id[data["variant"]]["status"] == "served"
    state = rig.console.wait_state(lambda s: s.get("model", {}).get("version") == "1.1.0")
    typed = ReportedState.from_json(state)
    assert typed.model is not None and typed.model.variant == data["variant"]
    assert typed.model.variant_reason.startswith("fastest of 2 that passed here")
    # The device's own status explains it too (the `status` command, as edge-fleet's).
    status = rig.console.request("status")
    assert status["ok"], status
    selection = status["result"]["model"]["selection"]
    assert selection["chosen"] == data["variant"]
    assert {v["id"]: v["status"] for v in selection["variants"]} == {
        k: v["status"] for k, v in by_id.items()
    }
    local = agent.client().get_json("/v2/edgerun/status")
    assert local["model"]["variant"] == data["variant"]
    no_traceback(rig)

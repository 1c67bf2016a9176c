"""The device picks the variant: measured here, the fastest that passes serves, cached.

Real onnxruntime and LiteRT sessions on real signed bundles (tests/variant_bundles.py);
an INT8 variant whose golden file is deliberately wrong must lose to the float one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.memory import AdmissionError
from agent.service import Agent
from agent.variants.cache import FILENAME
from agent.variants.errors import NoVariantPassedError, VariantMissingError
from tests.agent.test_admission import make_agent, served
from tests.helpers import SAMPLE_BUNDLE, SampleParts, base_config, running_agent
from tests.variant_bundles import variant_bundle


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("variant-bundles")


def selected(agent: Agent) -> list[dict[str, Any]]:
    return [e.data for e in agent.events.recent if e.kind == "variant.selected"]


def results(agent: Agent) -> dict[str, dict[str, Any]]:
    model = agent.host.model
    assert model is not None and model.selection is not None
    return {r.id: r.to_json() for r in model.selection.results}


def measuring(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("measuring variant")
    ]


def test_int8_failing_golden_here_serves_a_float_variant(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, built: Path, tmp: Path
) -> None:
    bundle = variant_bundle(sample_parts, demo_key, built, wrong=("onnx-int8",), label="wrong8")
    agent = make_agent(tmp)
    agent.admission.install(SAMPLE_BUNDLE)
    agent.admission.install(bundle)
    assert served(agent) == "1.1.0"
    model = agent.host.model
    assert model is not None and model.variant is not None
    by_id = results(agent)
    assert by_id["onnx-int8"]["status"] == "failed"
    assert by_id["onnx-int8"]["code"] == "bundle.golden_mismatch"
    assert "golden cases do not reproduce" in by_id["onnx-int8"]["reason"]
    passed = {k: v for k, v in by_id.items() if v["status"] in ("served", "passed")}
    assert set(passed) == {"onnx-fp32", "tflite-fp32"}
    # The served one is the fastest of those that passed, by the figures it reports.
    fastest = min(passed.values(), key=lambda r: r["p50_ms"])
    assert model.variant.id == fastest["id"] and by_id[fastest["id"]]["status"] == "served"
    assert all(r["p50_ms"] > 0 and r["peak_mb"] is not None for r in passed.values())
    assert model.runtime_name == ("litert" if fastest["format"] == "tflite" else "onnxruntime")
    assert model.runtime.model_path == model.directory / model.variant.file
    # Reported: the event with every variant's figures, and status explains the choice.
    events = selected(agent)
    assert len(events) == 1 and events[0]["measured"] == 3 and events[0]["cached"] is False
    assert events[0]["variant"] == model.variant.id
    status = agent.status()["model"]
    assert status["variant"] == model.variant.id
    assert status["selection"]["reason"].startswith("fastest of 2 that passed here")
    assert "1 failed: onnx-int8" in status["selection"]["reason"]
    assert {v["id"]: v["status"] for v in status["selection"]["variants"]} == {
        k: v["status"] for k, v in by_id.items()
    }


def test_every_variant_failing_is_refused_and_the_served_model_stays(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, built: Path, tmp: Path
) -> None:
    bundle = variant_bundle(sample_parts, demo_key, built, wrong=("onnx-fp32", "onnx-int8"),
                            include=("onnx-fp32", "onnx-int8"), label="allwrong")  # fmt: skip
    agent = make_agent(tmp)
    agent.admission.install(SAMPLE_BUNDLE)
    with pytest.raises(NoVariantPassedError) as info:
        agent.admission.install(bundle)
    assert info.value.code == "bundle.no_variant_passed"
    assert set(info.value.failures) == {"onnx-fp32", "onnx-int8"}
    assert "onnx-int8 (onnxruntime): bundle.golden_mismatch" in str(info.value)
    assert served(agent) == "1.0.0"
    refused = [e for e in agent.events.recent if e.kind == "model.refused"]
    assert refused[-1].data["code"] == "bundle.no_variant_passed"
    assert selected(agent) == []


def test_a_pinned_variant_serves_without_measuring_the_others(
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
    built: Path,
    tmp: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle = variant_bundle(sample_parts, demo_key, built, label="pin")
    agent = make_agent(tmp, model={"variant": "onnx-int8"})
    with caplog.at_level(logging.INFO, logger="agent.variants.select"):
        agent.admission.install(bundle)
    model = agent.host.model
    assert model is not None and model.variant is not None and model.variant.id == "onnx-int8"
    assert model.runtime.model_path.name == "model.onnx"  # the sample's INT8 QDQ model
    assert served(agent) == "1.1.0"  # INT8 still classifies the samples
    by_id = results(agent)
    assert by_id["onnx-int8"]["status"] == "served"
    assert by_id["onnx-fp32"]["status"] == by_id["tflite-fp32"]["status"] == "skipped"
    assert model.selection is not None and model.selection.reason == "pinned by model.variant"
    assert measuring(caplog) == [] and selected(agent) == []


def test_a_pinned_variant_the_bundle_lacks_is_refused_and_the_model_kept(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, built: Path, tmp: Path
) -> None:
    bundle = variant_bundle(sample_parts, demo_key, built, label="pinmiss")
    agent = make_agent(tmp, model={"variant": "tflite-int8"})
    # The legacy sample's variants are "onnx" and "tflite": pinning another id keeps it off.
    with pytest.raises(VariantMissingError):
        agent.admission.install(SAMPLE_BUNDLE)
    agent = make_agent(tmp / "b")
    agent.admission.install(SAMPLE_BUNDLE)
    agent.admission.config = dataclasses.replace(
        agent.config, model=dataclasses.replace(agent.config.model, variant="tflite-int8")
    )
    with pytest.raises(VariantMissingError, match="model.variant pins 'tflite-int8'") as info:
        agent.admission.install(bundle)
    assert info.value.code == "bundle.variant_missing"
    assert "onnx-fp32, onnx-int8, tflite-fp32" in str(info.value)
    assert served(agent) == "1.0.0"


def test_a_legacy_bundle_keeps_the_preference_rule_and_may_pin_a_format(tmp: Path) -> None:
    agent = make_agent(tmp)
    agent.admission.install(SAMPLE_BUNDLE)
    model = agent.host.model
    assert model is not None and model.runtime_name == "onnxruntime"
    assert model.variant is not None and model.variant.id == "onnx" and model.variant.legacy
    assert model.selection is not None and "no variants" in model.selection.reason
    assert selected(agent) == []
    pinned = make_agent(tmp / "pinned", model={"variant": "tflite"})
    pinned.admission.install(SAMPLE_BUNDLE)
    assert pinned.host.model is not None and pinned.host.model.runtime_name == "litert"


def test_variants_no_runtime_here_loads_are_skipped_or_failed_with_the_reason(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, built: Path, tmp: Path
) -> None:
    bundle = variant_bundle(sample_parts, demo_key, built, garbage=("onnx-int8",), label="junk")
    agent = make_agent(tmp, model={"preference": ["onnxruntime"]})
    agent.admission.install(bundle)
    model = agent.host.model
    assert model is not None and model.variant is not None and model.variant.id == "onnx-fp32"
    by_id = results(agent)
    assert by_id["tflite-fp32"]["status"] == "skipped"
    assert by_id["tflite-fp32"]["reason"] == (
        "no runtime in model.preference (onnxruntime) reads tflite"
    )
    assert by_id["onnx-int8"]["status"] == "failed"
    assert by_id["onnx-int8"]["code"] == "ModelLoadError"
    assert "onnxruntime refused model.onnx" in by_id["onnx-int8"]["reason"]
    assert by_id["onnx-fp32"]["status"] == "served"


def test_the_choice_is_cached_across_restarts_and_measured_again_when_a_key_changes(
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
    built: Path,
    tmp: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle = variant_bundle(sample_parts, demo_key, built, include=("onnx-fp32", "onnx-int8"),
                            label="cache")  # fmt: skip
    caplog.set_level(logging.INFO, logger="agent.variants.select")
    first = make_agent(tmp)
    first.admission.install(bundle)
    chosen = first.host.model.variant.id  # type: ignore[union-attr]
    assert len(measuring(caplog)) == 2 and selected(first)[0]["measured"] == 2
    assert (tmp / "state" / FILENAME).exists()

    def restart() -> Agent:
        caplog.clear()
        agent = make_agent(tmp)
        agent.admission.serve_current()
        return agent

    # A restart opens only the cached choice (fully validated) and measures nothing.
    again = restart()
    assert measuring(caplog) == []
    event = selected(again)
    assert event[0]["cached"] is True and event[0]["measured"] == 0
    assert event[0]["variant"] == chosen
    assert again.host.model is not None and again.host.model.variant.id == chosen  # type: ignore[union-attr]
    assert again.status()["model"]["selection"]["cached"] is True
    assert served(again) == "1.1.0"

    # Another runtime version: measured again (and then cached under the new key).
    again = make_agent(tmp)
    real_identity = again.admission.selector.runtime_identity
    again.admission.selector.runtime_identity = lambda name, configs: {
        **real_identity(name, configs), "version": "0.0-other"}  # fmt: skip
    caplog.clear()
    again.admission.serve_current()
    assert len(measuring(caplog)) == 2 and selected(again)[0]["cached"] is False

    # Other hardware (a CPU without the flags the choice was made on): measured again.
    again = make_agent(tmp)
    again.admission.selector.hardware = lambda: {"machine": "aarch64", "cpu": "Cortex-A76"}
    caplog.clear()
    again.admission.serve_current()
    assert len(measuring(caplog)) == 2

    # A corrupt cache file: measured again, and the file is rewritten whole.
    (tmp / "state" / FILENAME).write_text('{"schema": "edgerun.variant-choice/1", "entr')
    again = restart()
    assert len(measuring(caplog)) == 2
    assert json.loads((tmp / "state" / FILENAME).read_text())["entries"]
    again = restart()
    assert measuring(caplog) == []

    # A well-formed file whose record holds a wrong-typed field: measured again, no crash.
    doc = json.loads((tmp / "state" / FILENAME).read_text())
    for record in doc["entries"].values():
        record["batch"] = "many"
    (tmp / "state" / FILENAME).write_text(json.dumps(doc))
    again = restart()
    assert len(measuring(caplog)) == 2 and served(again) == "1.1.0"

    # A new bundle (another sha256, same variants): measured again.
    newer = variant_bundle(sample_parts, demo_key, built, "1.2.0",
                           include=("onnx-fp32", "onnx-int8"), label="cache")  # fmt: skip
    caplog.clear()
    again.admission.install(newer)
    assert len(measuring(caplog)) == 2 and served(again) == "1.2.0"


def test_a_variant_over_the_memory_cap_is_rejected_before_it_loads(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, built: Path, tmp: Path
) -> None:
    # The INT8 variant claims more than the cap: refused before it is loaded, the
    # float one serves; were it the only one, the refusal would be memory's own.
    bundle = variant_bundle(sample_parts, demo_key, built, include=("onnx-fp32", "onnx-int8"),
                            peak={"onnx-int8": {"onnxruntime": 4096.0}}, label="mem")  # fmt: skip
    agent = make_agent(tmp, memory={"max_mb": 2048})
    agent.admission.install(bundle)
    by_id = results(agent)
    assert by_id["onnx-int8"]["status"] == "failed"
    assert by_id["onnx-int8"]["code"] == "memory.refused"
    assert "variant onnx-int8" in by_id["onnx-int8"]["reason"]
    assert by_id["onnx-fp32"]["status"] == "served"
    alone = variant_bundle(sample_parts, demo_key, built, include=("onnx-int8",),
                           peak={"onnx-int8": {"onnxruntime": 4096.0}}, label="memalone")  # fmt: skip
    other = make_agent(tmp / "alone", memory={"max_mb": 2048})
    with pytest.raises(AdmissionError):
        other.admission.install(alone)
    assert other.host.model is None


def test_a_real_agent_explains_its_choice_in_status_and_does_not_measure_again_on_restart(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, built: Path, tmp: Path
) -> None:
    bundle = variant_bundle(sample_parts, demo_key, built, wrong=("onnx-int8",), label="proc")
    config = base_config(tmp, bundle=bundle)
    with running_agent(tmp, config) as agent:
        with agent.client() as client:
            status = client.get_json("/v2/edgerun/status")
        first = agent.output()
    selection = status["model"]["selection"]
    assert status["model"]["variant"] == selection["chosen"] != "onnx-int8"
    assert selection["cached"] is False and selection["batch"] == 1
    by_id = {v["id"]: v for v in selection["variants"]}
    assert by_id["onnx-int8"]["status"] == "failed"
    assert "golden cases do not reproduce" in by_id["onnx-int8"]["reason"]
    assert all(by_id[k]["p50_ms"] > 0 for k in ("onnx-fp32", "tflite-fp32"))
    assert first.count("measuring variant") == 3
    # The same bundle on the same machine: served from `current` with the cached choice.
    with running_agent(tmp, config) as agent:
        with agent.client() as client:
            again = client.get_json("/v2/edgerun/status")["model"]["selection"]
        second = agent.output()
    assert second.count("measuring variant") == 0, second[-3000:]
    assert again["cached"] is True and again["chosen"] == selection["chosen"]
    assert "Traceback" not in first + second


def test_the_hardware_fingerprint_follows_the_cpu_flags() -> None:
    from agent.variants.fingerprint import cpu_identity, hardware

    text = Path("/proc/cpuinfo").read_text()  # this machine's, as the agent reads it
    here = cpu_identity(text)
    assert here["cpu"] and len(here["cpu_flags"]) == 16
    assert hardware()["cpu_flags"] == here["cpu_flags"]
    # The same CPU without one of its flags (as a VNNI-less sibling would be): another key.
    key = next(k for k in ("flags", "Features") if f"\n{k}" in "\n" + text)
    line = next(x for x in text.splitlines() if x.startswith(key))
    dropped = text.replace(line, line.rsplit(" ", 1)[0])
    assert cpu_identity(dropped)["cpu_flags"] != here["cpu_flags"]
    assert cpu_identity(dropped)["cpu"] == here["cpu"]

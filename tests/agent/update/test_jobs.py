"""The update job on a real store, real onnxruntime sessions, real bundles."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.update import RollbackRequest
from agent.service import Agent
from agent.update.errors import UpdateCode, UpdateError
from tests.agent.update.support import (
    LocalFetcher,
    ScriptedShadow,
    ScriptedTrial,
    request_for,
    served,
    started,
)
from tests.helpers import SampleParts, make_bundle


def run(agent: Agent, request: Any) -> dict[str, Any]:
    reply = agent.updates.deploy(request)
    assert reply["accepted"] is True
    assert agent.updates.join(120)
    job = agent.updates.status()["job"]
    assert job["id"] == reply["job"]
    return job


def kinds(agent: Agent) -> list[str]:
    return [e.kind for e in agent.events.recent if e.kind.startswith("update.")]


def journal(agent: Agent) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((agent.config.state_dir / "update.json").read_text())
    return data


def test_a_good_deploy_runs_every_phase_and_commits(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    job = run(agent, request_for(bundle, "1.1.0"))
    assert job["phase"] == "committed", job
    assert served(agent) == "1.1.0"
    assert kinds(agent) == [
        "update.accepted", "update.downloading", "update.verifying", "update.validating",
        "update.swapping", "update.trial", "update.committed",
    ]  # fmt: skip
    figures = job["figures"]
    assert figures["bytes"] == bundle.stat().st_size and figures["mode"] == "hot"
    assert figures["latency_p50_ms"] > 0 and figures["latency_budget_ms"] > 0
    assert figures["golden_max_diff"] is not None
    store = agent.store
    assert store.manifest(store.previous()).version == "1.0.0"  # type: ignore[arg-type]
    assert journal(agent)["job"]["phase"] == "committed"
    assert list((agent.config.state_dir / "incoming").iterdir()) == []
    snapshot = agent.updates.snapshot()
    assert snapshot is not None and snapshot.model is not None
    assert snapshot.model.version == "1.1.0" and snapshot.final


def test_refusals_at_accept_name_the_value_and_keep_the_model(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp, bundle_limits={"max_bundle_mb": 1})
    same = make_bundle(sample_parts, tmp / "same.edgebundle", demo_key, version="1.0.0")
    with pytest.raises(UpdateError) as info:
        agent.updates.deploy(request_for(same, "1.0.0"))
    assert info.value.code == UpdateCode.NOT_NEWER and "1.0.0" in info.value.message
    big = request_for(same, "2.0.0")
    big = type(big)(**{**big.__dict__, "size": 5 << 20})
    with pytest.raises(UpdateError) as info:
        agent.updates.deploy(big)
    assert info.value.code == UpdateCode.BAD_ARGS
    assert "bundle_limits.max_bundle_mb" in info.value.message
    with pytest.raises(UpdateError) as info:
        agent.updates.deploy(request_for(same, "2.0.0", shadow=True, mode="cold"))
    assert info.value.code == UpdateCode.BAD_ARGS and "cold" in info.value.message
    assert served(agent) == "1.0.0"
    assert not agent.updates.running


def test_no_disk_space_is_refused_with_figures(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp, update={"reserve_disk_mb": 1 << 20})  # a TiB kept free
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    with pytest.raises(UpdateError) as info:
        agent.updates.deploy(request_for(bundle, "1.1.0"))
    assert info.value.code == UpdateCode.NO_SPACE
    assert "update.reserve_disk_mb" in info.value.message
    assert info.value.data["need_mb"] > info.value.data["free_mb"]
    assert served(agent) == "1.0.0"


def test_busy_then_cancel_during_download(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    LocalFetcher.gate, LocalFetcher.reached = threading.Event(), threading.Event()
    try:
        reply = agent.updates.deploy(request_for(bundle, "1.1.0"))
        assert LocalFetcher.reached.wait(30)
        assert served(agent) == "1.0.0"  # serving goes on while the job runs
        with pytest.raises(UpdateError) as info:
            agent.updates.deploy(request_for(bundle, "1.1.0"))
        assert info.value.code == UpdateCode.BUSY and reply["job"] in info.value.message
        assert journal(agent)["job"]["phase"] == "downloading"
        assert agent.updates.cancel()["job"] == reply["job"]
        assert agent.updates.join(30)
    finally:
        LocalFetcher.gate = LocalFetcher.reached = None
    job = agent.updates.status()["job"]
    assert job["phase"] == "cancelled" and job["code"] == UpdateCode.CANCELLED
    assert served(agent) == "1.0.0"
    assert list((agent.config.state_dir / "incoming").iterdir()) == []
    with pytest.raises(UpdateError) as info:
        agent.updates.cancel()
    assert info.value.code == UpdateCode.NOTHING_TO_CANCEL


def test_hash_mismatch_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    request = request_for(bundle, "1.1.0")
    request = type(request)(**{**request.__dict__, "sha256": "0" * 64})
    job = run(agent, request)
    assert job["phase"] == "failed" and job["code"] == UpdateCode.HASH_MISMATCH
    assert served(agent) == "1.0.0"


def test_untrusted_bundle_is_refused_with_its_bundle_code(
    sample_parts: SampleParts, other_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", other_key, version="1.1.0")
    job = run(agent, request_for(bundle, "1.1.0"))
    assert job["phase"] == "failed" and job["code"] == UpdateCode.BUNDLE_REFUSED
    assert job["figures"]["bundle_code"] == "bundle.untrusted_signer"
    assert served(agent) == "1.0.0"
    assert len(list(agent.store.bundles.iterdir())) == 1  # nothing left of the candidate


def test_signed_version_must_match_the_deploy(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    job = run(agent, request_for(bundle, "9.0.0"))
    assert job["code"] == UpdateCode.BUNDLE_REFUSED
    assert "1.1.0" in job["reason"] and "9.0.0" in job["reason"]
    assert served(agent) == "1.0.0"


def test_golden_mismatch_fails_validation(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    with np.load(sample_parts.directory / "golden/outputs-onnx.npz") as data:
        logits = data["logits"] + 0.5
    np.savez(tmp / "outputs-onnx.npz", logits=logits)
    files = {**sample_parts.files(), "golden/outputs-onnx.npz": tmp / "outputs-onnx.npz"}
    bundle = make_bundle(sample_parts, tmp / "g.edgebundle", demo_key, files=files, version="1.2.0")
    job = run(agent, request_for(bundle, "1.2.0"))
    assert job["code"] == UpdateCode.VALIDATION_FAILED
    assert job["figures"]["detail_code"] == "bundle.golden_mismatch"
    assert served(agent) == "1.0.0"


def test_latency_over_the_budget_fails_validation(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp, update={"latency_ratio": 1.0, "latency_slack_ms": 0.0})
    figures = dict(sample_parts.manifest["figures"])
    figures["latency_ms"] = {"onnxruntime": {"batch": 1, "p50": 1e-9}}
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0",
                         figures=figures)  # fmt: skip
    job = run(agent, request_for(bundle, "1.1.0"))
    assert job["code"] == UpdateCode.VALIDATION_FAILED and job["figures"]["check"] == "latency"
    assert "update.latency_ratio" in job["reason"]
    assert job["figures"]["latency_p50_ms"] > job["figures"]["latency_budget_ms"]
    assert served(agent) == "1.0.0"


def test_shadow_disagreement_blocks_promotion(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    agent.updates.shadow = shadow = ScriptedShadow(agreement=0.5)
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    job = run(agent, request_for(bundle, "1.1.0", shadow={"min_agreement": 0.9}))
    assert shadow.seen == ["1.1.0"]
    assert job["code"] == UpdateCode.SHADOW_DISAGREED and job["figures"]["agreement"] == 0.5
    assert "update.shadow" in kinds(agent) and "update.swapping" not in kinds(agent)
    assert served(agent) == "1.0.0"


def test_trial_breach_rolls_back_marks_bad_and_refuses_a_retry(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    trial = ScriptedTrial(agent, breach="error rate 0.5 over 0.02")
    agent.updates.trial = trial
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    job = run(agent, request_for(bundle, "1.1.0", trial={"window_s": 0.1}))
    assert trial.requests >= 3 and trial.generations == [2]  # it served, then went back
    assert job["phase"] == "rolled_back" and job["code"] == UpdateCode.TRIAL_FAILED
    assert "error rate" in job["reason"] and job["figures"]["rollback_s"] >= 0
    assert served(agent) == "1.0.0"
    assert agent.store.manifest(agent.store.current()).version == "1.0.0"  # type: ignore[arg-type]
    with pytest.raises(UpdateError) as info:
        agent.updates.deploy(request_for(bundle, "1.1.0"))
    assert info.value.code == UpdateCode.MARKED_BAD
    trial.breach = None
    job = run(agent, request_for(bundle, "1.1.0", force=True, trial={"window_s": 0.1}))
    assert job["phase"] == "committed" and served(agent) == "1.1.0"


def test_cold_swap_and_rollback_commands(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    job = run(agent, request_for(bundle, "1.1.0", mode="cold"))
    assert job["phase"] == "committed" and job["mode"] == "cold"
    assert served(agent) == "1.1.0"
    reply = agent.updates.rollback(RollbackRequest())
    assert reply["version"] == "1.0.0" and agent.updates.join(60)
    assert agent.updates.status()["job"]["phase"] == "rolled_back"
    assert served(agent) == "1.0.0"
    assert agent.store.manifest(agent.store.previous()).version == "1.1.0"  # type: ignore[arg-type]
    with pytest.raises(UpdateError) as info:
        agent.updates.rollback(RollbackRequest(version="0.9.0"))
    assert info.value.code == UpdateCode.NO_SUCH_VERSION and "1.1.0" in info.value.message
    agent.updates.rollback(RollbackRequest(version="1.1.0"))
    assert agent.updates.join(60) and served(agent) == "1.1.0"


def test_a_deploy_sent_on_the_final_event_is_accepted(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    v2 = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    v3 = make_bundle(sample_parts, tmp / "v3.edgebundle", demo_key, version="1.2.0")
    replies: list[Any] = []

    def on_event(event: Any) -> None:
        # Runs on the job thread, as the link's forwarding of the event does: the
        # console that sees the final event may send the next deploy at once.
        if event.kind == "update.committed" and event.data.get("version") == "1.1.0":
            try:
                replies.append(agent.updates.deploy(request_for(v3, "1.2.0")))
            except UpdateError as exc:
                replies.append(exc.code)

    agent.events.subscribe(on_event)
    agent.updates.deploy(request_for(v2, "1.1.0"))
    assert agent.updates.join(120) and served(agent) == "1.2.0"
    assert len(replies) == 1 and isinstance(replies[0], dict), replies


def test_a_candidate_that_does_not_fit_even_alone_is_refused_without_a_cold_swap(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    figures = dict(sample_parts.manifest["figures"])
    figures["peak_memory_mb"] = {"onnxruntime": 1_000_000.0, "litert": 1_000_000.0}
    bundle = make_bundle(sample_parts, tmp / "huge.edgebundle", demo_key, version="1.1.0",
                         figures=figures)  # fmt: skip
    generation = agent.host.generation
    job = run(agent, request_for(bundle, "1.1.0"))
    assert job["code"] == UpdateCode.VALIDATION_FAILED and job["figures"]["check"] == "memory"
    assert "even alone" in job["reason"]
    assert agent.host.generation == generation  # never released for a cold swap
    assert served(agent) == "1.0.0"

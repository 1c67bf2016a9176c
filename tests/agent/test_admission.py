"""From bundle file to served model: every refusal keeps the current model serving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import HashMismatchError, UntrustedSignerError, VersionNotNewerError
from agent.config.loader import parse_config
from agent.golden import GoldenMismatchError
from agent.memory import AdmissionError
from agent.service import Agent
from agent.store import Store
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE, SampleParts, make_bundle, samples


def make_agent(tmp: Path, **sections: dict[str, object]) -> Agent:
    data: dict[str, object] = {
        "state_dir": str(tmp / "state"),
        "trust": {"public_keys": [str(DEMO_PUB)]},
        "api": {"socket": str(tmp / "api.sock")},
    }
    data.update(sections)
    return Agent(parse_config(data, {}))


def served(agent: Agent) -> str:
    model = agent.host.model
    assert model is not None
    images, labels = samples()
    _, out = agent.host.infer("digits", {"input": images})
    assert (out["logits"].argmax(1) == labels).mean() >= 0.9
    return model.manifest.version


def test_install_newer_swaps_and_keeps_previous(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = make_agent(tmp)
    agent.admission.install(SAMPLE_BUNDLE)
    assert served(agent) == "1.0.0"
    v2 = make_bundle(sample_parts, tmp / "d-2.edgebundle", demo_key, version="1.1.0")
    agent.admission.install(v2)
    assert served(agent) == "1.1.0"
    store = agent.store
    assert store.current() is not None and store.previous() is not None
    assert store.manifest(store.current()).version == "1.1.0"  # type: ignore[arg-type]
    assert store.manifest(store.previous()).version == "1.0.0"  # type: ignore[arg-type]
    kinds = [e.kind for e in agent.events.recent]
    assert kinds == ["model.loaded", "model.swapped"]


def test_older_or_equal_version_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = make_agent(tmp)
    v2 = make_bundle(sample_parts, tmp / "d-2.edgebundle", demo_key, version="2.0.0")
    agent.admission.install(v2)
    for i, version in enumerate(("1.9.9", "2.0.0", "2.0.0-rc1")):
        other = make_bundle(
            sample_parts,
            tmp / f"d-{version}.edgebundle",
            demo_key,
            version=version,
            created=f"2026-01-0{i + 1}T00:00:00Z",  # another build, not the same bytes
        )
        with pytest.raises(
            VersionNotNewerError, match=f"{version} is not newer than the running 2.0.0"
        ):
            agent.admission.install(other)
        assert served(agent) == "2.0.0"
    # An explicit rollback may go back.
    agent.admission.install(SAMPLE_BUNDLE, allow_downgrade=True)
    assert served(agent) == "1.0.0"
    refused = [e for e in agent.events.recent if e.kind == "model.refused"]
    assert len(refused) == 3 and refused[0].data["code"] == "bundle.version_not_newer"
    # Refused bundles are not left on disk.
    assert len(list((tmp / "state" / "bundles").iterdir())) == 2


def test_untrusted_and_tampered_bundles_are_refused_and_service_continues(
    sample_parts: SampleParts, other_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = make_agent(tmp)
    agent.admission.install(SAMPLE_BUNDLE)
    foreign = make_bundle(sample_parts, tmp / "f.edgebundle", other_key, version="3.0.0")
    with pytest.raises(UntrustedSignerError):
        agent.admission.install(foreign)
    assert served(agent) == "1.0.0"
    data = bytearray(SAMPLE_BUNDLE.read_bytes())
    model = (sample_parts.directory / "model.onnx").read_bytes()
    idx = data.find(model)
    assert idx > 0
    data[idx + len(model) // 2] ^= 0xFF  # one bit-rotted byte in the model
    bad = tmp / "tampered.edgebundle"
    bad.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError):
        agent.admission.install(bad)
    assert served(agent) == "1.0.0"


def test_golden_mismatch_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = make_agent(tmp)
    agent.admission.install(SAMPLE_BUNDLE)
    with np.load(sample_parts.directory / "golden/outputs-onnx.npz") as data:
        logits = data["logits"] + 0.5  # as if built from another model
    np.savez(tmp / "outputs-onnx.npz", logits=logits)
    files = {**sample_parts.files(), "golden/outputs-onnx.npz": tmp / "outputs-onnx.npz"}
    bad = make_bundle(sample_parts, tmp / "g.edgebundle", demo_key, files=files, version="1.2.0")
    with pytest.raises(
        GoldenMismatchError, match=r"logits: max abs diff 0.5 exceeds the cpu bound"
    ):
        agent.admission.install(bad)
    assert served(agent) == "1.0.0"


def test_memory_refusal_keeps_the_current_model(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = make_agent(tmp, memory={"max_mb": 4096})
    agent.admission.install(SAMPLE_BUNDLE)
    figures = dict(sample_parts.manifest["figures"])
    figures["peak_memory_mb"] = {"onnxruntime": 5000.0, "litert": 5000.0}
    big = make_bundle(
        sample_parts, tmp / "big.edgebundle", demo_key, version="1.3.0", figures=figures
    )
    with pytest.raises(
        AdmissionError, match=r"needs 5000.0 MB .* above the memory cap of 4096.0 MB"
    ):
        agent.admission.install(big)
    assert served(agent) == "1.0.0"
    assert agent.events.recent[-1].data["code"] == "memory.refused"


def test_litert_is_chosen_when_configured(tmp: Path) -> None:
    agent = make_agent(tmp, model={"runtime": "litert"}, runtimes={"litert": {"threads": 2}})
    model = agent.admission.install(SAMPLE_BUNDLE)
    assert model.runtime_name == "litert" and model.runtime.describe()["threads"] == 2
    assert served(agent) == "1.0.0"
    assert set(model.golden_diffs) == {"logits"} and model.golden_diffs["logits"] < 1e-3


def test_restart_serves_current_and_falls_back_to_previous(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = make_agent(tmp)
    agent.admission.install(SAMPLE_BUNDLE)
    agent.admission.install(
        make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="2.0.0")
    )
    # A fresh agent (restart) serves what `current` points at without any bundle configured.
    again = make_agent(tmp)
    assert again.admission.serve_current() is not None and served(again) == "2.0.0"
    # Break the current bundle on disk: the next start rolls back to previous by itself.
    current = again.store.current()
    assert current is not None
    os.chmod(current, 0o755)
    model_file = current / "model.onnx"
    os.chmod(model_file, 0o644)
    model_file.write_bytes(b"garbage")
    third = make_agent(tmp)
    assert third.admission.serve_current() is not None and served(third) == "1.0.0"
    assert [e.kind for e in third.events.recent] == [
        "model.refused",
        "model.rolled_back",
        "model.loaded",
    ]
    assert third.store.manifest(third.store.current()).version == "1.0.0"  # type: ignore[arg-type]


def test_interrupted_unpack_and_link_swap_leave_current_intact(tmp: Path) -> None:
    agent = make_agent(tmp)
    agent.admission.install(SAMPLE_BUNDLE)
    state = tmp / "state"
    # What a power cut mid-install leaves: a half-written unpack dir and a dangling temp link.
    (state / "bundles" / ".unpack-abc").mkdir()
    (state / "bundles" / ".unpack-abc" / "model.onnx").write_bytes(b"half")
    os.symlink("bundles/nowhere", state / ".current.tmp")
    store = Store(state)
    assert not (state / "bundles" / ".unpack-abc").exists()
    assert not (state / ".current.tmp").is_symlink()
    current = store.current()
    assert current is not None and store.manifest(current).version == "1.0.0"


def test_requests_in_flight_during_a_swap_finish_on_the_old_model(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    import threading

    agent = make_agent(tmp)
    old = agent.admission.install(SAMPLE_BUNDLE)
    v2 = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="2.0.0")
    images, labels = samples()
    # Hold one request inside the old model's runtime call while the swap happens.
    entered, release = threading.Event(), threading.Event()
    real_run = old.runtime.run

    def slow_run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entered.set()
        release.wait(30)
        return real_run(feeds)

    old.runtime.run = slow_run  # type: ignore[method-assign]
    result: dict[str, object] = {}

    def request() -> None:
        try:
            result["out"] = agent.host.infer("digits", {"input": images})
        except Exception as exc:  # recorded for the assertion below
            result["error"] = exc

    t = threading.Thread(target=request)
    t.start()
    assert entered.wait(30)
    agent.admission.install(v2)
    assert served(agent) == "2.0.0"  # new requests already go to the new model
    release.set()
    t.join(timeout=30)
    assert "error" not in result, result.get("error")
    model, out = result["out"]  # type: ignore[misc]
    assert model.manifest.version == "1.0.0"
    assert (out["logits"].argmax(1) == labels).mean() >= 0.9

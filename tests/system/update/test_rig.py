"""The update rig's own parts do what the update tests rely on (real sockets, real files)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.bundle import unpack_bundle
from agent.bundle_errors import BundleError
from agent.signing import load_public_key
from tests.helpers import DEMO_PUB, samples
from tests.mqtt_broker import make_pki
from tests.update_rig import (
    LIVE_MARK,
    Bundles,
    BundleServer,
    Load,
    Rig,
    live_inputs,
    served_version,
)


def _get(url: str, ctx: ssl.SSLContext, rng: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Range": rng} if rng else {})
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        return resp.status, resp.read()


def test_bundle_server_serves_ranges_cuts_and_oversize_over_tls(tmp: Path) -> None:
    pki = make_pki(tmp / "pki")
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    server = BundleServer(pki)
    try:
        data = bytes(range(256)) * 400
        whole = server.add("/b", data)
        assert whole.startswith("https://localhost:")
        assert _get(whole, ctx) == (200, data)
        assert _get(whole, ctx, "bytes=1000-") == (206, data[1000:])
        cut = server.add("/cut", data, cut_after=5000)
        import http.client

        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            _get(cut, ctx)
        assert _get(cut, ctx, "bytes=5000-") == (206, data[5000:])  # a cut happens once
        more = server.add("/more", data, extra=777, lie=True)
        with urllib.request.urlopen(more, context=ctx, timeout=30) as resp:
            assert resp.headers["Content-Length"] == str(len(data))
            # What a careless reader would take: everything until the server closes.
            raw = resp.fp.read(len(data) + 777) if resp.fp else b""
        assert len(raw) >= len(data)
        server.add("/gone", data, status=503)
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(server.url("/gone"), ctx)
        assert err.value.code == 503
        assert [r.range for r in server.requests("/b")] == [None, "bytes=1000-"]
    finally:
        server.close()


def _run(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def _unpack(release_path: Path, dest: Path) -> Path:
    unpack_bundle(release_path, dest, [load_public_key(DEMO_PUB)])
    return dest


def test_bundle_variants_are_what_they_claim(bundles: Bundles, tmp: Path) -> None:
    good = bundles.good("1.1.0")
    assert json.loads((_unpack(good.path, tmp / "g") / "manifest.json").read_text())["version"] == (
        "1.1.0"
    )
    with pytest.raises(BundleError):
        unpack_bundle(bundles.bad_signature("1.2.0").path, tmp / "s", [load_public_key(DEMO_PUB)])
    golden_in = np.load(tmp / "g/golden/inputs.npz")["input"]
    expect = np.load(tmp / "g/golden/outputs-onnx.npz")["logits"]
    # Golden mismatch: the model answers the sample's outputs, the bundle claims others.
    off = _unpack(bundles.golden_mismatch("1.3.0").path, tmp / "o")
    claimed = np.load(off / "golden/outputs-onnx.npz")["logits"]
    got = _run(off / "model.onnx", golden_in)
    assert np.allclose(got, expect, atol=1e-3) and not np.allclose(got, claimed, atol=0.5)
    # NaN on live rows only: golden cases pass, live rows (LIVE_MARK) are NaN.
    nan = _unpack(bundles.nan_on_live("1.4.0").path, tmp / "n")
    assert np.allclose(_run(nan / "model.onnx", golden_in), expect, atol=1e-3)
    assert np.isnan(_run(nan / "model.onnx", live_inputs(3))).all()
    assert live_inputs(1)[0, 0, 0, 0] == LIVE_MARK and samples()[0].max() < 100
    # Fat: the same answers at a small width (the default is sized against a memory cap).
    fat = _unpack(bundles.fat("1.5.0", width=64).path, tmp / "f")
    assert np.allclose(_run(fat / "model.onnx", golden_in), expect, atol=1e-3)


def test_agent_console_and_steady_load(rig: Rig) -> None:
    agent = rig.start_agent()
    # Mutual TLS + ACL broker: the signed ping is answered on the console's reply topic.
    reply = rig.console.request("ping")
    assert reply["ok"] is True, reply
    state = rig.console.wait_state(lambda s: s.get("model", {}).get("version") == "1.0.0")
    assert state["device_id"] == "update-dev"
    with Load(agent.socket, clients=4) as load:
        load.wait_requests(200)
    report = load.report
    assert report.failures == 0, report.failed
    assert report.ok >= 200 and report.nonfinite == 0
    assert set(report.versions) == {"1.0.0"}
    assert served_version(agent) == "1.0.0"
    # Live rows are answered by the sample model with finite scores.
    with Load(agent.socket, clients=1, live=True) as live:
        live.wait_requests(20)
    assert live.report.failures == 0 and live.report.nonfinite == 0


def test_permuted_variant_validates_but_names_other_classes(bundles: Bundles, tmp: Path) -> None:
    perm = _unpack(bundles.permuted("1.6.0").path, tmp / "p")
    golden_in = np.load(perm / "golden/inputs.npz")["input"]
    claimed = np.load(perm / "golden/outputs-onnx.npz")["logits"]
    got = _run(perm / "model.onnx", golden_in)
    assert np.allclose(got, claimed, atol=1e-3)
    x, labels = samples()
    assert (_run(perm / "model.onnx", np.asarray(x, np.float32)).argmax(1) != labels).all()

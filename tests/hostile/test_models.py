"""The models corpus: hostile tensors, manifests and packaging flags for a model whose
batch is on axis 1 and which has a 0-d input; every case refused with its code, and
the agent still answers like onnxruntime afterwards."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

from tests.helpers import base_config, running_agent
from tests.hostile import failures
from tests.hostile.models import (
    CLASSES,
    MAX_BATCH,
    good_feeds,
    manifest_cases,
    package_cases,
    request_cases,
    run_manifests,
    run_package,
    run_requests,
    silero_bundle,
)
from tests.real_models import real_model
from tests.tolerance import assert_close


def test_corpus_covers_every_class(tmp_path: Path) -> None:
    per_class = Counter(c.klass for c, _ in request_cases())
    per_class.update(c.klass for c, _, _ in manifest_cases())
    per_class.update(c.klass for c, _ in package_cases(tmp_path))
    assert set(per_class) == set(CLASSES), per_class
    assert sum(per_class.values()) >= 70, per_class
    names = [c.name for c, _ in request_cases()] + [c.name for c, _, _ in manifest_cases()]
    names += [c.name for c, _ in package_cases(tmp_path)]
    assert len(names) == len(set(names))


def test_every_hostile_case_is_refused_and_the_agent_keeps_serving() -> None:
    import onnxruntime as ort

    workdir = Path(tempfile.mkdtemp(prefix="er-hmod-", dir="/tmp"))
    bundle = silero_bundle(workdir)
    outcomes = run_manifests(bundle, workdir)
    onnx = real_model("silero_vad", workdir)
    outcomes += run_package(onnx, workdir)
    config = base_config(workdir, bundle=bundle, api=f"max_batch_size = {MAX_BATCH}")
    with running_agent(workdir, config) as agent:
        outcomes += run_requests(agent)
        assert failures(outcomes) == []
        assert agent.proc.poll() is None
        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        feeds = good_feeds(4, seed=9)
        with agent.client() as client:
            got = client.infer("silero-vad", feeds)
            status = client.get_json("/v2/edgerun/status")
        for name, want in zip(
            ["output", "stateN"], session.run(["output", "stateN"], feeds), strict=True
        ):
            assert_close(got[name], want, what=name)
        assert status["model"]["name"] == "silero-vad"
        # Refusals read nothing big: the agent's peak RSS stayed that of serving the model.
        rss = psutil.Process(agent.proc.pid).memory_info().rss / 2**20
        peak = max(o.peak_rss_mb or 0.0 for o in outcomes if o.case.klass == "models.request")
        assert peak < max(rss * 1.5, rss + 64), (peak, rss)
        assert "Traceback" not in agent.output()
    assert np.isfinite([o.seconds for o in outcomes]).all()

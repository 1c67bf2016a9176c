"""50 swaps in a row (deploy and rollback alternating): no model leaks per swap."""

from __future__ import annotations

from pathlib import Path

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.memory import release_free_memory
from agent.protocol.update import HttpSource, RollbackRequest
from tests.agent.update.heavy_model import make_heavy_bundle, rows
from tests.agent.update.support import LocalFetcher, make_agent, request_for

WARMUP = 10
SWAPS = 50
# A leaked session of the heavy model is 8+ MB of weights: 20 leaked deploys or 40
# leaked swaps are far above this; allocator noise on a loaded CI box stays well below.
MAX_GROWTH_MB = 60.0


def rss_mb() -> float:
    release_free_memory()
    return float(psutil.Process().memory_info().rss) / (1 << 20)


def test_fifty_swaps_do_not_grow_rss(demo_key: Ed25519PrivateKey, tmp: Path) -> None:
    agent = make_agent(tmp)
    agent.admission.install(make_heavy_bundle(tmp / "heavy", demo_key, "1.0.0"))
    agent.updates.add_fetcher(HttpSource, lambda request: LocalFetcher())
    bundle = make_heavy_bundle(tmp / "heavy", demo_key, "1.1.0")
    request = request_for(bundle, "1.1.0")
    base = 0.0
    for swap in range(SWAPS):
        if swap == WARMUP:
            base = rss_mb()
        if swap % 2 == 0:
            agent.updates.deploy(request)
            want = "1.1.0"
        else:
            agent.updates.rollback(RollbackRequest())
            want = "1.0.0"
        assert agent.updates.join(120)
        job = agent.updates.status()["job"]
        assert job["phase"] in ("committed", "rolled_back") and job["code"] is None, job
        served, out = agent.host.infer("heavy", {"input": rows(2)})
        assert served.manifest.version == want and out["out"].shape == (2, 4096)
    growth = rss_mb() - base
    print(f"RSS growth over {SWAPS - WARMUP} swaps after {WARMUP} warm-up: {growth:.1f} MB")
    assert growth < MAX_GROWTH_MB
    assert len(list(agent.store.bundles.iterdir())) == 2  # current + previous, nothing more

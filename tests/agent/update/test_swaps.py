"""50 swaps in a row (deploy and rollback alternating): no model leaks per swap."""

from __future__ import annotations

from pathlib import Path

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.memory import release_free_memory
from agent.protocol.update import RollbackRequest
from tests.agent.update.support import request_for, served, started
from tests.helpers import SampleParts, make_bundle

WARMUP = 10
SWAPS = 50
# A leaked model (session, arena, graph) per swap is several MB: 40 swaps of it would be
# far above this; allocator noise on a loaded CI box stays well below.
MAX_GROWTH_MB = 60.0


def rss_mb() -> float:
    release_free_memory()
    return float(psutil.Process().memory_info().rss) / (1 << 20)


def test_fifty_swaps_do_not_grow_rss(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
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
        assert served(agent) == want
    growth = rss_mb() - base
    print(f"RSS growth over {SWAPS - WARMUP} swaps after {WARMUP} warm-up: {growth:.1f} MB")
    assert growth < MAX_GROWTH_MB
    assert len(list(agent.store.bundles.iterdir())) == 2  # current + previous, nothing more

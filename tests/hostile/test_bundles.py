"""The hostile bundle corpus: every case refused with its code, nothing crashes or is lost."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bundle import remove_unpacked
from tests.hostile import Outcome, failures
from tests.hostile.bundles import CLASSES, run_corpus

# Judging a case may load an onnxruntime session (golden replay, ~20 MB); anything near
# the size the hostile headers claim (gigabytes) would mean a cap was not applied first.
MAX_RSS_GROWTH_MB = 150


@pytest.fixture(scope="module")
def outcomes() -> Iterator[list[Outcome]]:
    work = Path(tempfile.mkdtemp(prefix="er-", dir="/tmp"))
    try:
        yield run_corpus(work)
    finally:
        remove_unpacked(work)


def test_every_hostile_bundle_is_refused_with_its_code(outcomes: list[Outcome]) -> None:
    assert failures(outcomes) == []


def test_the_corpus_covers_every_class(outcomes: list[Outcome]) -> None:
    per_class = Counter(o.case.klass for o in outcomes)
    assert set(per_class) == set(CLASSES)
    processes = ("bundle.agent", "bundle.cli")
    assert sum(n for k, n in per_class.items() if k not in processes) >= 80
    assert all(n >= (5 if k in processes else 10) for k, n in per_class.items()), per_class


def test_a_real_agent_keeps_serving_its_model_through_them(outcomes: list[Outcome]) -> None:
    # Each bundle.agent outcome is ok only if the agent kept serving the sample 1.0.0
    # correctly, logged the reader's refusal, no traceback, and exited 0 on SIGTERM.
    agent = [o for o in outcomes if o.case.klass == "bundle.agent"]
    assert {o.case.name for o in agent} >= {
        "negative-base256-size",
        "junk-block-in-the-middle",
        "file-and-folder-same-prefix",
        "gnu-long-name-16MB",
        "listed-file-is-a-directory",
        "nested-100000-deep-signed",
        "npy-shape-1e12",
        "model-outputs-NaN",
        "build-metadata-not-newer",
        "name-cyrillic",
    }
    assert [o.describe() for o in agent if not o.ok] == []


def test_edge_agent_verify_refuses_them_with_their_codes(outcomes: list[Outcome]) -> None:
    # Exit 1, `REFUSED [code] ...` on stdout, no traceback: what a person at a shell sees.
    cli = [o for o in outcomes if o.case.klass == "bundle.cli"]
    assert len(cli) >= 5
    assert [o.describe() for o in cli if not o.ok] == []


def test_refusals_allocate_nothing_near_what_the_input_claims(outcomes: list[Outcome]) -> None:
    growth = {o.case.name: o.extra["rss_growth_mb"] for o in outcomes if "rss_growth_mb" in o.extra}
    assert growth, "RSS was not measured"
    worst = max(growth, key=lambda k: growth[k])
    assert growth[worst] < MAX_RSS_GROWTH_MB, f"{worst} grew RSS by {growth[worst]} MB"


def test_the_corpus_material_is_valid_until_made_hostile(tmp: Path) -> None:
    # Without this control every case could be refused for one trivial reason.
    from agent.signing import load_private_key
    from tests.helpers import DEMO_KEY, unpack_sample
    from tests.hostile.bundles import Material, install_version, replay_golden, verify

    out = tmp / "out"
    out.mkdir()
    m = Material(unpack_sample(tmp / "sample"), load_private_key(DEMO_KEY), out)
    path = m.bundle()
    assert verify(path).manifest.version == "1.0.1"
    install_version(path)
    replay_golden(path)

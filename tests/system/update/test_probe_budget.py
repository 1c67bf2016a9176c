"""A candidate whose validation probe alone would take RSS over the soft limit (one
row costs 32 MiB) is refused without shedding a live request: the footprint probes
use no more rows than the headroom under the soft limit holds (agent/footprint.py,
`budget_bytes`). Found by the end-to-end tests: before the fix, ~560 live requests
were shed as `overloaded` while the candidate was probed at 32 rows.
"""

from __future__ import annotations

from tests.system.update.test_refusals import Case, check_refusal, too_big
from tests.update_rig import Bundles, Rig


def test_a_candidate_whose_probe_exceeds_the_cap_is_refused_without_failing_requests(
    rig: Rig, bundles: Bundles
) -> None:
    check_refusal(rig, bundles, Case("too_big_for_the_cap", too_big, "update.validation_failed",
                                     agent="[memory]\nmax_mb = 300\n"))  # fmt: skip

"""The hostile-input corpus (issue 7) in one run: cases per class, refusals, worst figures.

Runs every area module of tests/hostile (each generates its cases and runs them
against the real component) and prints, per class, how many cases there were,
how many were refused with their expected code, the codes seen, the slowest
refusal and the highest RSS measured while judging a case. Exit status 1 if any
case was not refused as expected. Figures only; no timing is asserted.

    python bench/hostile.py [--only bundles,requests,...]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import hostile  # noqa: E402


def area_modules() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(hostile.__path__)
        if not m.name.startswith(("test_", "_"))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated area modules (default: all)")
    args = parser.parse_args()
    areas = args.only.split(",") if args.only else area_modules()
    outcomes: list[hostile.Outcome] = []
    for area in areas:
        module = importlib.import_module(f"tests.hostile.{area}")
        with tempfile.TemporaryDirectory(prefix=f"hostile-{area}-", dir="/tmp") as work:
            start = time.perf_counter()
            got = module.run_corpus(Path(work))
            print(f"{area}: {len(got)} cases in {time.perf_counter() - start:.1f} s", flush=True)
        outcomes += got

    by_class: dict[str, list[hostile.Outcome]] = defaultdict(list)
    for o in outcomes:
        by_class[o.case.klass].append(o)
    print()
    print("| class | cases | refused as expected | codes | slowest refusal | highest RSS |")
    print("|---|---|---|---|---|---|")
    for klass in sorted(by_class):
        group = by_class[klass]
        ok = sum(o.ok for o in group)
        codes = Counter(o.code or "ACCEPTED" for o in group)
        slow = max(group, key=lambda o: o.seconds)
        rss = [o for o in group if o.peak_rss_mb is not None]
        top = max(rss, key=lambda o: o.peak_rss_mb or 0.0) if rss else None
        code_text = ", ".join(f"{c} x{n}" for c, n in codes.most_common())
        rss_text = f"{top.peak_rss_mb:.1f} MB ({top.case.name})" if top else "n/a"
        print(
            f"| {klass} | {len(group)} | {ok} | {code_text} | "
            f"{slow.seconds * 1000:.1f} ms ({slow.case.name}) | {rss_text} |"
        )
    total_ok = sum(o.ok for o in outcomes)
    print(f"\nall classes: {len(outcomes)} cases, {total_ok} refused as expected")
    if outcomes:
        slow = max(outcomes, key=lambda o: o.seconds)
        print(f"slowest refusal: {slow.seconds * 1000:.1f} ms ({slow.case.klass}/{slow.case.name})")
        rss = [o for o in outcomes if o.peak_rss_mb is not None]
        if rss:
            top = max(rss, key=lambda o: o.peak_rss_mb or 0.0)
            print(
                f"highest RSS during a refusal: {top.peak_rss_mb:.1f} MB "
                f"({top.case.klass}/{top.case.name})"
            )
    bad = hostile.failures(outcomes)
    for line in bad:
        print("NOT REFUSED AS EXPECTED:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

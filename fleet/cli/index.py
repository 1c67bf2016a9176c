"""`edge-fleet index`: build and sign the release index devices pull updates from
(fleet/releases.py)."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from agent.bundle_errors import BundleError
from agent.signing import KeyFileError, load_private_key, load_public_key


def register(sub: Any) -> None:
    index = sub.add_parser("index", help="build and sign a release index (index.json)")
    index.add_argument("bundles", nargs="+", type=Path, help="bundle files to list")
    index.add_argument("--key", type=Path, required=True, help="ed25519 private key (PEM)")
    index.add_argument(
        "--trust",
        type=Path,
        action="append",
        default=[],
        help="public key the bundles must verify with",
    )
    index.add_argument("--base-url", required=True, help="where the bundles are served")
    index.add_argument("--out", type=Path, default=Path("index.json"))
    index.add_argument("--expires-days", type=float, default=30.0)
    index.add_argument("--counter", type=int, default=None, help="default: the old one + 1")
    index.add_argument("--min-agent-version", default=None)
    index.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Any) -> int:
    from fleet.releases import write_index

    try:
        key = load_private_key(args.key)
        trust = [load_public_key(p) for p in args.trust] or [key.public_key()]
        counter, releases = write_index(
            args.out,
            args.bundles,
            args.base_url,
            key,
            trust,
            timedelta(days=args.expires_days),
            counter=args.counter,
            min_agent_version=args.min_agent_version,
        )
    except (KeyFileError, BundleError, ValueError, OSError) as exc:
        print(f"edge-fleet index: {exc}", file=sys.stderr)
        return 2
    for r in releases:
        print(f"{r.name} {r.version} {r.sha256[:12]} {r.size} {r.url}")
    print(f"wrote {args.out} (counter {counter}, {len(releases)} releases)")
    return 0

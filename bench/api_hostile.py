"""The local API's answer rate while slow clients and a descriptor limit are applied.

A real agent (the sample model, default config but `api.head_timeout_s`) gets
`--slow` slowloris clients that each send one header line every `--drip` seconds and
reconnect as soon as the agent cuts them, while its RLIMIT_NOFILE is lowered to
`--fd-limits` in turn (as `LimitNOFILE=` would; 0 leaves it). A good client meanwhile asks
GET /v2/health/ready on a fresh connection every 50 ms. Printed: attempts, answers
(any HTTP answer, 200 or 503), 200s, p50/p90 latency of the 200s, peak threads.
Figures only; nothing here asserts a time. The same scenario without reconnecting
attackers is tests/hostile/test_requests.py::test_slow_clients_and_an_fd_limit_...
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import psutil
from _common import pct

from tests.helpers import base_config, running_agent
from tests.hostile.requests import siege


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slow", type=int, default=64)
    parser.add_argument(
        "--fd-limits", default="160,64", help="comma-separated RLIMIT_NOFILE values"
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--drip", type=float, default=3.0)
    parser.add_argument("--head-timeout", type=float, default=10.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="er-siege-", dir="/tmp"))
    config = base_config(tmp, api=f"head_timeout_s = {args.head_timeout}")
    with running_agent(tmp, config) as agent:
        before = psutil.Process(agent.proc.pid).num_fds()
        runs: list[tuple[str, int, int | None]] = [
            ("no attack", 0, None),
            (f"{args.slow} slow clients", args.slow, None),
        ]
        for limit in sorted((int(x) for x in args.fd_limits.split(",") if x), reverse=True):
            runs.append((f"{args.slow} slow clients + fd limit {limit}", args.slow, limit))
        for label, slow, limit in runs:
            r = siege(agent, slow=slow, fd_limit=limit, seconds=args.seconds, drip_s=args.drip)
            lat = r.latencies_ms or [float("nan")]
            print(
                f"{label:40s} attempted {r.attempted:4d}  answered {r.answered / max(r.attempted, 1):6.1%}"
                f"  served {r.served / max(r.attempted, 1):6.1%}  p50 {pct(lat, 50):7.2f} ms"
                f"  p90 {pct(lat, 90):7.2f} ms  slow cut {r.slow_cut:4d}  peak threads {r.peak_threads}"
                + (f"  unanswered: {dict(r.errors)}" if r.errors else "")
            )
        print(f"agent fds at start: {before}; alive after: {agent.proc.poll() is None}")
        log = agent.output()
        print(
            "EMFILE seen:",
            "Too many open files" in log,
            "| RSS watcher died:",
            "rss-watcher" in log,
        )


if __name__ == "__main__":
    main()

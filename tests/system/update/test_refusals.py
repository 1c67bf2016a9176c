"""Each hostile or broken download is refused with its code; the old model never stops.

Every case runs against a fresh agent under steady load from 2 clients: the refusal
carries its `update.*` code (in the reply when refused at once, else in `update.failed`)
and a message, no request fails, 1.0.0 is served after, and no traceback is logged.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.mqtt_broker import make_pki
from tests.system.update.flows import QUICK_TRIAL, code_of, deploy, message_of, no_traceback
from tests.update_rig import Bundles, BundleServer, Load, Rig, free_disk_mb, served_version

# (rig, bundles) -> deploy args
Build = Callable[[Rig, Bundles], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    name: str
    build: Build
    code: str
    at_once: bool = False  # refused in the reply, no job
    agent: str = ""  # extra agent.toml


def _served(rig: Rig, release_path: Path, path: str, **behaviour: Any) -> str:
    return rig.server.add(path, release_path.read_bytes(), **behaviour)


def bad_signature(rig: Rig, b: Bundles) -> dict[str, Any]:
    r = b.bad_signature("1.1.0")
    return r.deploy_args(_served(rig, r.path, "/badsig"), trial=QUICK_TRIAL)


def wrong_hash(rig: Rig, b: Bundles) -> dict[str, Any]:
    r = b.good("1.1.0")
    args = r.deploy_args(_served(rig, r.path, "/good"), trial=QUICK_TRIAL)
    return {**args, "sha256": hashlib.sha256(b"some other bundle").hexdigest()}


def golden_mismatch(rig: Rig, b: Bundles) -> dict[str, Any]:
    r = b.golden_mismatch("1.1.0")
    return r.deploy_args(_served(rig, r.path, "/golden"), trial=QUICK_TRIAL)


def too_big(rig: Rig, b: Bundles) -> dict[str, Any]:
    """32 MiB of activations a row: even the admission's own probe does not fit."""
    r = b.fat("1.1.0", width=1 << 17)
    return r.deploy_args(_served(rig, r.path, "/fat"), trial=QUICK_TRIAL)


def too_big_at_full_batch(rig: Rig, b: Bundles) -> dict[str, Any]:
    """2 MiB a row: a probe fits beside the served model, a full batch (api.max_batch_size
    rows) does not fit under the cap."""
    r = b.fat("1.1.0", width=1 << 13)
    return r.deploy_args(_served(rig, r.path, "/fat13"), trial=QUICK_TRIAL)


def older(rig: Rig, b: Bundles) -> dict[str, Any]:
    r = b.good("0.9.0")
    return r.deploy_args(_served(rig, r.path, "/old"))


def same(rig: Rig, b: Bundles) -> dict[str, Any]:
    r = b.good("1.0.0")
    return r.deploy_args(_served(rig, r.path, "/same"))


def oversize(rig: Rig, b: Bundles) -> dict[str, Any]:
    r = b.good("1.1.0")
    return r.deploy_args(_served(rig, r.path, "/over", extra=1 << 20), trial=QUICK_TRIAL)


def endless(rig: Rig, b: Bundles) -> dict[str, Any]:
    """No Content-Length; the body goes on far past the signed size."""
    r = b.good("1.1.0")
    url = _served(rig, r.path, "/endless", extra=8 << 20, length=False, ranges=False)
    return r.deploy_args(url, trial=QUICK_TRIAL)


def not_found(rig: Rig, b: Bundles) -> dict[str, Any]:
    r = b.good("1.1.0")
    return r.deploy_args(rig.server.url("/nothing-here"), trial=QUICK_TRIAL)


def untrusted_tls(rig: Rig, b: Bundles) -> dict[str, Any]:
    r = b.good("1.1.0")
    other = BundleServer(make_pki(rig.tmp / "other-pki", name="not-the-device-ca"))
    rig.closers.append(other.close)
    return r.deploy_args(other.add("/x", r.data), trial=QUICK_TRIAL)


def missing_sha(rig: Rig, b: Bundles) -> dict[str, Any]:
    r = b.good("1.1.0")
    args = r.deploy_args(_served(rig, r.path, "/good"))
    del args["sha256"]
    return args


CASES = [
    Case("bad_signature", bad_signature, "update.bundle_refused"),
    Case("wrong_hash", wrong_hash, "update.hash_mismatch"),
    Case("golden_mismatch", golden_mismatch, "update.validation_failed"),
    Case(
        "too_big_at_full_batch",
        too_big_at_full_batch,
        "update.validation_failed",
        agent="[memory]\nmax_mb = 300\n",
    ),
    Case("older_version", older, "update.not_newer", at_once=True),
    Case("same_version", same, "update.not_newer", at_once=True),
    Case("oversize_stream", oversize, "update.oversize"),
    Case("endless_stream", endless, "update.oversize"),
    Case("http_404", not_found, "update.download_failed"),
    Case("untrusted_tls", untrusted_tls, "update.download_failed"),
    Case("missing_sha256", missing_sha, "update.bad_args", at_once=True),
]


def _refused(rig: Rig, args: dict[str, Any]) -> dict[str, Any]:
    """The reply (refused at once) or the final event of the job."""
    reply, final = deploy(rig, args)
    return reply if final is None else final


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_download_is_refused_and_the_old_model_keeps_serving(
    rig: Rig, bundles: Bundles, case: Case
) -> None:
    check_refusal(rig, bundles, case)


def check_refusal(rig: Rig, bundles: Bundles, case: Case) -> None:
    agent = rig.start_agent(extra=case.agent)
    args = case.build(rig, bundles)
    with Load(agent.socket, clients=2) as load:
        load.wait_requests(50)
        outcome = _refused(rig, args)
        load.wait_requests(50)
    if case.at_once:
        assert outcome.get("ok") is False, outcome
    else:
        assert outcome.get("kind") == "update.failed", outcome
    assert code_of(outcome) == case.code, outcome
    assert len(message_of(outcome)) > 10, outcome
    if load.report.failures:
        print(agent.output()[-6000:])  # shown with the failure
    assert load.report.failures == 0, load.report.failed
    assert served_version(agent) == "1.0.0"
    assert rig.console.state()["model"]["version"] == "1.0.0"  # type: ignore[index]
    # Nothing of the refused download is left behind.
    leftovers = [p for p in (rig.state_dir / "incoming").glob("*")] if (
        rig.state_dir / "incoming").exists() else []  # fmt: skip
    assert leftovers == [] or case.code == "update.download_failed", leftovers
    no_traceback(rig)


def test_truncated_download_is_resumed_with_range_and_committed(rig: Rig, bundles: Bundles) -> None:
    agent = rig.start_agent()
    r = bundles.good("1.1.0")
    url = rig.server.add("/cut", r.data, cut_after=r.size // 2, cuts=2)
    with Load(agent.socket, clients=2) as load:
        load.wait_requests(50)
        reply, final = deploy(rig, r.deploy_args(url, trial=QUICK_TRIAL))
        assert final is not None and final["kind"] == "update.committed", (reply, final)
    assert load.report.failures == 0, load.report.failed
    ranges = [q.range for q in rig.server.requests("/cut")]
    assert ranges[0] is None and any(x and x.startswith("bytes=") for x in ranges[1:]), ranges
    assert served_version(agent) == "1.1.0"


@pytest.fixture
def small_fs(tmp: Path) -> Iterator[Path]:
    """A real 24 MiB tmpfs as the agent's state directory (we run as root)."""
    state = tmp / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(state)], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_disk_full_is_refused_with_figures(rig: Rig, bundles: Bundles, small_fs: Path) -> None:
    agent = rig.start_agent(update="reserve_disk_mb = 0")
    r = bundles.good("1.1.0")
    url = rig.server.add("/good", r.data)
    # Fill the file system until less than the bundle fits.
    free = free_disk_mb(small_fs)
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * int((free - 0.15) * (1 << 20)))
    assert free_disk_mb(small_fs) * (1 << 20) < r.size
    with Load(agent.socket, clients=2) as load:
        load.wait_requests(20)
        outcome = _refused(rig, r.deploy_args(url, trial=QUICK_TRIAL))
        load.wait_requests(20)
    assert code_of(outcome) == "update.no_space", outcome
    assert "MB" in message_of(outcome) or "MiB" in message_of(outcome), outcome
    assert load.report.failures == 0, load.report.failed
    assert served_version(agent) == "1.0.0"
    filler.unlink()
    rig.agent.stop()  # type: ignore[union-attr]  # before the tmpfs goes

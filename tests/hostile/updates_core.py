"""Hostile deploy / rollback / update.* commands: generated here, judged by the real parts.

Every case goes through the real dispatcher and command table of a real Agent serving
the sample (signatures required), so what is judged is the code in the reply a console
gets. Cases a reply accepts (a deploy that is well formed) are then run as jobs against
a real HTTP server that lies (wrong hash, a longer body than signed, a tampered
bundle, an older signed version): the code is the job's final one (`update.status`).
After every case the device must still serve the sample model, and no job may be left
running.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config.loader import parse_config
from agent.link.commands import Dispatcher, Request
from agent.link.handlers import build_table
from agent.link.logring import LogRing
from agent.link.replies import ReplyCache
from agent.link.tunables import Tunables
from agent.protocol.canonical import sign_body
from agent.protocol.messages import Code
from agent.service import Agent
from agent.update.errors import UpdateCode as U
from tests.agent.update.fetch.httpserver import HttpServer, Route
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE, samples
from tests.hostile import Case, Outcome

CLASSES = ("updates.args", "updates.policy", "updates.rollback", "updates.download")
DEVICE = "hostile-upd"
CONSOLE_REPLY = "edgerun/v1/console/hostile/reply"
KEY = Ed25519PrivateKey.generate()
SHA = "ab" * 32
BAD = (Code.BAD_ARGS, U.BAD_ARGS)


def _deploy(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"url": "http://127.0.0.1:9/b.edgebundle", "sha256": SHA,
                            "size": 1000, "version": "2.0.0"}  # fmt: skip
    args.update(changes)
    return {k: v for k, v in args.items() if v is not None}


def _without(key: str) -> dict[str, Any]:
    args = _deploy()
    del args[key]
    return args


def arg_cases() -> list[tuple[Case, str, dict[str, Any]]]:
    out: list[tuple[Case, str, dict[str, Any]]] = []

    def add(name: str, args: dict[str, Any], expect: tuple[str, ...] = BAD) -> None:
        out.append((Case("updates.args", name, expect), "deploy", args))

    for key in ("sha256", "size", "version"):
        add(f"missing-{key}", _without(key))
    add("neither-url-nor-transfer", _without("url"))
    add("both-url-and-transfer", _deploy(transfer="t1"))
    for i, url in enumerate([
        "file:///etc/passwd", "ftp://h/b", "javascript:alert(1)", "http://", "http:///x",
        "http://user:pw@h/b", "http://h/" + "a" * 3000, "http://h/\u00e9", "http://h/a b",
        "http://h/\x00", "gopher://h/", "//h/b", "h/b", "",
    ]):  # fmt: skip
        add(f"url-{i}", _deploy(url=url))
    for i, transfer in enumerate(["", "a/b", "../x", "x" * 65, "t#", "t+", "\u00e9"]):
        add(f"transfer-{i}", {**_without("url"), "transfer": transfer})
    for i, sha in enumerate(["", "AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32, 123, None]):
        if sha is not None:
            add(f"sha-{i}", _deploy(sha256=sha))
    for i, size in enumerate([0, -1, 1 << 41, 1.5, "1000", True, [1000], {"n": 1}]):
        add(f"size-{i}", _deploy(size=size))
    for i, version in enumerate(["", "1..0", "v1.0.0", "1.0.0-", "1." * 100 + "1", 1, "1.0.0 "]):
        add(f"version-{i}", _deploy(version=version))
    for i, mode in enumerate(["warm", "", "HOT", 1, True]):
        add(f"mode-{i}", _deploy(mode=mode))
    for i, trial in enumerate([
        {"window_s": -1}, {"window_s": 1e9}, {"max_error_rate": 2}, {"max_p95_ratio": 0.5},
        {"max_crashes": 1.5}, {"min_requests": True}, {"bogus": 1}, [], "60", {"window_s": "1"},
    ]):  # fmt: skip
        add(f"trial-{i}", _deploy(trial=trial))
    for i, shadow in enumerate([
        {"sample": 0}, {"sample": 2}, {"duty_cycle": 0}, {"metric": "l2"}, {"min_requests": 0},
        {"timeout_s": 0}, {"extra": True}, "yes", 1, False,
    ]):  # fmt: skip
        if shadow is False:
            continue
        add(f"shadow-{i}", _deploy(shadow=shadow))
    for i, flag in enumerate(["yes", 1, None, [], {}]):
        if flag is not None:
            add(f"allow_downgrade-{i}", _deploy(allow_downgrade=flag))
            add(f"force-{i}", _deploy(force=flag))
    add("name-bad", _deploy(name="a/b"))
    add("unknown-arg", _deploy(callback="http://evil/"))
    add("shadow-with-cold", _deploy(shadow=True, mode="cold"))
    add("size-over-cap", _deploy(size=(1 << 30) + 1))
    return out


def policy_cases() -> list[tuple[Case, str, dict[str, Any]]]:
    def c(name: str, expect: tuple[str, ...]) -> Case:
        return Case("updates.policy", name, expect)

    return [
        (c("same-version", (U.NOT_NEWER,)), "deploy", _deploy(version="1.0.0")),
        (c("older-version", (U.NOT_NEWER,)), "deploy", _deploy(version="0.9.9")),
        (c("older-prerelease", (U.NOT_NEWER,)), "deploy", _deploy(version="1.0.0-rc.1")),
        (c("cancel-nothing", (U.NOTHING_TO_CANCEL,)), "update.cancel", {}),
        (c("cancel-with-args", (Code.BAD_ARGS,)), "update.cancel", {"job": "x"}),
        (c("status-with-args", (Code.BAD_ARGS,)), "update.status", {"all": True}),
    ]


def rollback_cases() -> list[tuple[Case, str, dict[str, Any]]]:
    def c(name: str, expect: tuple[str, ...]) -> Case:
        return Case("updates.rollback", name, expect)

    return [
        (c("no-previous", (U.NO_SUCH_VERSION,)), "rollback", {}),
        (c("not-on-disk", (U.NO_SUCH_VERSION,)), "rollback", {"version": "0.1.0"}),
        (c("the-served-one", (U.NO_SUCH_VERSION,)), "rollback", {"version": "1.0.0"}),
        (c("bad-version", BAD), "rollback", {"version": "latest"}),
        (c("version-type", BAD), "rollback", {"version": 1}),
        (c("unknown-arg", BAD), "rollback", {"to": "previous"}),
    ]


class Judge:
    def __init__(self, workdir: Path) -> None:
        config = parse_config(
            {"device_id": DEVICE, "state_dir": str(workdir / "state"), "api": {"socket": None},
             "trust": {"public_keys": [str(DEMO_PUB)]}, "model": {"bundle": str(SAMPLE_BUNDLE)},
             "bundle_limits": {"max_bundle_mb": 1024}, "update": {"trial": {"window_s": 0}, "phase_timeout_s": 15}},
            environ={},
        )  # fmt: skip
        self.agent = Agent(config)
        self.agent.load_initial_model()
        self.table = build_table(
            self.agent, Tunables(self.agent), LogRing(50), dict, self.agent.updates
        )
        cache = ReplyCache(workdir / "replies.sqlite", 10_000, 600.0)
        self.dispatcher = Dispatcher(DEVICE, [], self.table, [KEY.public_key()], True,
                                     64 * 1024, cache, lambda *a, **k: None)  # fmt: skip

    def send(self, name: str, args: dict[str, Any]) -> tuple[bool, str | None, str, Any]:
        now = time.time()
        body = sign_body({"id": uuid.uuid4().hex, "name": name, "args": args, "to": DEVICE,
                          "issued_at": now, "expires_at": now + 60}, KEY)  # fmt: skip
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
        response = self.dispatcher.handle(
            Request(f"edgerun/v1/{DEVICE}/cmd/{name}", payload, CONSOLE_REPLY, b"c")
        )
        assert response is not None
        error = response.reply.error
        if error is None:
            return True, None, "accepted", response.reply.result
        return False, error.code, error.message, None

    def judge(self, case: Case, name: str, args: dict[str, Any]) -> Outcome:
        start = time.perf_counter()
        ok, code, message, result = self.send(name, args)
        if ok and name == "deploy":
            # Accepted: the job's end is the verdict.
            assert self.agent.updates.join(120)
            job = self.agent.updates.status()["job"]
            code, message = job["code"], job["reason"] or ""
        outcome = Outcome(case, code, message, time.perf_counter() - start)
        self.check_serving(outcome)
        return outcome

    def check_serving(self, outcome: Outcome) -> None:
        model = self.agent.host.model
        images, labels = samples()
        served = model is not None and model.manifest.version == "1.0.0"
        if served:
            _, out = self.agent.host.infer("digits", {"input": images[:16]})
            served = bool((out["logits"].argmax(1) == labels[:16]).mean() >= 0.8)
        if not served or self.agent.updates.running:
            outcome.code = None
            outcome.message = f"after this case the device does not serve 1.0.0: {outcome.message}"


def download_cases(server: HttpServer, tmp: Path) -> list[tuple[Case, str, dict[str, Any]]]:
    """Deploys that are well formed but whose download lies."""
    from tests.helpers import make_bundle, unpack_sample

    parts = unpack_sample(tmp / "parts")
    from agent.signing import load_private_key
    from tests.helpers import DEMO_KEY

    key = load_private_key(DEMO_KEY)
    good = make_bundle(parts, tmp / "good.edgebundle", key, version="2.0.0").read_bytes()
    other = make_bundle(parts, tmp / "other.edgebundle", Ed25519PrivateKey.generate(),
                        version="2.0.0").read_bytes()  # fmt: skip
    older = make_bundle(parts, tmp / "older.edgebundle", key, version="0.5.0").read_bytes()
    sha = hashlib.sha256(good).hexdigest()

    def route(path: str, data: bytes) -> str:
        server.routes[path] = Route(data=data)
        return server.url(path)

    def c(name: str, expect: tuple[str, ...]) -> Case:
        return Case("updates.download", name, expect)

    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0xFF
    return [
        (c("wrong-hash", (U.HASH_MISMATCH,)), "deploy",
         {"url": route("/a", good), "sha256": "cd" * 32, "size": len(good), "version": "2.0.0"}),
        (c("longer-than-signed", (U.OVERSIZE, U.HASH_MISMATCH)), "deploy",
         {"url": route("/b", good + b"x" * 4096), "sha256": sha, "size": len(good),
          "version": "2.0.0"}),
        (c("shorter-than-signed", (U.DOWNLOAD_FAILED, U.HASH_MISMATCH, U.PHASE_TIMEOUT)), "deploy",
         {"url": route("/c", good[:-100]), "sha256": sha, "size": len(good), "version": "2.0.0"}),
        (c("untrusted-signer", (U.BUNDLE_REFUSED,)), "deploy",
         {"url": route("/d", other), "sha256": hashlib.sha256(other).hexdigest(),
          "size": len(other), "version": "2.0.0"}),
        (c("tampered-bundle", (U.BUNDLE_REFUSED,)), "deploy",
         {"url": route("/e", bytes(tampered)), "sha256": hashlib.sha256(tampered).hexdigest(),
          "size": len(tampered), "version": "2.0.0"}),
        (c("older-signed-than-said", (U.BUNDLE_REFUSED,)), "deploy",
         {"url": route("/f", older), "sha256": hashlib.sha256(older).hexdigest(),
          "size": len(older), "version": "2.0.0"}),
        (c("not-found", (U.DOWNLOAD_FAILED,)), "deploy",
         {"url": server.url("/missing"), "sha256": sha, "size": len(good), "version": "2.0.0"}),
        (c("not-a-bundle", (U.BUNDLE_REFUSED,)), "deploy",
         {"url": route("/g", b"\0" * 2048), "sha256": hashlib.sha256(b"\0" * 2048).hexdigest(),
          "size": 2048, "version": "2.0.0"}),
    ]  # fmt: skip


def run_corpus(workdir: Path) -> list[Outcome]:
    workdir.mkdir(parents=True, exist_ok=True)
    judge = Judge(workdir)
    outcomes = [judge.judge(*case) for case in arg_cases() + policy_cases() + rollback_cases()]
    with HttpServer(workdir / "www") as server:
        # Retries would only slow the corpus: a lie is a lie the first time.
        judge.agent.updates.add_fetcher(*_fast_http())
        for case in download_cases(server, workdir):
            outcomes.append(judge.judge(*case))
    judge.agent.host.close()
    return outcomes


def _fast_http() -> tuple[type, Any]:
    from agent.protocol.update import HttpSource
    from agent.update.fetch.http import HttpFetcher, HttpSettings

    settings = HttpSettings(max_retries=1, backoff_min_s=0.01, backoff_max_s=0.05)
    return HttpSource, lambda request: HttpFetcher(settings)

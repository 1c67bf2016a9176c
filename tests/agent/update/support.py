"""Helpers for the update job tests: an in-process agent, a local-file fetcher, bundles."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path
from typing import Any

from agent.config.loader import parse_config
from agent.protocol.update import DeployRequest, HttpSource, ShadowSpec, TrialSpec
from agent.service import Agent
from agent.serving import LoadedModel
from agent.update.errors import UpdateCode, UpdateError
from agent.update.ports import Progress, Verdict
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE, samples


def make_agent(tmp: Path, **sections: dict[str, object]) -> Agent:
    data: dict[str, object] = {
        "state_dir": str(tmp / "state"),
        "trust": {"public_keys": [str(DEMO_PUB)]},
        "api": {"socket": str(tmp / "api.sock")},
        "update": {"trial": {"window_s": 0}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}  # type: ignore[dict-item]
        else:
            data[key] = value
    return Agent(parse_config(data, {}))


def started(tmp: Path, **sections: dict[str, object]) -> Agent:
    """An agent serving the sample 1.0.0, with a local fetcher for http:// URLs."""
    agent = make_agent(tmp, **sections)
    agent.recover_and_serve()
    if agent.host.model is None:
        agent.admission.install(SAMPLE_BUNDLE)
    agent.updates.add_fetcher(HttpSource, lambda request: LocalFetcher())
    return agent


def served(agent: Agent) -> str:
    """The served version, after checking that it really answers."""
    model = agent.host.model
    assert model is not None
    images, labels = samples()
    _, out = agent.host.infer("digits", {"input": images})
    assert (out["logits"].argmax(1) == labels).mean() >= 0.9
    return model.manifest.version


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def request_for(bundle: Path, version: str, **extra: Any) -> DeployRequest:
    """A deploy of a local file: file:// is not a deploy URL, so the path rides in the host."""
    args = {
        "url": f"http://local{bundle}",
        "sha256": sha256(bundle),
        "size": bundle.stat().st_size,
        "version": version,
        **extra,
    }
    return DeployRequest.from_args(args)


class LocalFetcher:
    """Copies the file named by the URL's path into the partial file, checking size and
    hash like the real fetchers; `gate` holds it mid-way (for busy / cancel / kill)."""

    gate: threading.Event | None = None
    reached: threading.Event | None = None

    def fetch(
        self, request: DeployRequest, partial: Path, progress: Progress, cancel: threading.Event
    ) -> Path:
        assert isinstance(request.source, HttpSource)
        source = Path(request.source.url.removeprefix("http://local"))
        data = source.read_bytes()
        half = len(data) // 2
        with partial.open("wb") as fh:
            fh.write(data[:half])
        progress(half, request.size)
        if LocalFetcher.reached is not None:
            LocalFetcher.reached.set()
        if LocalFetcher.gate is not None:
            while not LocalFetcher.gate.wait(0.05):
                if cancel.is_set():
                    raise UpdateError(UpdateCode.CANCELLED, "cancelled")
        if len(data) > request.size:
            partial.unlink()
            raise UpdateError(UpdateCode.OVERSIZE, "more than the signed size")
        with partial.open("ab") as fh:
            fh.write(data[half:])
        if sha256(partial) != request.sha256:
            partial.unlink()
            raise UpdateError(UpdateCode.HASH_MISMATCH, "sha256 differs")
        done = partial.with_suffix(".bundle")
        shutil.move(partial, done)
        return done


class ScriptedTrial:
    """A trial monitor that counts the candidate's live requests through a real request
    observer and breaches when `breach` says so (the watch area owns the real bounds)."""

    def __init__(self, agent: Agent, breach: str | None) -> None:
        self.agent = agent
        self.breach = breach
        self.requests = 0
        self.generations: list[int] = []

    def observe(self, generation: int, model: LoadedModel, feeds: Any, outputs: Any,
                error: str | None, seconds: float) -> None:  # fmt: skip
        self.requests += 1

    def baseline(self) -> dict[str, float]:
        return {"p95_ms": 1.0}

    def watch(self, generation: int, spec: TrialSpec, baseline: dict[str, float],
              cancel: threading.Event, progress: Any) -> Verdict:  # fmt: skip
        self.generations.append(generation)
        self.agent.host.add_observer(self)
        try:
            images, _ = samples()
            for _ in range(3):
                self.agent.host.infer("digits", {"input": images[:1]})
            if cancel.wait(spec.window_s):
                return Verdict(True, "cancelled", {"requests": float(self.requests)})
        finally:
            self.agent.host.remove_observer(self)
        if self.breach is not None:
            return Verdict(False, self.breach, {"requests": float(self.requests)})
        return Verdict(True, "within bounds", {"requests": float(self.requests)})


class ScriptedShadow:
    def __init__(self, agreement: float) -> None:
        self.agreement = agreement
        self.seen: list[str] = []

    def evaluate(self, candidate: LoadedModel, spec: ShadowSpec, cancel: threading.Event,
                 progress: Any) -> Verdict:  # fmt: skip
        images, _ = samples()
        candidate.run({"input": images[:4]})  # the candidate is really loaded and runs
        self.seen.append(candidate.manifest.version)
        ok = self.agreement >= spec.min_agreement
        return Verdict(ok, f"agreement {self.agreement} vs {spec.min_agreement}",
                       {"agreement": self.agreement})  # fmt: skip

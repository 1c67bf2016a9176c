"""Shared test helpers: bundles built from the sample model, a real agent process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.api.client import ApiClient
from agent.bundle import unpack_bundle, write_bundle
from agent.signing import load_public_key, sign

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_BUNDLE = ROOT / "models/digits/digits-1.0.0.edgebundle"
DEMO_KEY = ROOT / "models/keys/demo-INSECURE.key"
DEMO_PUB = ROOT / "models/keys/demo-INSECURE.pub"
SAMPLES = ROOT / "models/digits/samples.npz"


def samples() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SAMPLES) as data:
        return data["input"], data["label"]


@dataclass
class SampleParts:
    """The sample bundle unpacked: its files and manifest, to build variants from."""

    directory: Path
    manifest: dict[str, Any]

    def files(self) -> dict[str, Path]:
        return {name: self.directory / name for name in self.manifest["files"]}

    def body(self, **changes: Any) -> dict[str, Any]:
        body = {k: v for k, v in self.manifest.items() if k not in ("schema", "files", "key_id")}
        body.update(changes)
        return body


def unpack_sample(dest: Path) -> SampleParts:
    verified = unpack_bundle(SAMPLE_BUNDLE, dest, [load_public_key(DEMO_PUB)])
    return SampleParts(dest, json.loads(verified.manifest_bytes))


def make_bundle(
    parts: SampleParts,
    out: Path,
    key: Ed25519PrivateKey,
    files: dict[str, Path] | None = None,
    **changes: Any,
) -> Path:
    return write_bundle(out, parts.body(**changes), files or parts.files(), key)


def raw_tar(out: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """Write a tar archive member by member (for hostile bundles)."""
    with tarfile.open(out, "w:", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def file_info(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def signed_manifest(
    manifest: dict[str, Any], key: Ed25519PrivateKey
) -> list[tuple[tarfile.TarInfo, bytes]]:
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return [file_info("manifest.json", data), file_info("manifest.sig", sign(key, data))]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def base_config(
    tmp: Path,
    bundle: Path | None = SAMPLE_BUNDLE,
    extra: str = "",
    api: str = "",
    model: str = "",
) -> str:
    """An agent.toml for tests; `api`/`model` lines go into those tables."""
    lines = [
        'device_id = "test-device"',
        f'state_dir = "{tmp / "state"}"',
        "[trust]",
        f'public_keys = ["{DEMO_PUB}"]',
        "[api]",
        f'socket = "{tmp / "api.sock"}"',
        api,
        "[model]",
        f'bundle = "{bundle}"' if bundle is not None else "",
        model,
    ]
    return "\n".join(lines) + "\n" + extra


class AgentProcess:
    """`edge-agent run` as a real child process."""

    def __init__(self, config: Path, socket_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.socket = socket_path
        self.log = config.with_suffix(".log")
        self._log_fh = self.log.open("wb")
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=full_env,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.output()}")
            if self.socket.exists():
                with contextlib.suppress(OSError), ApiClient(str(self.socket), timeout=2) as c:
                    if c.request("GET", "/v2/health/ready")[0] == 200:
                        return
            time.sleep(0.05)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.output()}")

    def wait_exit(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def client(self) -> ApiClient:
        return ApiClient(str(self.socket))

    def output(self) -> str:
        if not self._log_fh.closed:
            self._log_fh.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_fh.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_agent(
    tmp: Path, config_text: str, env: dict[str, str] | None = None
) -> Iterator[AgentProcess]:
    config = write_config(tmp / "agent.toml", config_text)
    agent = AgentProcess(config, tmp / "api.sock", env)
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.stop()

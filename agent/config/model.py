"""The agent's configuration, as typed, frozen models with documented defaults.

Each runtime owns its config model (agent/runtimes/*); this module composes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.config.typed import constraint
from agent.runtimes.litert import LiteRTConfig
from agent.runtimes.ort import OrtConfig

DEVICE_ID_PATTERN = r"[A-Za-z0-9._-]{1,64}"
LogLevel = Literal["debug", "info", "warning", "error"]
RuntimeName = Literal["onnxruntime", "litert"]


@dataclass(frozen=True)
class ModelConfig:
    # A bundle to install at start when it is newer than what the device runs.
    bundle: Path | None = None
    # "auto" takes the first runtime of `preference` that is installed and in the bundle.
    runtime: Literal["auto", "onnxruntime", "litert"] = "auto"
    preference: list[RuntimeName] = field(default_factory=lambda: ["onnxruntime", "litert"])
    # Replay the bundle's golden cases before serving a model (on by default: a bundle
    # that does not reproduce on this device's CPU/runtime is refused).
    validate_golden: bool = True


@dataclass(frozen=True)
class TrustConfig:
    # PEM ed25519 public keys whose signatures are accepted; "credential:NAME" reads
    # $CREDENTIALS_DIRECTORY/NAME. No key is trusted by default.
    public_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RuntimesConfig:
    onnxruntime: OrtConfig = field(default_factory=OrtConfig)
    litert: LiteRTConfig = field(default_factory=LiteRTConfig)


@dataclass(frozen=True)
class MemoryConfig:
    # Configured cap in MiB; 0 means only the cgroup limit and physical memory apply.
    max_mb: int = constraint(0, ge=0)
    # Above this share of the effective cap the agent sheds new requests.
    soft_limit_fraction: float = constraint(0.9, ge=0.1, le=1.0)
    # An explicit soft limit in MiB overrides the fraction (0: use the fraction).
    soft_limit_mb: int = constraint(0, ge=0)
    check_interval_ms: int = constraint(100, ge=10, le=10_000)


@dataclass(frozen=True)
class ApiConfig:
    socket: Path | None = Path("/run/edgerun/api.sock")
    # "127.0.0.1:8080" to also listen on TCP; empty to stay on the Unix socket only.
    tcp: str = constraint("", pattern=r"|(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}")
    max_request_mb: float = constraint(16.0, ge=0.001, le=1024)
    max_inflight: int = constraint(64, ge=1, le=100_000)
    workers: int = constraint(2, ge=1, le=64)
    drain_timeout_s: float = constraint(10.0, ge=0, le=300)
    max_batch_size: int = constraint(256, ge=1, le=1_000_000)


@dataclass(frozen=True)
class BatchingConfig:
    # Dynamic micro-batching: off by default, it trades latency for throughput.
    enabled: bool = False
    max_batch: int = constraint(32, ge=2, le=4096)
    max_wait_ms: float = constraint(2.0, ge=0, le=1000)


@dataclass(frozen=True)
class BundleLimitsConfig:
    max_bundle_mb: int = constraint(1024, ge=1)
    max_member_mb: int = constraint(768, ge=1)
    max_members: int = constraint(64, ge=4, le=10_000)


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = constraint("edgerun-device", pattern=DEVICE_ID_PATTERN)
    state_dir: Path = Path("/var/lib/edgerun")
    log_level: LogLevel = "info"
    model: ModelConfig = field(default_factory=ModelConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    runtimes: RuntimesConfig = field(default_factory=RuntimesConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    bundle_limits: BundleLimitsConfig = field(default_factory=BundleLimitsConfig)

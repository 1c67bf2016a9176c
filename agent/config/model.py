"""The agent's configuration, as typed, frozen models with documented defaults.

Each runtime owns its config model (agent/runtimes/*); this module composes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.config.typed import constraint
from agent.runtimes import DEFAULT_PREFERENCE, REGISTRY

DEVICE_ID_PATTERN = r"[A-Za-z0-9._-]{1,64}"
LogLevel = Literal["debug", "info", "warning", "error"]

# The runtime names, the `[runtimes]` sections and their types are derived from the
# runtime registry (agent/runtimes: one module per runtime), so a new runtime needs
# no edit here. mypy sees plain strings and an attribute bag; the loader sees the
# Literal and the dataclass built from the registry, and checks against them.
if TYPE_CHECKING:
    RuntimeName = str
    RuntimeChoice = str

    class RuntimesConfig:
        def __init__(self, **sections: Any) -> None: ...
        def __getattr__(self, name: str) -> Any: ...

else:
    RuntimeName = Literal[tuple(REGISTRY)]
    RuntimeChoice = Literal[("auto", *REGISTRY)]
    RuntimesConfig = make_dataclass(
        "RuntimesConfig",
        [
            (name, cls.config_type, field(default_factory=cls.config_type))
            for name, cls in REGISTRY.items()
        ],
        frozen=True,
    )
    RuntimesConfig.__module__ = __name__


@dataclass(frozen=True)
class ModelConfig:
    # A bundle to install at start when it is newer than what the device runs.
    bundle: Path | None = None
    # "auto" takes the first runtime of `preference` that is installed and in the bundle.
    runtime: RuntimeChoice = "auto"
    preference: list[RuntimeName] = field(default_factory=lambda: list(DEFAULT_PREFERENCE))
    # Replay the bundle's golden cases before serving a model (on by default: a bundle
    # that does not reproduce on this device's CPU/runtime is refused).
    validate_golden: bool = True
    # Which of the bundle's variants serves: "auto" measures each one a runtime here can
    # load (golden replay, latency, memory) and serves the fastest that passes; a variant
    # id pins that one (a bundle without it is refused, the served model kept).
    variant: str = constraint("auto", pattern=r"auto|[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    # Rows of the latency probe that compares variants; 0: batching.max_batch when
    # batching is on, else 1 (the batch requests then run at).
    variant_batch: int = constraint(0, ge=0, le=4096)


@dataclass(frozen=True)
class TrustConfig:
    # PEM ed25519 public keys whose signatures are accepted; "credential:NAME" reads
    # $CREDENTIALS_DIRECTORY/NAME. No key is trusted by default.
    public_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MemoryConfig:
    # Configured cap in MiB; 0 means only the cgroup limit and physical memory apply.
    max_mb: int = constraint(0, ge=0, le=16 * 1024 * 1024)
    # Above this share of the effective cap the agent sheds new requests.
    soft_limit_fraction: float = constraint(0.9, ge=0.1, le=1.0)
    # An explicit soft limit in MiB overrides the fraction (0: use the fraction).
    soft_limit_mb: int = constraint(0, ge=0, le=16 * 1024 * 1024)
    check_interval_ms: int = constraint(100, ge=10, le=10_000)
    # RSS still above the soft limit with nothing in flight for this long: rebuild the
    # runtime session to give back what its memory pools keep.
    recover_after_s: float = constraint(2.0, ge=0.1, le=3600)
    # Cap of a discrete GPU's memory the agent may hold, in MiB (0: the GPU's own
    # memory). A candidate whose measured device memory (NVML) does not fit is
    # refused; the CUDA arena is bounded by it. On unified memory (a Jetson) GPU
    # memory counts against the cap above instead, with RSS.
    gpu_max_mb: int = constraint(0, ge=0, le=16 * 1024 * 1024)


# A file path, or "credential:NAME" for $CREDENTIALS_DIRECTORY/NAME (systemd LoadCredential=).
SECRET_REF_PATTERN = r"|credential:[A-Za-z0-9._-]{1,128}|/.{0,4095}"


@dataclass(frozen=True)
class ApiConfig:
    socket: Path | None = Path("/run/edgerun/api.sock")
    # Who may use the Unix socket: its mode (octal) and group (empty: the agent's own).
    socket_mode: str = constraint("0660", pattern=r"0?[0-7]{3}")
    socket_group: str = constraint("", pattern=r"|[A-Za-z_][A-Za-z0-9_.-]{0,31}")
    # "127.0.0.1:8080" to also listen on TCP; empty to stay on the Unix socket only.
    tcp: str = constraint("", pattern=r"|(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}")
    # Bearer token for TCP requests (a file path or "credential:NAME"); required when
    # api.tcp is not a loopback address. Health endpoints stay open.
    token: str = constraint("", pattern=SECRET_REF_PATTERN)
    max_request_mb: float = constraint(16.0, ge=0.001, le=1024)
    # Request bodies admitted and not yet answered, across all connections.
    max_body_inflight_mb: float = constraint(64.0, ge=0.001, le=65_536)
    max_inflight: int = constraint(64, ge=1, le=100_000)
    # One thread per connection; more connections are refused with 503.
    max_connections: int = constraint(64, ge=1, le=10_000)
    # A request head must be complete this long after the connection (or the request's
    # first byte); its body within body_timeout_s after the head.
    head_timeout_s: float = constraint(10.0, ge=0.1, le=3600)
    body_timeout_s: float = constraint(60.0, ge=0.1, le=3600)
    # An idle keep-alive connection is closed after this long (and sooner, oldest
    # first, when the connection limit is reached).
    idle_timeout_s: float = constraint(30.0, ge=1, le=86_400)
    drain_timeout_s: float = constraint(10.0, ge=0, le=300)
    max_batch_size: int = constraint(256, ge=1, le=1_000_000)
    # Triton's system shared memory (/v2/systemsharedmemory): regions registered at
    # once (0 turns the extension off) and their bytes, which also count against the
    # memory headroom while registered.
    max_shm_regions: int = constraint(16, ge=0, le=1024)
    max_shm_mb: float = constraint(256.0, ge=0, le=65_536)


@dataclass(frozen=True)
class BatchingConfig:
    # Dynamic micro-batching: off by default, it trades latency for throughput.
    enabled: bool = False
    max_batch: int = constraint(32, ge=2, le=4096)
    max_wait_ms: float = constraint(2.0, ge=0, le=1000)


@dataclass(frozen=True)
class BundleLimitsConfig:
    max_bundle_mb: int = constraint(1024, ge=1, le=1024 * 1024)
    max_member_mb: int = constraint(768, ge=1, le=1024 * 1024)
    max_members: int = constraint(64, ge=4, le=10_000)


# ------------------------------------------------------------------ MQTT link (issue 4)

HOST_PATTERN = r"\[[0-9a-fA-F:]+\]|[0-9a-fA-F:]*:[0-9a-fA-F:]+|[A-Za-z0-9]([A-Za-z0-9.-]{0,252})"
K8S_LABEL_PATTERN = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
K8S_NAME_PATTERN = r"|[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    # CA bundle that signed the broker's certificate; empty uses the system's CAs.
    ca_file: str = constraint("", pattern=SECRET_REF_PATTERN)
    # Client certificate and key for mutual TLS (both or neither).
    cert_file: str = constraint("", pattern=SECRET_REF_PATTERN)
    key_file: str = constraint("", pattern=SECRET_REF_PATTERN)
    min_version: Literal["1.2", "1.3"] = "1.2"


@dataclass(frozen=True)
class MqttConfig:
    # Off by default: the agent serves local inference with no network at all.
    enabled: bool = False
    host: str = constraint("127.0.0.1", pattern=HOST_PATTERN)
    port: int = constraint(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    # Empty: the device id.
    client_id: str = constraint("", pattern=r"|[A-Za-z0-9._-]{1,64}")
    username: str = constraint("", pattern=r"|[^\x00]{1,256}")
    # Never the secret itself: a file path or "credential:NAME".
    password: str = constraint("", pattern=SECRET_REF_PATTERN)
    keepalive_s: int = constraint(30, ge=5, le=3600)
    connect_timeout_s: float = constraint(5.0, ge=0.5, le=120)
    # Reconnect waits double from min to max, each with random jitter.
    reconnect_min_s: float = constraint(0.5, ge=0.05, le=60)
    reconnect_max_s: float = constraint(30.0, ge=0.1, le=3600)
    # QoS 1 messages from the outbox awaiting PUBACK at once.
    max_inflight: int = constraint(32, ge=1, le=1000)
    # Groups this device takes `edgerun/v1/group/{group}/cmd/...` commands for.
    groups: list[str] = field(default_factory=list)
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class TelemetryConfig:
    interval_s: float = constraint(10.0, ge=0.05, le=86_400)


@dataclass(frozen=True)
class JetsonConfig:
    # "auto": run /usr/bin/tegrastats (or one on PATH) when there is one; "off": never;
    # or the absolute path of the tegrastats to run. Without it /sys is read instead.
    tegrastats: str = constraint("auto", pattern=r"auto|off|/.{1,4095}")
    interval_ms: int = constraint(1000, ge=100, le=60_000)
    # Where /sys is read from: "/" on a device; a container may bind the host's elsewhere.
    sysfs_root: Path = Path("/")


@dataclass(frozen=True)
class OutboxConfig:
    # Bounds of STATE/outbox.sqlite: past them the oldest telemetry goes first, events last.
    max_mb: float = constraint(64.0, ge=0.01, le=1_000_000)
    max_age_s: float = constraint(7 * 86_400.0, ge=1, le=366 * 86_400)
    # "full" survives power cuts; "normal" only process crashes, but writes faster.
    synchronous: Literal["full", "normal"] = "full"


@dataclass(frozen=True)
class CommandsConfig:
    # Commands must carry an ed25519 signature by one of `console_keys`.
    require_signature: bool = True
    # PEM ed25519 public keys of fleet consoles: file paths or "credential:NAME".
    console_keys: list[str] = field(default_factory=list)
    max_payload_kb: int = constraint(64, ge=1, le=16_384)
    # A signed command must expire (`expires_at`) at most this long after it was issued
    # (`issued_at`, or arrival when absent); its id is remembered until then, so a
    # captured command cannot run twice.
    max_lifetime_s: float = constraint(3600.0, ge=1, le=7 * 86_400)
    # How far a console's clock may run ahead of the device's (`issued_at`).
    clock_skew_s: float = constraint(60.0, ge=0, le=3600)
    # Replies kept so a repeated command id gets its first reply, also after a restart.
    reply_cache_size: int = constraint(1000, ge=1, le=1_000_000)
    reply_cache_age_s: float = constraint(7 * 86_400.0, ge=1, le=366 * 86_400)
    # Log lines kept in memory for the `logs` command.
    log_lines: int = constraint(500, ge=10, le=100_000)


@dataclass(frozen=True)
class KubeEdgeConfig:
    # Act as a KubeEdge device through the device twin topics on the same broker.
    enabled: bool = False
    namespace: str = constraint("default", pattern=K8S_LABEL_PATTERN)
    # Empty: the device id (which must then be a valid Kubernetes name).
    device_name: str = constraint("", pattern=K8S_NAME_PATTERN)


@dataclass(frozen=True)
class UpdateTrialConfig:
    # Defaults of a deploy's `trial` (agent/protocol/update.py TrialSpec has the meaning).
    window_s: float = constraint(60.0, ge=0, le=86_400)
    min_requests: int = constraint(20, ge=0, le=1_000_000)
    max_error_rate: float = constraint(0.02, ge=0, le=1)
    max_p95_ratio: float = constraint(2.0, ge=1, le=1000)
    max_rss_growth_mb: float = constraint(64.0, ge=0, le=1 << 20)
    max_nonfinite_rate: float = constraint(0.0, ge=0, le=1)
    max_drift: float = constraint(0.25, ge=0, le=1)
    max_crashes: int = constraint(2, ge=0, le=100)


@dataclass(frozen=True)
class UpdateConfig:
    # Over-the-air updates (agent/update). Off: deploy/rollback are refused.
    enabled: bool = True
    # Download bandwidth cap in kbit/s (0: none), timeouts, retries.
    max_kbps: float = constraint(0.0, ge=0, le=10_000_000)
    connect_timeout_s: float = constraint(10.0, ge=0.5, le=600)
    read_timeout_s: float = constraint(30.0, ge=0.5, le=3600)
    max_redirects: int = constraint(3, ge=0, le=10)
    max_retries: int = constraint(8, ge=0, le=1000)
    # PEM CA bundle for https downloads ("credential:NAME" allowed); "" = system CAs.
    ca_file: str = constraint("", pattern=SECRET_REF_PATTERN)
    # MQTT chunk transfers: how long to wait for missing chunks before asking again / giving up.
    chunk_timeout_s: float = constraint(5.0, ge=0.1, le=600)
    transfer_timeout_s: float = constraint(600.0, ge=1, le=86_400)
    # Free disk space kept beyond what a job needs (MiB).
    reserve_disk_mb: int = constraint(64, ge=0, le=1 << 20)
    # Signed release index (pull updates, KubeEdge desired versions): URL ("" = none) and
    # how often to poll it (0: only when the twin's desired version changes).
    repository: str = constraint("", pattern=r"|https?://[\x21-\x7e]{1,2040}")
    poll_s: float = constraint(0.0, ge=0, le=7 * 86_400)
    # Keys that may sign the release index ("credential:NAME" allowed); empty: trust.public_keys.
    index_keys: list[str] = field(default_factory=list)
    # A job that sits in one phase this long is failed (and rolled back after the swap).
    phase_timeout_s: float = constraint(1800.0, ge=1, le=86_400)
    # Latency check at validation: the p50 of one golden case on this device must be at
    # most the manifest's figures.latency_ms.<runtime>.p50 x latency_ratio + latency_slack_ms.
    latency_ratio: float = constraint(3.0, ge=1, le=1000)
    latency_slack_ms: float = constraint(1.0, ge=0, le=60_000)
    # Bounded wait of new requests during a cold swap (ms).
    cold_swap_wait_ms: int = constraint(30_000, ge=100, le=600_000)
    trial: UpdateTrialConfig = field(default_factory=UpdateTrialConfig)


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
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    jetson: JetsonConfig = field(default_factory=JetsonConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    kubeedge: KubeEdgeConfig = field(default_factory=KubeEdgeConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)

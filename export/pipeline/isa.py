"""The build host's instruction set, and the quantization preset that fits a CPU.

INT8 accuracy and speed belong to the instruction set, not to the model: the same
u8 x s8 QDQ model that is exact on a VNNI Xeon saturates on an AVX2-only CPU (the
int16 intermediate of VPMADDUBSW), so `quantize.preset = "auto"` reads the build
host's /proc/cpuinfo flags (x86 `flags`, arm64 `Features`) and the device tree
model (Jetson), and the report states which instruction set every figure was
measured on.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from agent.hardware.cpuinfo import (
    CPUINFO,
    DT_MODEL,
    cpu_fields,
    flag_set,
    read_cpuinfo,
    read_proc_text,
)

# The flags that decide a preset, in the order they are reported.
_X86_KEYS = ("avx512_vnni", "avx_vnni", "avx512bw", "avx2")
_ARM_KEYS = ("asimddp", "i8mm", "asimd")


@dataclass(frozen=True)
class HostIsa:
    """What the build (or target) CPU offers that INT8 kernels care about."""

    arch: str  # "x86_64" | "aarch64" | what platform.machine() said
    features: frozenset[str]
    model: str  # CPU model name or device-tree model; "" if unknown
    jetson: bool = False

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni"} & self.features)

    @property
    def dotprod(self) -> bool:
        return "asimddp" in self.features

    @property
    def label(self) -> str:
        """e.g. 'x86_64 avx512_vnni avx512bw avx2 (AMD EPYC)' for reports."""
        keys = _X86_KEYS if self.arch == "x86_64" else _ARM_KEYS
        shown = [k for k in keys if k in self.features]
        if self.arch == "aarch64" and not self.dotprod:
            shown.append("no dotprod")
        if self.arch == "x86_64" and not self.vnni:
            shown.append("no VNNI")
        text = " ".join([self.arch, *shown])
        return f"{text} ({self.model})" if self.model else text

    def to_json(self) -> dict[str, object]:
        return {"arch": self.arch, "label": self.label, "model": self.model,
                "jetson": self.jetson, "preset": preset_for(self)[0],
                "flags": sorted(k for k in (*_X86_KEYS, *_ARM_KEYS) if k in self.features)}  # fmt: skip


def parse_cpuinfo(text: str, machine: str = "") -> HostIsa:
    """Read the first processor's flags/Features and model from /proc/cpuinfo text."""
    fields = cpu_fields(text)
    features = flag_set(fields)
    arch = machine
    if features and not arch:
        # x86 lists "flags", arm64 "Features" (asimd is the arm64 NEON flag).
        arch = "x86_64" if "flags" in fields else "aarch64"
    # x86 "model name"; Raspberry Pi "Model" (x86 "model" is a number), whichever is first.
    model = next((v for k, v in fields.items()
                  if k in ("model name", "model") and not v.isdigit()), "")  # fmt: skip
    return HostIsa(arch or "unknown", features, model)


def detect_host(cpuinfo: Path = CPUINFO, dt_model: Path = DT_MODEL,
                machine: str | None = None) -> HostIsa:  # fmt: skip
    machine = platform.machine() if machine is None else machine
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)
    host = parse_cpuinfo(read_cpuinfo(cpuinfo), arch)
    board = read_proc_text(dt_model).strip("\0 \n")
    return with_board(host, board)


def with_board(host: HostIsa, board: str) -> HostIsa:
    """Jetson boards name themselves in the device tree ("NVIDIA Jetson AGX Orin ...")."""
    if not board:
        return host
    low = board.lower()
    # Orin and Xavier run INT8 in TensorRT; the Nano's and TX2's GPUs have no INT8 path,
    # so those boards get their CPU's preset.
    jetson = "jetson" in low and ("orin" in low or "xavier" in low)
    return HostIsa(host.arch, host.features, board, jetson)


def preset_for(host: HostIsa) -> tuple[str, str]:
    """The named preset for a CPU, and why (a sentence for the report)."""
    if host.jetson:
        return "jetson-orin", "a Jetson (device tree) with TensorRT: symmetric s8 QDQ"
    if host.arch == "x86_64":
        if host.vnni:
            return "x86_64-vnni", "VNNI present: u8 x s8 accumulates in int32, full 8-bit weights"
        return "x86_64-avx2", "no VNNI: VPMADDUBSW's int16 sums saturate, weights reduced to 7 bits"
    if host.arch == "aarch64":
        if host.dotprod:
            return "arm64-dotprod", "asimddp present: SDOT/UDOT 8-bit dot products"
        return "arm64", "no asimddp: NEON widening multiplies (no saturation), u8 x s8"
    return "none", f"no preset for {host.arch}: ONNX Runtime's defaults"

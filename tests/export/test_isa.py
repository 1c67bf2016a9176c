"""Preset detection from real /proc/cpuinfo captures (sources in fixtures/cpuinfo/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.pipeline.isa import detect_host, parse_cpuinfo, preset_for, with_board
from export.pipeline.quantize import PRESETS, QuantizeConfig, resolve_preset

SAMPLES = Path(__file__).parent / "fixtures" / "cpuinfo"


@pytest.mark.parametrize(
    ("sample", "machine", "preset", "reduce_range"),
    [
        ("xeon-gold-6326.txt", "x86_64", "x86_64-vnni", False),
        ("build-host-epyc-zen4.txt", "x86_64", "x86_64-vnni", False),
        ("ryzen-3-4100-zen2.txt", "x86_64", "x86_64-avx2", True),
        ("raspberry-pi-4.txt", "aarch64", "arm64", False),
        ("raspberry-pi-5.txt", "aarch64", "arm64-dotprod", False),
    ],
)
def test_preset_follows_the_cpu(sample: str, machine: str, preset: str, reduce_range: bool) -> None:
    host = parse_cpuinfo((SAMPLES / sample).read_text(), machine)
    assert host.arch == machine
    name, why = preset_for(host)
    assert name == preset, (host.label, why)
    assert PRESETS[name].reduce_range is reduce_range
    # The report names the instruction set; a CPU without VNNI/dotprod says so.
    if preset == "x86_64-avx2":
        assert "no VNNI" in host.label and "avx2" in host.label
    if preset == "arm64":
        assert "no dotprod" in host.label
    if preset == "arm64-dotprod":
        assert "asimddp" in host.label


def test_arch_is_told_from_the_cpuinfo_keys_without_a_machine() -> None:
    assert parse_cpuinfo((SAMPLES / "raspberry-pi-4.txt").read_text()).arch == "aarch64"
    assert parse_cpuinfo((SAMPLES / "xeon-gold-6326.txt").read_text()).arch == "x86_64"
    pi4 = parse_cpuinfo((SAMPLES / "raspberry-pi-4.txt").read_text())
    assert pi4.model == "Raspberry Pi 4 Model B Rev 1.4"


def test_jetson_by_device_tree_model(tmp_path: Path) -> None:
    cpuinfo = SAMPLES / "raspberry-pi-5.txt"  # an arm64 dotprod CPU, like Orin's A78AE
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    host = detect_host(cpuinfo, model, machine="aarch64")
    assert host.jetson and preset_for(host)[0] == "jetson-orin"
    # The Nano's Maxwell GPU has no INT8 path in TensorRT: its CPU decides.
    nano = with_board(parse_cpuinfo((SAMPLES / "raspberry-pi-4.txt").read_text(), "aarch64"),
                      "NVIDIA Jetson Nano Developer Kit")  # fmt: skip
    assert not nano.jetson and preset_for(nano)[0] == "arm64"


def test_an_unknown_cpu_gets_onnxruntimes_defaults(tmp_path: Path) -> None:
    host = detect_host(tmp_path / "none", tmp_path / "none", machine="riscv64")
    assert host.arch == "riscv64" and not host.features
    assert preset_for(host)[0] == "none"
    # A readable x86 cpuinfo with no flags line (a stripped container) has no VNNI.
    bare = parse_cpuinfo("processor\t: 0\nmodel name\t: QEMU Virtual CPU\n", "x86_64")
    assert preset_for(bare)[0] == "x86_64-avx2"


def test_auto_and_old_names_resolve() -> None:
    host = parse_cpuinfo((SAMPLES / "ryzen-3-4100-zen2.txt").read_text(), "x86_64")
    name, why = resolve_preset("auto", host)
    assert name == "x86_64-avx2" and why.startswith("auto:")
    assert resolve_preset("avx512_vnni")[0] == "x86_64-vnni"
    assert resolve_preset("jetson-tensorrt")[0] == "jetson-orin"
    # The old names still build the same settings.
    assert QuantizeConfig(preset="avx512_vnni").settings == PRESETS["x86_64-vnni"]


def test_the_real_build_host_is_detected() -> None:
    host = detect_host()
    name, _ = preset_for(host)
    assert name in PRESETS and host.arch


@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.glob("*.txt")))
def test_the_agent_fingerprint_reads_the_same_cpu(sample: str) -> None:
    """One reader of cpuinfo (agent.hardware.cpuinfo): the flags the preset is chosen by
    are the flags the device's variant-choice cache is keyed by."""
    import hashlib

    from agent.variants.fingerprint import cpu_identity

    text = (SAMPLES / sample).read_text()
    host = parse_cpuinfo(text)
    assert host.features
    ident = cpu_identity(text)
    digest = hashlib.sha256(" ".join(sorted(host.features)).encode()).hexdigest()[:16]
    assert ident["cpu_flags"] == digest
    assert ident["cpu"]

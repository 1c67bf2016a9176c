"""An AcceleratorReport as /metrics gauges, each with its unit in its name."""

from __future__ import annotations

from agent.memory import MB
from agent.metrics import GaugeFamily
from agent.protocol.accelerator import AcceleratorReport


def accelerator_gauges(report: AcceleratorReport | None) -> list[GaugeFamily]:
    """Nothing for a device with no accelerator figures: no empty families either."""
    if report is None:
        return []
    source = {"source": report.source}

    def single(name: str, help_text: str, value: float | None, scale: float = 1.0) -> None:
        if value is not None:
            families.append(GaugeFamily(name, help_text, [(source, value * scale)]))

    families: list[GaugeFamily] = []
    single("edgerun_gpu_load_ratio", "GPU (GR3D) busy share, 0-1.", report.gpu_load_ratio)
    single("edgerun_gpu_frequency_hertz", "GPU clock.", report.gpu_frequency_hz)
    single(
        "edgerun_emc_load_ratio",
        "External memory controller busy share, 0-1.",
        report.emc_load_ratio,
    )
    single(
        "edgerun_emc_frequency_hertz", "External memory controller clock.", report.emc_frequency_hz
    )
    single(
        "edgerun_unified_memory_used_bytes",
        "RAM in use, shared by the CPU and the GPU.",
        report.ram_used_mb,
        MB,
    )
    single("edgerun_unified_memory_total_bytes", "RAM there is.", report.ram_total_mb, MB)
    single("edgerun_swap_used_bytes", "Swap in use.", report.swap_used_mb, MB)
    single("edgerun_swap_total_bytes", "Swap there is.", report.swap_total_mb, MB)
    single("edgerun_accelerator_reading_age_seconds", "Age of these figures.", report.age_s)
    loads = [
        ({"core": str(i)}, core.load_ratio)
        for i, core in enumerate(report.cpu)
        if core.load_ratio is not None
    ]
    clocks = [
        ({"core": str(i)}, core.frequency_hz)
        for i, core in enumerate(report.cpu)
        if core.frequency_hz is not None
    ]
    families += [
        GaugeFamily(
            "edgerun_cpu_load_ratio", "CPU core busy share, 0-1 (off cores absent).", loads
        ),
        GaugeFamily("edgerun_cpu_frequency_hertz", "CPU core clock.", clocks),
        GaugeFamily(
            "edgerun_temperature_celsius",
            "Temperature per thermal zone.",
            [({"zone": k}, v) for k, v in sorted(report.temperatures_c.items())],
        ),
        GaugeFamily(
            "edgerun_power_milliwatts",
            "Power drawn per rail (INA3221), now.",
            [({"rail": k}, v) for k, v in sorted(report.power_mw.items())],
        ),
        GaugeFamily(
            "edgerun_power_average_milliwatts",
            "Power drawn per rail, tegrastats' running average.",
            [({"rail": k}, v) for k, v in sorted(report.power_average_mw.items())],
        ),
    ]
    return families

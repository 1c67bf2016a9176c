"""Parse one line of NVIDIA's `tegrastats` into an AcceleratorReport.

The format is not versioned and differs between JetPack releases (fixtures of each,
with their sources: tests/agent/fixtures/tegrastats/):

- JetPack 3 (TX1): `cpu [17%,13%]@408 EMC 1%@408 GR3D 3%@76`, one clock for all cores.
- JetPack 4 (Nano, TX2, AGX Xavier): `CPU [24%@1224,...] EMC_FREQ 0% GR3D_FREQ 0%@76`,
  zones `GPU@23.5C`, rails in mW without a unit: `POM_5V_IN 2545/2547` (Nano),
  `VDD_SYS_GPU 153/158` (TX2), `GPU 463/463` (AGX Xavier, no prefix at all).
- JetPack 5/6 (Xavier, Orin): a date prefix, lowercase zones `tj@53.968C`, rails with a
  unit `VDD_IN 4824mW/4824mW`, GPU clocks per GPC `GR3D_FREQ 63%@[621]` (or `@[611,611]`).
- JetPack 7 prints zones as now/max `cpu@52.968C/52.968C` and rails as now/avg/max
  `5139mW/5139mW/5139mW`: the first value is the current one and is what is kept.
  Thor prints a GPU clock without a load: `GR3D_FREQ @[1000,1000,1000]`.

Every field is matched on its own: a field that is missing or garbled is absent from
the result, the others are kept, and nothing raises. A line with no field at all
gives None (logged at debug).
"""

from __future__ import annotations

import logging
import re

from agent.protocol.accelerator import AcceleratorReport, CpuCore

log = logging.getLogger(__name__)

MHZ = 1_000_000.0
_NUM = r"\d+(?:\.\d+)?"

_STAMP = re.compile(r"^\s*\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2}\s+")
_RAM = re.compile(rf"\bRAM ({_NUM})/({_NUM})MB\b")
_SWAP = re.compile(rf"\bSWAP ({_NUM})/({_NUM})MB\b")
_IRAM = re.compile(rf"\bIRAM ({_NUM})/({_NUM})kB\b")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?", re.IGNORECASE)
_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
# GR3D_FREQ 63%@[621] | GR3D_FREQ 0%@76 | GR3D_FREQ 0% | GR3D 3%@76 | GR3D_FREQ @[1000,1000]
_ENGINE = r"(?:(\d+)%)?(?:@(?:(\d+)|\[([\d,]+)\]))?(?=\s|$)"
_GPU = re.compile(rf"(?:^|\s)GR3D(?:_FREQ)? {_ENGINE}")
_EMC = re.compile(rf"(?:^|\s)EMC(?:_FREQ)? {_ENGINE}")
# `cpu@45.5C`, `Tdiode@41.25C`, `BCPU@-45C`, `tj@47.9C/48.3C` (current/max): the name
# starts with a letter, so a core's `24%@1224` is never read as a zone.
_TEMP = re.compile(rf"(?:^|\s)([A-Za-z][\w-]*)@(-?{_NUM})C(?:/-?{_NUM}C)*(?=\s|$)")
# `VDD_IN 4824mW/4824mW`, `POM_5V_IN 2545/2547`, `GPU 463/463`, `VDD_X 3034mW/3049mW/3412mW`
_RAIL = re.compile(
    rf"(?:^|\s)([A-Z][A-Z0-9_]*) ({_NUM})(?:mW)?/({_NUM})(?:mW)?(?:/{_NUM}(?:mW)?)?(?=\s|$)"
)
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM"})
# A placeholder sensor: tegrastats prints PMIC@100C on boards that have none.
_PLACEHOLDER_ZONES = frozenset({"PMIC"})


def parse_line(line: str) -> AcceleratorReport | None:
    """One tegrastats line; None when it carries no field this parser knows."""
    text = _STAMP.sub("", line.strip())
    if not text:
        return None
    ram = _pair(_RAM, text)
    swap = _pair(_SWAP, text)
    iram = _pair(_IRAM, text)
    gpu = _engine(_GPU, text)
    emc = _engine(_EMC, text)
    power: dict[str, float] = {}
    average: dict[str, float] = {}
    for match in _RAIL.finditer(text):
        name = match.group(1)
        if name in _NOT_RAILS:
            continue
        power[name] = float(match.group(2))
        average[name] = float(match.group(3))
    temps = {
        m.group(1): float(m.group(2))
        for m in _TEMP.finditer(text)
        if m.group(1) not in _PLACEHOLDER_ZONES
    }
    report = AcceleratorReport(
        source="tegrastats",
        gpu_load_ratio=gpu[0],
        gpu_frequency_hz=gpu[1],
        emc_load_ratio=emc[0],
        emc_frequency_hz=emc[1],
        cpu=_cores(text),
        ram_used_mb=ram[0],
        ram_total_mb=ram[1],
        swap_used_mb=swap[0],
        swap_total_mb=swap[1],
        iram_used_kb=iram[0],
        iram_total_kb=iram[1],
        temperatures_c=temps,
        power_mw=power,
        power_average_mw=average,
    )
    if not report.has_figures():
        log.debug("tegrastats: no field recognised in %r", line[:200])
        return None
    return report


def _pair(pattern: re.Pattern[str], text: str) -> tuple[float | None, float | None]:
    match = pattern.search(text)
    if match is None:
        return None, None
    return float(match.group(1)), float(match.group(2))


def _engine(pattern: re.Pattern[str], text: str) -> tuple[float | None, float | None]:
    """(load ratio, clock in Hz) of GR3D or EMC; either may be absent."""
    match = pattern.search(text)
    if match is None:
        return None, None
    load = None if match.group(1) is None else int(match.group(1)) / 100
    clock: float | None = None
    if match.group(2) is not None:
        clock = int(match.group(2)) * MHZ
    elif match.group(3) is not None:
        # One clock per GPC: the engine runs as fast as its fastest one.
        clocks = [int(c) for c in match.group(3).split(",") if c]
        clock = max(clocks) * MHZ if clocks else None
    return load, clock


def _cores(text: str) -> tuple[CpuCore, ...]:
    match = _CPU.search(text)
    if match is None:
        return ()
    shared = None if match.group(2) is None else int(match.group(2)) * MHZ
    cores: list[CpuCore] = []
    for raw in match.group(1).split(","):
        entry = raw.strip()
        if entry == "off":
            cores.append(CpuCore(None, None))
            continue
        core = _CORE.match(entry)
        if core is None:
            log.debug("tegrastats: core entry %r not understood; cores dropped", entry)
            return ()
        clock = shared if core.group(2) is None else int(core.group(2)) * MHZ
        cores.append(CpuCore(int(core.group(1)) / 100, clock))
    return tuple(cores)

"""What a Jetson's /sys tells without tegrastats: GPU load and clock, zones, INA3221 rails.

Layouts (tests/agent/fixtures/jetson_sysfs/ keeps one tree per JetPack generation):

- GPU load, per mille: /sys/devices/gpu.0/load (Nano, TX2, JetPack 4) or
  /sys/devices/platform/gpu.0/load (Xavier, Orin, JetPack 5/6).
- GPU clock, Hz: /sys/class/devfreq/<gpu>/cur_freq, the devfreq device named for the
  GPU: 57000000.gpu (Nano), 17000000.gp10b (TX2), 17000000.gv11b (Xavier),
  17000000.ga10b or 17000000.gpu (Orin).
- Zones: /sys/class/thermal/thermal_zone*/type and temp (millidegrees).
- INA3221 rails, JetPack 4 (iio driver ina3221x): .../iio:device*/rail_name_N and
  in_power N_input (mW). JetPack 5/6 (hwmon driver ina3221): .../hwmon/hwmon*/inN_label,
  inN_input (mV) and currN_input (mA).

The EMC clock and load need debugfs (root): they are absent here, tegrastats has them.
A file that is missing, unreadable or garbled leaves its figure absent; nothing raises.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from agent.protocol.accelerator import AcceleratorReport

log = logging.getLogger(__name__)

GPU_LOAD_FILES = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load")
GPU_DEVFREQ = re.compile(r"^(?:[0-9a-f]+\.)?(?:gpu|gp10b|gv11b|ga10b)$")
# A rail INA3221 reports with nothing wired to it.
_UNWIRED = frozenset({"", "NC"})


def thermal_zones(root: Path) -> dict[str, float]:
    """°C per zone from <root>/thermal_zone*/ (type and millidegree temp)."""
    temps: dict[str, float] = {}
    try:
        zones = sorted(root.glob("thermal_zone*"))
    except OSError:
        return temps
    for zone in zones:
        milli = _int(zone / "temp")
        if milli is None:
            continue  # some zones refuse reads when their sensor is off
        kind = _text(zone / "type") or zone.name
        name = kind if kind not in temps else f"{kind}.{zone.name}"
        temps[name] = round(milli / 1000, 3)
    return temps


class JetsonSysfs:
    """Reads the files above under `root` ("/" on a device, a fixture tree in tests)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self._chips: list[Path] = []  # the INA3221s once found: a board's are soldered on

    def present(self) -> bool:
        """True when this looks like a Jetson: a GPU load file or an INA3221 exists."""
        # os.path.isfile: False, not a PermissionError, under an unsearchable root.
        if any(os.path.isfile(self.root / p) for p in GPU_LOAD_FILES):
            return True
        return bool(self._ina3221_dirs())

    def read(self) -> AcceleratorReport | None:
        if not self.present():
            return None
        load = None
        for relative in GPU_LOAD_FILES:
            per_mille = _int(self.root / relative)
            if per_mille is not None:
                load = per_mille / 1000
                break
        return AcceleratorReport(
            source="sysfs",
            gpu_load_ratio=load,
            gpu_frequency_hz=self._gpu_frequency(),
            temperatures_c=thermal_zones(self.root / "sys/class/thermal"),
            power_mw=self.rails(),
        )

    def _gpu_frequency(self) -> float | None:
        base = self.root / "sys/class/devfreq"
        try:
            devices = sorted(base.iterdir())
        except OSError:
            return None
        for device in devices:
            if GPU_DEVFREQ.match(device.name):
                hz = _int(device / "cur_freq")
                if hz is not None:
                    return float(hz)
        return None

    def _ina3221_dirs(self) -> list[Path]:
        """Listed until some are found (a driver binding late), then kept: every read
        (each /metrics scrape and telemetry report) asked twice before."""
        if self._chips:
            return self._chips
        drivers = self.root / "sys/bus/i2c/drivers"
        found: list[Path] = []
        for name in ("ina3221", "ina3221x"):
            try:
                found += sorted(p for p in (drivers / name).iterdir() if p.is_dir())
            except OSError:
                continue
        self._chips = found
        return found

    def rails(self) -> dict[str, float]:
        """mW per named rail, from every INA3221 found (hwmon or iio layout)."""
        rails: dict[str, float] = {}
        for chip in self._ina3221_dirs():
            for hwmon in sorted(chip.glob("hwmon/hwmon*")):
                rails.update(_hwmon_rails(hwmon))
            for iio in sorted(chip.glob("iio:device*")):
                rails.update(_iio_rails(iio))
        return rails


def _hwmon_rails(hwmon: Path) -> dict[str, float]:
    rails: dict[str, float] = {}
    for label_file in sorted(hwmon.glob("in*_label")):
        channel = label_file.name[2 : -len("_label")]
        label = _text(label_file)
        if label is None or label in _UNWIRED:
            continue
        millivolts = _int(hwmon / f"in{channel}_input")
        milliamps = _int(hwmon / f"curr{channel}_input")
        if millivolts is None or milliamps is None:
            log.debug("ina3221 %s: rail %s has no reading", hwmon, label)
            continue
        rails[label] = round(millivolts * milliamps / 1000, 3)
    return rails


def _iio_rails(iio: Path) -> dict[str, float]:
    rails: dict[str, float] = {}
    for name_file in sorted(iio.glob("rail_name_*")):
        channel = name_file.name[len("rail_name_") :]
        label = _text(name_file)
        if label is None or label in _UNWIRED:
            continue
        milliwatts = _int(iio / f"in_power{channel}_input")
        if milliwatts is None:
            log.debug("ina3221x %s: rail %s has no reading", iio, label)
            continue
        rails[label] = float(milliwatts)
    return rails


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(path: Path) -> int | None:
    text = _text(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        log.debug("%s: %r is not an integer", path, text[:40])
        return None

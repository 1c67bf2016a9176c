"""The /sys readers against trees with real Jetson layouts (fixtures/jetson_sysfs/SOURCE)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from agent.hardware.sysfs import JetsonSysfs
from agent.hardware.tegrastats import parse_line
from tests.agent.hardware.fake_tegrastats import SYSFS, TEGRASTATS


def tegrastats_line(name: str, index: int) -> str:
    return (TEGRASTATS / f"{name}.txt").read_text().splitlines()[index]


def test_nano_jetpack4_iio_rails_gpu_load_and_zones() -> None:
    report = JetsonSysfs(SYSFS / "nano-jp4").read()
    assert report is not None and report.source == "sysfs"
    assert report.gpu_load_ratio == 0.462  # per mille
    assert report.gpu_frequency_hz == 921_600_000  # the GPU's devfreq, not the EMC's
    assert report.temperatures_c["CPU-therm"] == 60.5
    assert report.temperatures_c["thermal-fan-est"] == 59.75
    # The same board's tegrastats line reads the same INA3221: the same rails, the same mW.
    line = parse_line(tegrastats_line("jetpack4-nano", 0))
    assert line is not None
    assert (
        report.power_mw == line.power_mw == {"POM_5V_IN": 4520, "POM_5V_GPU": 0, "POM_5V_CPU": 1078}
    )


def test_orin_jetpack6_hwmon_rails_are_volts_times_amps() -> None:
    report = JetsonSysfs(SYSFS / "orin-nano-jp6").read()
    assert report is not None
    assert report.gpu_load_ratio == 0.0
    assert report.gpu_frequency_hz == 624_750_000
    # in7 is the sum of shunt voltages (no current): not a rail.
    assert report.power_mw == {"VDD_IN": 4825.0, "VDD_CPU_GPU_CV": 520.0, "VDD_SOC": 1475.0}
    line = parse_line(tegrastats_line("jetpack6-orin-nano", 1))
    assert line is not None
    assert report.power_mw.keys() == line.power_mw.keys()
    for rail, mw in line.power_mw.items():
        assert abs(report.power_mw[rail] - mw) <= 0.01 * mw + 1, rail
    assert report.temperatures_c["tj-thermal"] == line.temperatures_c["tj"] == 50.25


def test_not_a_jetson_reads_nothing(tmp: Path) -> None:
    sysfs = JetsonSysfs(tmp)
    assert not sysfs.present() and sysfs.read() is None
    assert JetsonSysfs(Path("/nonexistent-root")).read() is None


def test_garbled_or_missing_files_leave_their_figure_absent(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp / "root"
    shutil.copytree(SYSFS / "orin-nano-jp6", root)
    (root / "sys/devices/platform/gpu.0/load").write_text("busy\n")
    hwmon = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    (hwmon / "curr2_input").write_text("")
    (hwmon / "in3_input").unlink()
    (root / "sys/class/devfreq/17000000.ga10b/cur_freq").write_bytes(b"\xff\xfe")
    (root / "sys/class/thermal/thermal_zone0/temp").write_text("-")
    with caplog.at_level(logging.DEBUG, logger="agent.hardware.sysfs"):
        report = JetsonSysfs(root).read()
    assert report is not None
    assert report.gpu_load_ratio is None and report.gpu_frequency_hz is None
    assert report.power_mw == {"VDD_IN": 4825.0}
    assert "cpu-thermal" not in report.temperatures_c and "tj-thermal" in report.temperatures_c
    assert caplog.records and all(r.levelno == logging.DEBUG for r in caplog.records)

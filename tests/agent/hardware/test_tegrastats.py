"""tegrastats lines of several JetPack releases, captured on real Jetsons (see *.SOURCE)."""

from __future__ import annotations

import logging

import pytest

from agent.hardware.tegrastats import parse_line
from agent.protocol.accelerator import AcceleratorReport, CpuCore
from tests.agent.hardware.fake_tegrastats import TEGRASTATS

MHZ = 1_000_000.0


def lines(name: str) -> list[str]:
    return [line for line in (TEGRASTATS / f"{name}.txt").read_text().splitlines() if line]


def parsed(name: str, index: int = 0) -> AcceleratorReport:
    report = parse_line(lines(name)[index])
    assert report is not None
    return report


def test_every_fixture_has_its_source_and_parses() -> None:
    fixtures = sorted(TEGRASTATS.glob("*.txt"))
    assert len(fixtures) >= 5
    for path in fixtures:
        source = path.with_suffix(".SOURCE").read_text()
        assert "http" in source and "jetpack" in source.lower(), path.name
        for line in lines(path.stem):
            report = parse_line(line)
            assert report is not None, line
            assert report.source == "tegrastats"
            assert report.gpu_load_ratio is not None, line  # every release prints GR3D
            assert report.ram_total_mb is not None and report.cpu, line


def test_jetpack3_tx1_old_names_and_one_clock_for_all_cores() -> None:
    r = parsed("jetpack3-tx1")
    assert (r.ram_used_mb, r.ram_total_mb) == (3468, 3983)
    assert (r.swap_used_mb, r.swap_total_mb) == (873, 8192)
    assert [c.load_ratio for c in r.cpu] == [0.17, 0.13, 0.29, 0.05]
    assert {c.frequency_hz for c in r.cpu} == {408 * MHZ}
    assert (r.emc_load_ratio, r.emc_frequency_hz) == (0.01, 408 * MHZ)
    assert (r.gpu_load_ratio, r.gpu_frequency_hz) == (0.03, 76 * MHZ)
    assert r.temperatures_c == {} and r.power_mw == {}
    second = parsed("jetpack3-tx1", 1)
    assert (second.gpu_load_ratio, second.emc_frequency_hz) == (0.39, 1600 * MHZ)
    assert {c.frequency_hz for c in second.cpu} == {1734 * MHZ}


def test_jetpack4_nano_rails_without_unit_iram_and_zones() -> None:
    r = parsed("jetpack4-nano")
    assert (r.ram_used_mb, r.ram_total_mb, r.iram_used_kb, r.iram_total_kb) == (1180, 3965, 0, 252)
    assert r.cpu == tuple(CpuCore(x, 1036 * MHZ) for x in (0.30, 0.33, 0.28, 0.26))
    assert (r.emc_load_ratio, r.emc_frequency_hz) == (0.10, 1600 * MHZ)
    assert (r.gpu_load_ratio, r.gpu_frequency_hz) == (0.0, 76 * MHZ)
    # PMIC@100C is a placeholder tegrastats prints on boards without that sensor.
    assert r.temperatures_c == {"PLL": 57, "CPU": 60.5, "GPU": 59, "AO": 65, "thermal": 59.75}
    assert r.power_mw == {"POM_5V_IN": 4520, "POM_5V_GPU": 0, "POM_5V_CPU": 1078}
    assert r.power_average_mw == {"POM_5V_IN": 4680, "POM_5V_GPU": 0, "POM_5V_CPU": 1205}
    # NVENC 716 / APE 25 are clocks, not rails.
    idle = parsed("jetpack4-nano", 1)
    assert (idle.emc_load_ratio, idle.emc_frequency_hz) == (0.0, None)
    assert (idle.gpu_load_ratio, idle.gpu_frequency_hz) == (0.0, None)


def test_jetpack4_tx2_vdd_sys_rails_and_no_swap() -> None:
    r = parsed("jetpack4-tx2")
    assert (r.swap_used_mb, r.swap_total_mb) == (None, None)
    assert len(r.cpu) == 6 and {c.frequency_hz for c in r.cpu} == {345 * MHZ}
    assert r.power_mw == {
        "VDD_SYS_GPU": 153,
        "VDD_SYS_SOC": 536,
        "VDD_4V0_WIFI": 633,
        "VDD_IN": 3140,
        "VDD_SYS_CPU": 536,
        "VDD_SYS_DDR": 557,
    }
    assert r.temperatures_c["BCPU"] == 42.5 and r.temperatures_c["Tdiode"] == 41.25


def test_jetpack4_agx_xavier_rails_named_like_zones() -> None:
    r = parsed("jetpack4-agx-xavier")
    assert len(r.cpu) == 8
    assert r.power_mw == {"GPU": 463, "CPU": 618, "SOC": 2936, "CV": 0, "VDDRQ": 309, "SYS5V": 3306}
    assert r.temperatures_c["GPU"] == 30.5 and r.temperatures_c["CPU"] == 31.5


def test_jetpack6_orin_nano_date_prefix_gpc_clocks_and_mw_units() -> None:
    r = parsed("jetpack6-orin-nano")
    assert (r.ram_used_mb, r.ram_total_mb, r.swap_used_mb) == (6185, 7620, 851)
    assert (r.emc_load_ratio, r.emc_frequency_hz) == (0.43, 2133 * MHZ)
    assert (r.gpu_load_ratio, r.gpu_frequency_hz) == (0.63, 621 * MHZ)
    assert r.temperatures_c == {
        "cpu": 53.968,
        "soc2": 52.437,
        "soc0": 50.75,
        "gpu": 53.343,
        "tj": 53.968,
        "soc1": 51.656,
    }
    assert r.power_mw == {"VDD_IN": 12479, "VDD_CPU_GPU_CV": 4667, "VDD_SOC": 2817}
    # Two cores powered down, and one average printed without its unit.
    third = parsed("jetpack6-orin-nano", 2)
    assert [c.load_ratio for c in third.cpu] == [0.01, 0.0, 0.0, 0.0, None, None]
    assert third.cpu[4] == CpuCore(None, None)
    assert third.power_average_mw["VDD_CPU_GPU_CV"] == 598


def test_jetpack7_agx_orin_now_max_zones_and_now_avg_max_rails() -> None:
    r = parsed("jetpack7-agx-orin")
    assert (r.ram_used_mb, r.ram_total_mb, r.swap_total_mb) == (20642, 62817, None)
    assert len(r.cpu) == 12 and {c.frequency_hz for c in r.cpu} == {2201 * MHZ}
    assert (r.emc_load_ratio, r.emc_frequency_hz) == (0.03, 3199 * MHZ)
    assert (r.gpu_load_ratio, r.gpu_frequency_hz) == (0.12, 1300 * MHZ)
    assert r.temperatures_c == {"cpu": 52.968, "soc2": 48.406, "soc0": 49.531, "gpu": 47.625}
    assert r.power_mw == {"VDD_GPU_SOC": 5139, "VDD_CPU_CV": 3268, "VIN_SYS_5V0": 5500}
    assert r.power_average_mw == r.power_mw


def test_later_formats_keep_the_current_value() -> None:
    # The Orin Nano line given JetPack 7's `now/max` zones and `now/avg/max` rails with
    # values that differ (the captured JetPack 7 line has them all equal).
    line = lines("jetpack6-orin-nano")[1]
    line = line.replace("tj@50.25C", "tj@50.25C/51.5C").replace(
        "VDD_IN 4824mW/4824mW", "VDD_IN 4824mW/4800mW/5100mW"
    )
    line = line.replace("GR3D_FREQ 0%", "GR3D_FREQ 7%@[1300,1020]")
    r = parse_line(line)
    assert r is not None
    assert r.temperatures_c["tj"] == 50.25
    assert (r.power_mw["VDD_IN"], r.power_average_mw["VDD_IN"]) == (4824, 4800)
    assert (r.gpu_load_ratio, r.gpu_frequency_hz) == (0.07, 1300 * MHZ)


def test_thor_gpu_clock_without_a_load() -> None:
    # The form jetson_stats tests for Thor (jtop/tests/test_06_tegra_parse.py, PR 894);
    # not a line captured on a Thor.
    r = parse_line(
        "RAM 4722/7844MB (lfb 1x512kB) EMC_FREQ 2%@1866 GR3D_FREQ @[1000,1000,1000] APE 150"
    )
    assert r is not None
    assert (r.gpu_load_ratio, r.gpu_frequency_hz) == (None, 1000 * MHZ)
    assert (r.emc_load_ratio, r.emc_frequency_hz) == (0.02, 1866 * MHZ)


@pytest.mark.parametrize(
    "garbage",
    ["", "   ", "garbage", "RAM only", "\x00\xff\ufffd" * 50, "x" * 100_000, "@@@ %%% ///"],
    ids=["empty", "blank", "word", "ram-only", "binary", "huge", "symbols"],
)
def test_a_line_with_nothing_known_gives_none(
    garbage: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="agent.hardware.tegrastats"):
        assert parse_line(garbage) is None
    assert all(r.levelno <= logging.DEBUG for r in caplog.records)


def test_a_garbled_field_is_absent_and_the_others_are_kept() -> None:
    line = lines("jetpack4-nano")[0]
    truncated = parse_line(line[: line.index("SWAP") + len("SWAP 149/10")])
    assert truncated is not None
    assert truncated.ram_used_mb == 1180 and truncated.swap_total_mb is None
    assert truncated.gpu_load_ratio is None and truncated.power_mw == {}
    broken = parse_line(
        line.replace("GR3D_FREQ 0%@76", "GR3D_FREQ x%@76").replace("26%@1036", "2?%@1036")
    )
    assert broken is not None
    assert broken.gpu_load_ratio is None and broken.gpu_frequency_hz is None
    assert broken.cpu == ()  # one core not understood: no half list of cores
    assert broken.emc_load_ratio == 0.10 and broken.power_mw["POM_5V_IN"] == 4520


def test_the_report_round_trips_through_its_wire_form() -> None:
    for name in ("jetpack3-tx1", "jetpack4-nano", "jetpack6-orin-nano"):
        report = parsed(name)
        assert AcceleratorReport.from_json(report.to_json()) == report


@pytest.mark.parametrize(
    ("accelerator", "field"),
    [
        ("jetson", '"accelerator" must be an object'),
        ({"gpu_load_ratio": 0.5}, "accelerator.source"),
        ({"source": "tegrastats", "gpu_load_ratio": "high"}, "accelerator.gpu_load_ratio"),
        ({"source": "tegrastats", "power_mw": {"VDD_IN": True}}, "accelerator.power_mw.VDD_IN"),
        ({"source": "tegrastats", "cpu": [1]}, "accelerator.cpu[0]"),
        ({"source": "tegrastats", "temperatures_c": []}, "accelerator.temperatures_c"),
    ],
)
def test_a_console_refuses_a_malformed_block_naming_the_field(
    accelerator: object, field: str
) -> None:
    from agent.protocol.messages import Code, ProtocolError, TelemetryMessage

    body = {
        "device_id": "d",
        "seq": 1,
        "ts": 1.0,
        "interval_s": 1.0,
        "inference": {},
        "system": {},
        "model": None,
        "outbox": {},
        "accelerator": accelerator,
    }
    with pytest.raises(ProtocolError) as caught:
        TelemetryMessage.from_json(body)
    assert caught.value.code == Code.MALFORMED and field in caught.value.message
    body["accelerator"] = parsed("jetpack4-nano").to_json()
    message = TelemetryMessage.from_json(body)
    assert message.accelerator == parsed("jetpack4-nano")
    assert TelemetryMessage.from_json(message.to_json()) == message

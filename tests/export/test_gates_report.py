"""Gates say which gate, where and by how much; the report renders whatever was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.pipeline.errors import GateError
from export.pipeline.gates import Gates
from export.pipeline.report import markdown, write_reports


def test_cosine_gate_names_stage_and_shortfall() -> None:
    gates = Gates("embedding", max_accuracy_drop=1.0, min_cosine=0.99)
    assert gates.check("onnx float", 0.9999).passed
    with pytest.raises(GateError) as err:
        gates.check("onnx int8", 0.9624)
    assert (err.value.gate, err.value.stage) == ("cosine", "onnx int8")
    assert "mean cosine to the teacher 0.9624 is 0.0276 below gates.min_cosine = 0.9900" in str(
        err.value
    )
    assert [r.passed for r in gates.results] == [True, False]


def test_accuracy_gate_at_the_exact_budget_passes() -> None:
    gates = Gates("classification", max_accuracy_drop=1.0, min_cosine=0.0)
    gates.set_baseline(98.0)
    assert gates.check("onnx int8", 97.0).passed
    with pytest.raises(
        GateError, match=r"1.50 points below the teacher's 98.00%.*exceeded by 0.50"
    ):
        gates.check("tflite int8", 96.5)


def test_a_soft_failure_raised_later_says_what_check_would_have_said() -> None:
    gates = Gates("classification", max_accuracy_drop=1.0, min_cosine=0.0)
    gates.set_baseline(98.0)
    with pytest.raises(GateError) as direct:
        gates.check("onnx int8", 96.5)
    soft = gates.check("onnx int8", 96.5, soft=True)
    assert not soft.passed
    with pytest.raises(GateError) as later:
        gates.raise_for(soft)
    assert str(later.value) == str(direct.value) and "exceeded by 0.50" in str(later.value)
    # The report's gate rows are what they were: the message is the error's, not a field.
    assert set(soft.to_json()) == {"gate", "stage", "value", "limit", "passed", "detail"}


def _report(stages: list[dict]) -> dict:
    return {
        "name": "m", "version": "1.0.0", "task": "classification", "stages": stages,
        "selected": {"onnx": "onnx int8"}, "gates": [], "notes": ["a note"],
    }  # fmt: skip


def test_reports_are_written_with_and_without_measurements(tmp_path: Path) -> None:
    lat = {"p50": 0.5, "p99": 0.9}
    rows = [
        {"stage": "teacher", "format": "torch", "metric": 97.0, "params": 1000},
        {"stage": "onnx float", "format": "onnx", "metric": 97.0, "size_bytes": 4000,
         "latency_ms": lat},
        {"stage": "onnx int8", "format": "onnx", "metric": 96.5, "size_bytes": 1000,
         "latency_ms": {"p50": 0.3, "p99": 0.4}},
    ]  # fmt: skip
    paths = write_reports(_report(rows), tmp_path / "a")
    assert json.loads(paths["report.json"].read_text())["stages"][2]["metric"] == 96.5
    md = paths["report.md"].read_text()
    assert "| onnx int8 | onnx | 96.50% |" in md and "| yes |" in md and "- a note" in md
    assert paths["report.png"].read_bytes()[:4] == b"\x89PNG"
    # Nothing measured (e.g. a failed latency step): still a valid plot and table.
    empty = write_reports(_report(rows[:1]), tmp_path / "b")
    assert empty["report.png"].stat().st_size > 1000
    assert "| teacher | torch | 97.00% | 1,000 |" in markdown(_report(rows[:1]))

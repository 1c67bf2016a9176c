"""The golden tolerance rule (agent.tolerance): its wire form, its bounds and its judgement.

The numbers that matter come from real runs (tests/export/test_golden_rule.py);
here the rule's own logic: layering, refusals naming the field and range, NaN,
top-1 with ties, and the widening for GPU families an older bundle does not name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent.bundle_errors import SchemaError
from agent.tolerance import (
    DEFAULT_FAMILIES,
    Bound,
    OutputRule,
    Tolerance,
    allowance_problem,
    compare,
    parse_tolerance,
)

W = "golden.tolerance"
LOGITS = np.array([[10.0, 2.0, -3.0], [0.0, 5.0, 4.9], [-1.0, -2.0, 8.0]])


def test_absent_and_legacy_forms_keep_their_meaning() -> None:
    assert parse_tolerance(None, W) == Tolerance(atol=1e-4, rtol=1e-3)
    rule = parse_tolerance({"atol": 0.01, "rtol": 0.0}, W)
    assert (rule.atol, rule.rtol) == (0.01, 0.0)
    assert not rule.families and not rule.outputs and not rule.top1 and not rule.formats
    # The CPU rule of a legacy bundle is what it says, nothing more.
    assert rule.resolve("logits", "cpu", LOGITS).allowance == 0.01


def test_the_full_form_round_trips() -> None:
    raw: dict[str, Any] = {
        "atol": 0.3, "rtol": 0.0,
        "families": {"cuda": {"atol": 0.02}},
        "outputs": {"logits": {"quant_step": 0.125, "max_steps": 2,
                               "families": {"tensorrt": {"max_steps": 6}}}},
        "top1": {"logits": 1.0},
        "formats": {"tflite": {"atol": 1e-3, "rtol": 0.0}},
    }  # fmt: skip
    rule = parse_tolerance(raw, W, outputs=["logits"], formats=["onnx", "tflite"])
    assert parse_tolerance(rule.to_json(), W, ["logits"], ["onnx", "tflite"]) == rule
    assert rule.for_format("tflite").atol == 1e-3 and rule.for_format("onnx") is rule


def test_layers_from_top_to_output_family() -> None:
    rule = Tolerance(
        atol=0.5,
        rtol=0.0,
        families={"cuda": Bound(atol=0.7)},
        outputs={
            "logits": OutputRule(0.125, Bound(max_steps=2.0), {"tensorrt": Bound(max_steps=6.0)})
        },
    )
    # cpu: max(atol 0.5, 2 steps of 0.125)
    assert rule.resolve("logits", "cpu", LOGITS).allowance == 0.5
    assert rule.resolve("logits", "cuda", LOGITS).allowance == 0.7
    # 6 steps, and half a step for the rounding of the float outputs on the grid
    assert rule.resolve("logits", "tensorrt", LOGITS).allowance == 0.8125
    assert rule.resolve("other", "cuda", LOGITS).allowance == 0.7
    # An unknown family gets the CPU rule: strict, not lax.
    assert rule.resolve("logits", "rocm", LOGITS).allowance == 0.5


def test_a_family_the_bundle_does_not_name_is_widened_never_narrowed() -> None:
    legacy = Tolerance(atol=1e-3, rtol=1e-3)
    span = float(LOGITS.max() - LOGITS.min())
    cuda = legacy.resolve("logits", "cuda", LOGITS)
    share = DEFAULT_FAMILIES["cuda"].range_share
    assert share is not None and cuda.allowance == pytest.approx(share * span)
    assert cuda.rtol == 1e-3
    wide = Tolerance(atol=0.5, rtol=0.0)
    assert wide.resolve("logits", "cuda", LOGITS).allowance == 0.5  # the larger stands
    # Named by the bundle (even only for one output), the builder's number rules.
    named = Tolerance(atol=1e-3, outputs={"logits": OutputRule(None, Bound(),
                                                               {"cuda": Bound(atol=2e-3)})})  # fmt: skip
    assert named.resolve("logits", "cuda", LOGITS).allowance == 2e-3


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        ([0.1], r"field golden.tolerance is list, expected an object"),
        ({"atol": -1e-9}, r"golden.tolerance.atol is -1e-09; it must be a finite number in \[0, 1e\+06\]"),
        ({"atol": "0.001"}, r"field golden.tolerance.atol is str, expected a number"),
        ({"atol": True}, r"golden.tolerance.atol is bool"),
        ({"rtol": 0.2}, r"golden.tolerance.rtol is 0.2; .* in \[0, 0.1\]"),
        ({"tol": 1}, r"golden.tolerance has unknown field 'tol'; allowed: atol, families"),
        ({"families": {"cuda": {"atol": 1e400}}}, r"golden.tolerance.families.cuda.atol is inf"),
        ({"families": {"CUDA": {}}}, r"names family 'CUDA'; a family is 1-32 lowercase"),
        ({"families": {f"f{i}": {} for i in range(17)}}, r"names 17 families; the cap is 16"),
        ({"families": {"cuda": {"steps": 2}}}, r"families.cuda has unknown field 'steps'"),
        ({"outputs": {"probs": {}}}, r"outputs names 'probs', which is not an output of the model \(logits\)"),
        ({"outputs": {"logits": {"quant_step": 0}}}, r"logits.quant_step is 0; .* in \(0, 1e\+06\]"),
        ({"outputs": {"logits": {"max_steps": 65}}}, r"logits.max_steps is 65; .* in \[0, 64\]"),
        ({"outputs": {"logits": {"range_share": 0.06}}}, r"logits.range_share is 0.06; .* in \[0, 0.05\]"),
        ({"outputs": {"logits": {"families": {"cuda": {"max_steps": -1}}}}}, r"logits.families.cuda.max_steps is -1"),
        ({"top1": {"logits": 0.4}}, r"golden.tolerance.top1.logits is 0.4; .* in \[0.5, 1\]"),
        ({"top1": {"probs": 1.0}}, r"top1 names 'probs', which is not an output"),
        ({"formats": {"tflite": {}}}, r"formats names 'tflite', which is not a format of this bundle \(onnx\)"),
        ({"formats": {"onnx": {"formats": {"onnx": {}}}}}, r"formats.onnx.formats names 'onnx'"),
        ({"formats": {"onnx": {"rtol": 1}}}, r"golden.tolerance.formats.onnx.rtol is 1"),
    ],
)  # fmt: skip
def test_refusals_name_the_field_and_its_range(raw: Any, pattern: str) -> None:
    with pytest.raises(SchemaError, match=pattern):
        parse_tolerance(raw, W, outputs=["logits"], formats=["onnx"])


def test_a_rule_wider_than_the_outputs_is_refused_on_every_family() -> None:
    refs = {"logits": LOGITS}  # peak 10: at most 1.0 may be allowed
    assert allowance_problem(Tolerance(atol=1.0), refs) is None
    problem = allowance_problem(Tolerance(atol=1.01), refs)
    assert problem is not None and "move by 1.01 on cpu, above 1" in problem
    lax_gpu = Tolerance(atol=1e-3, families={"tensorrt": Bound(range_share=0.05)})
    problem = allowance_problem(lax_gpu, refs)  # 5% of a span of 13 is 0.65: fine
    assert problem is None
    steps = Tolerance(outputs={"logits": OutputRule(0.5, Bound(max_steps=3.0))})
    problem = allowance_problem(steps, refs)
    assert problem is not None and "move by 1.75 on cpu" in problem  # 3.5 steps
    # Outputs that are all near zero may still be allowed the floor.
    assert allowance_problem(Tolerance(atol=1e-3), {"x": np.zeros(4)}) is None


def test_compare_reports_and_refuses_beyond_the_bound() -> None:
    rule = Tolerance(atol=0.0, rtol=0.0, outputs={"logits": OutputRule(0.25, Bound(max_steps=2.0))})
    ok = compare(rule, "cpu", {"logits": LOGITS}, {"logits": LOGITS + 0.5})
    assert ok.ok and ok.outputs["logits"].steps == 2.0 and ok.outputs["logits"].allowance == 0.625
    bad = compare(rule, "cpu", {"logits": LOGITS}, {"logits": LOGITS + 0.75})
    assert not bad.ok
    assert bad.failures == [
        "logits: max abs diff 0.75 exceeds the cpu bound 0.625 at 9 of 9 values "
        "(3 quantization steps of 0.25, 2 allowed)"
    ]
    assert bad.max_abs_diff == {"logits": pytest.approx(0.75)}


def test_nan_missing_and_misshapen_outputs_fail() -> None:
    rule = Tolerance(atol=1.0)
    nan = LOGITS.copy()
    nan[1, 1] = np.nan
    report = compare(rule, "cpu", {"logits": LOGITS}, {"logits": nan})
    assert not report.ok and "1 NaN output value(s)" in report.failures[0]
    all_nan = compare(rule, "cpu", {"logits": LOGITS}, {"logits": np.full_like(LOGITS, np.nan)})
    assert not all_nan.ok and np.isnan(all_nan.outputs["logits"].max_abs_diff)
    assert compare(rule, "cpu", {"logits": LOGITS}, {}).failures == [
        "logits: not produced by the model"
    ]
    shaped = compare(rule, "cpu", {"logits": LOGITS}, {"logits": LOGITS[:2]})
    assert shaped.failures == ["logits: shape [2, 3], expected [3, 3]"]


def test_top1_catches_swapped_labels_and_forgives_ties_within_the_bound() -> None:
    rule = Tolerance(atol=0.6, rtol=0.0, top1={"logits": 1.0})
    swapped = LOGITS[:, [1, 0, 2]]  # labels 0 and 1 swapped
    report = compare(rule, "cpu", {"logits": LOGITS}, {"logits": swapped})
    assert report.failures[1:] == [
        "logits: top-1 agrees on 1 of 3 golden cases (33%); the rule asks for 100%"
    ]
    # Case 0's top two are 1.0 apart; each moves 0.55 (within 0.6) and they trade
    # places: every value passes, the answer changed, and that fails.
    against = np.array([[2.45, 2.55, -3.0]])
    report = compare(rule, "cpu", {"logits": np.array([[3.0, 2.0, -3.0]])}, {"logits": against})
    assert report.failures == [
        "logits: top-1 agrees on 0 of 1 golden cases (0%); the rule asks for 100%"
    ]
    # Case 1's reference ranks 5.0 and 4.9 within one bound of each other: either
    # answer is right, so a run that swaps them by moving each 0.06 agrees.
    tie = LOGITS.copy()
    tie[1, 1], tie[1, 2] = 4.94, 4.96
    report = compare(rule, "cpu", {"logits": LOGITS}, {"logits": tie})
    assert report.ok and report.outputs["logits"].top1 == 1.0
    assert compare(Tolerance(top1={"x": 1.0}), "cpu", {"x": np.ones((3, 1))},
                   {"x": np.ones((3, 1))}).failures == ["x: top1 is asked for but the output has no class axis"]  # fmt: skip


def test_a_share_below_one_allows_that_many_disagreements() -> None:
    rule = Tolerance(atol=0.6, rtol=0.0, top1={"logits": 0.5})
    against = np.array([[2.45, 2.55, -3.0], [0.0, 5.0, 4.0]])
    want = np.array([[3.0, 2.0, -3.0], [0.0, 5.0, 4.0]])
    assert compare(rule, "cpu", {"logits": want}, {"logits": against}).ok  # 1 of 2 agrees


def test_an_output_judged_by_relative_l2_error_per_case() -> None:
    rng = np.random.default_rng(0)
    want = rng.normal(size=(4, 64))
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    rule = Tolerance(atol=1e-3, outputs={"e": OutputRule(None, Bound(norm_rtol=0.1))})
    # Every value moved by far more than atol, yet each case's direction holds: passes.
    noise = rng.normal(size=want.shape)
    close = want + 0.05 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    report = compare(rule, "cpu", {"e": want}, {"e": close})
    assert report.ok and report.outputs["e"].norm_error == pytest.approx(0.05)
    # One case pointing elsewhere fails, named by its relative error.
    far = close.copy()
    far[2] = -want[2]
    report = compare(rule, "cpu", {"e": want}, {"e": far})
    assert report.failures == ["e: relative L2 error 2 exceeds the cpu bound 0.1 in 1 of 4 cases"]
    nan = close.copy()
    nan[0, 0] = np.nan
    assert not compare(rule, "cpu", {"e": want}, {"e": nan}).ok
    # Such an output is exempt from the elementwise cap, bounded by its own field instead.
    assert allowance_problem(rule, {"e": want}) is None
    with pytest.raises(SchemaError, match=r"norm_rtol is 0.3; .* in \[0, 0.25\]"):
        parse_tolerance({"outputs": {"e": {"norm_rtol": 0.3}}}, W)

"""The golden tolerance rule: how far a correct model's outputs may move on this device.

A bundle's golden outputs were computed on the build machine's CPU. The device runs
the same model through other kernels, and how far a *correct* model may then land
depends on what those kernels compute, which is the runtime's *family*
(`Runtime.family()`): "cpu", "cuda", "tensorrt". docs/DESIGN.md ("Golden tolerance")
gives the reasoning; in short:

- float32 on any CPU differs by rounding only (summation order, FMA, vector width):
  a small absolute bound scaled by the output's magnitude (`atol`, `rtol`);
- CUDA computes float convolutions and matrix products in TF32 and TensorRT in FP16,
  both a 10-bit mantissa: the error is relative to the output's magnitude, not to
  each value, so it is a share of the reference output's range (`range_share`);
- an INT8 output moves in whole quantization steps (the scale of its last
  DequantizeLinear, `quant_step`): CPU integer kernels and a GPU's float QDQ round
  intermediate tensors differently and a flipped step propagates; the bound is a
  number of steps (`max_steps`);
- for classifiers, the decision must not change (`top1`): the share of golden cases
  whose arg-max agrees, counting a case whose reference's top two classes are within
  the bound of each other as agreeing (either answer is then correct).

The rule is written by the builder (export/golden_rule.py derives and self-checks
it) and read here, by `parse_tolerance`, from the manifest's
`golden.tolerance` object:

    {"atol": 1e-4, "rtol": 1e-3,                      # every output on the CPU
     "families": {"cuda": {"range_share": 0.004}},    # overrides per family
     "outputs": {"logits": {"quant_step": 0.12, "max_steps": 2,
                            "families": {"cuda": {"max_steps": 4}}}},
     "top1": {"logits": 1.0}}

For a family the bundle does not name, the built-in bound of `DEFAULT_FAMILIES` is
laid over the CPU rule (older bundles carry a CPU rule only and must still validate
on a GPU); an unknown family gets the CPU rule alone, which is strict, not lax.
`compare` is the one comparison used by the device (agent.golden), `edge-export
package` and the build pipeline's gates.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from agent.bundle_errors import SchemaError
from agent.names import shown
from agent.schema_numbers import bounded_number

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3

# Bounds on every number of the rule. A rule wider than the outputs it compares lets
# anything pass: the absolute allowance it gives an output is also bounded by that
# output's own magnitude when the references are read (`allowance_problem`).
MAX_ATOL = 1e6
MAX_RTOL = 0.1
MAX_STEPS = 64.0  # an int8 output spans 256 steps: 64 of them is a quarter of its range
MAX_QUANT_STEP = 1e6
MAX_RANGE_SHARE = 0.05  # of max - min of the reference: at most 10% of its peak magnitude
MAX_NORM_RTOL = 0.25  # a case's relative L2 error: a cosine of about 0.97 for unit vectors
MIN_TOP1 = 0.5  # below a coin flip's agreement the check would check nothing
MAX_FAMILIES = 16
MAX_FAMILY_NAME = 32
ALLOWANCE_FLOOR = 1e-3  # always allowed, however small the outputs
ALLOWANCE_SHARE = 0.1  # of the largest reference magnitude

# 2**-10: the unit of the last place of a 10-bit mantissa (TF32 and FP16).
EPS_10BIT = 2.0**-10


@dataclass(frozen=True)
class Bound:
    """One layer of the rule; a field left None takes the value of the layer below."""

    atol: float | None = None
    rtol: float | None = None
    max_steps: float | None = None  # in quant_step units; ignored for outputs without one
    range_share: float | None = None  # of max - min of the reference output
    # Judge each case by its relative L2 error over the last axis instead of value by
    # value (an embedding's direction): for outputs whose correct runs already move
    # some values by more than an elementwise bound may allow.
    norm_rtol: float | None = None

    def over(self, base: Bound) -> Bound:
        """This layer laid over `base`: each field set here wins."""
        return Bound(
            **{
                f.name: getattr(self, f.name)
                if getattr(self, f.name) is not None
                else getattr(base, f.name)
                for f in fields(self)
            }
        )

    def widened(self, other: Bound) -> Bound:
        """Each field the larger of this layer's and `other`'s (None: absent)."""
        values: dict[str, float] = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            present = [v for v in (mine, theirs) if v is not None]
            if present:
                values[f.name] = max(present)
        return Bound(**values)

    def to_json(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)
                is not None}  # fmt: skip


# What a family computes differently from the build machine's CPU, for bundles whose
# rule does not name it (docs/DESIGN.md "Golden tolerance" derives the numbers): TF32
# on CUDA and FP16 on TensorRT keep 10 mantissa bits, so a product carries a relative
# error of up to 2**-11 and an output built from layers of them some share of
# 2**-10 of its range: the sample measured 0.00856 on logits spanning 56 on an H200
# (0.16 of those ulps). Such a bundle states no quantization step either, and an INT8
# output spanning its whole range moves in steps of range/255, about 4 of these ulps:
# 8 ulps on CUDA let a correct INT8 model move by two steps, 16 on TensorRT by four
# (FP16 also rounds every activation it stores).
DEFAULT_FAMILIES: Mapping[str, Bound] = {
    "cuda": Bound(range_share=8 * EPS_10BIT, max_steps=4.0),
    "tensorrt": Bound(range_share=16 * EPS_10BIT, max_steps=8.0),
}


@dataclass(frozen=True)
class OutputRule:
    """What the rule says of one output: its quantization step and its own layers."""

    quant_step: float | None = None
    bound: Bound = field(default_factory=Bound)
    families: Mapping[str, Bound] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.bound.to_json())
        if self.quant_step is not None:
            out["quant_step"] = self.quant_step
        if self.families:
            out["families"] = {k: v.to_json() for k, v in sorted(self.families.items())}
        return out


@dataclass(frozen=True)
class Resolved:
    """The concrete bound for one output on one family, once the references are known."""

    allowance: float  # the absolute part: max(atol, (max_steps + 0.5) * quant_step, share * range)
    rtol: float
    quant_step: float | None
    max_steps: float | None
    range_share: float | None
    norm_rtol: float | None = None

    def describe(self) -> str:
        parts = [f"{self.allowance:.3g}"]
        if self.rtol:
            parts.append(f"rtol {self.rtol:g} x |reference|")
        return " + ".join(parts)


@dataclass(frozen=True)
class Tolerance:
    """A bundle's golden tolerance rule (docs/DESIGN.md, "Golden tolerance")."""

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    families: Mapping[str, Bound] = field(default_factory=dict)
    outputs: Mapping[str, OutputRule] = field(default_factory=dict)
    top1: Mapping[str, float] = field(default_factory=dict)
    # A whole rule per model format, for bundles whose formats differ in kind (an INT8
    # ONNX beside a float TFLite); the rule above is then the widest of them, which
    # agents that predate per-format rules apply.
    formats: Mapping[str, Tolerance] = field(default_factory=dict)

    def for_format(self, fmt: str) -> Tolerance:
        """The rule that judges the golden outputs of format `fmt`."""
        return self.formats.get(fmt, self)

    def layer(self, output: str, family: str) -> tuple[Bound, float | None]:
        """The bound fields for `output` on `family`, and the output's quant step.

        Layers, each field of a later one winning: the top-level rule, `families`,
        the output's own fields, the output's `families`. When the rule names the
        family nowhere, the built-in bound of DEFAULT_FAMILIES widens the result
        (field by field, the larger): it never narrows what the builder wrote.
        """
        bound = Bound(atol=self.atol, rtol=self.rtol)
        named = family in self.families
        if named:
            bound = self.families[family].over(bound)
        rule = self.outputs.get(output)
        step = None
        if rule is not None:
            step = rule.quant_step
            bound = rule.bound.over(bound)
            if family in rule.families:
                named = True
                bound = rule.families[family].over(bound)
        default = DEFAULT_FAMILIES.get(family)
        if default is not None and not named:
            bound = bound.widened(default)
        return bound, step

    def resolve(self, output: str, family: str, reference: np.ndarray) -> Resolved:
        bound, step = self.layer(output, family)
        allowance = bound.atol or 0.0
        if step is not None and bound.max_steps is not None:
            # Differences of a quantized output are whole steps; half a step more makes
            # "at most k steps" immune to the float32 rounding of k * step.
            allowance = max(allowance, (bound.max_steps + 0.5) * step)
        if bound.range_share is not None and reference.size:
            ref = reference.astype(np.float64)
            allowance = max(allowance, bound.range_share * float(np.max(ref) - np.min(ref)))
        return Resolved(allowance, bound.rtol or 0.0, step, bound.max_steps, bound.range_share,
                        bound.norm_rtol)  # fmt: skip

    def families_named(self) -> set[str]:
        names = set(self.families)
        for rule in self.outputs.values():
            names |= set(rule.families)
        return names

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"atol": self.atol, "rtol": self.rtol}
        if self.families:
            out["families"] = {k: v.to_json() for k, v in sorted(self.families.items())}
        if self.outputs:
            out["outputs"] = {k: v.to_json() for k, v in sorted(self.outputs.items())}
        if self.top1:
            out["top1"] = dict(sorted(self.top1.items()))
        if self.formats:
            out["formats"] = {k: v.to_json() for k, v in sorted(self.formats.items())}
        return out

    def with_output(self, name: str, rule: OutputRule) -> Tolerance:
        return replace(self, outputs={**self.outputs, name: rule})


# --------------------------------------------------------------------------- parsing


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"manifest: field {where} is {type(value).__name__}, expected an object")
    return value


def _keys(obj: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    unknown = sorted(k for k in obj if k not in allowed)
    if unknown:
        raise SchemaError(
            f"manifest: {where} has unknown field {shown(unknown[0], 40)}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


_BOUND_FIELDS = {
    "atol": (0.0, MAX_ATOL),
    "rtol": (0.0, MAX_RTOL),
    "max_steps": (0.0, MAX_STEPS),
    "range_share": (0.0, MAX_RANGE_SHARE),
    "norm_rtol": (0.0, MAX_NORM_RTOL),
}


def _bound(obj: Mapping[str, Any], where: str, extra: Collection[str] = ()) -> Bound:
    _keys(obj, {*_BOUND_FIELDS, *extra}, where)
    values: dict[str, float] = {}
    for key, (low, high) in _BOUND_FIELDS.items():
        # Present means a number: a null would silently fall back to a wider layer.
        if key in obj:
            values[key] = bounded_number(obj[key], f"{where}.{key}", low, high)
    return Bound(**values)


def _family_name(name: str, where: str) -> None:
    if (
        not name
        or len(name) > MAX_FAMILY_NAME
        or not all(c.isascii() and (c.islower() or c.isdigit() or c in "_-") for c in name)
    ):
        raise SchemaError(
            f"manifest: {where} names family {shown(name, 40)}; a family is 1-"
            f"{MAX_FAMILY_NAME} lowercase letters, digits, '_' or '-' (cpu, cuda, tensorrt)"
        )


def _families(value: Any, where: str) -> dict[str, Bound]:
    obj = _object(value, where)
    if len(obj) > MAX_FAMILIES:
        raise SchemaError(f"manifest: {where} names {len(obj)} families; the cap is {MAX_FAMILIES}")
    out: dict[str, Bound] = {}
    for name, body in obj.items():
        _family_name(name, where)
        out[name] = _bound(_object(body, f"{where}.{name}"), f"{where}.{name}")
    return out


def _key(name: str) -> str:
    """A name as it appears in a field path: bare when it is a plain identifier."""
    plain = name.replace("_", "").replace("-", "").replace(".", "").replace(":", "")
    return (
        name
        if name and len(name) <= 40 and plain.isascii() and plain.isalnum()
        else shown(name, 40)
    )


def _output_name(name: str, where: str, outputs: Collection[str] | None) -> None:
    if outputs is not None and name not in outputs:
        raise SchemaError(
            f"manifest: {where} names {shown(name, 40)}, which is not an output of the model "
            f"({', '.join(sorted(outputs)[:8])})"
        )


def parse_tolerance(
    raw: Mapping[str, Any] | None,
    where: str,
    outputs: Collection[str] | None = None,
    formats: Collection[str] | None = None,
) -> Tolerance:
    """The rule in a manifest's `tolerance` object (None: the defaults).

    `where` names the object in refusals ("golden.tolerance"); `outputs`, when
    given, are the model's output names, which `outputs` and `top1` may only name;
    `formats` the bundle's formats, which `formats` may only name (None: no
    per-format rules allowed, as in a variant's own tolerance).
    Raises SchemaError naming the field and its allowed range.
    """
    if raw is None:
        return Tolerance()
    obj = _object(raw, where)
    _keys(obj, {"atol", "rtol", "families", "outputs", "top1", "formats"}, where)
    per_format: dict[str, Tolerance] = {}
    if obj.get("formats") is not None:
        at = f"{where}.formats"
        for fmt, body in _object(obj["formats"], at).items():
            if formats is None or fmt not in formats:
                raise SchemaError(
                    f"manifest: {at} names {shown(fmt, 40)}, which is not a format of this "
                    f"bundle ({', '.join(sorted(formats or ())) or 'none here'}); a rule may "
                    "only name a bundled format (write_bundle drops the rules of formats a "
                    "builder leaves out)"
                )
            per_format[fmt] = parse_tolerance(body, f"{at}.{fmt}", outputs, None)
    base = _bound({k: obj[k] for k in ("atol", "rtol") if k in obj}, where)
    families = _families(obj["families"], f"{where}.families") if obj.get("families") else {}
    rules: dict[str, OutputRule] = {}
    if obj.get("outputs") is not None:
        outs = _object(obj["outputs"], f"{where}.outputs")
        if len(outs) > 64:
            raise SchemaError(f"manifest: {where}.outputs names {len(outs)} outputs; the cap is 64")
        for name, value in outs.items():
            at = f"{where}.outputs.{_key(name)}"
            _output_name(name, f"{where}.outputs", outputs)
            body = _object(value, at)
            rules[name] = OutputRule(
                quant_step=bounded_number(
                    body["quant_step"], f"{at}.quant_step", 0.0, MAX_QUANT_STEP, open_low=True
                )
                if "quant_step" in body
                else None,
                bound=_bound(body, at, extra=("quant_step", "families")),
                families=_families(body["families"], f"{at}.families")
                if body.get("families")
                else {},
            )
    top1: dict[str, float] = {}
    if obj.get("top1") is not None:
        for name, share in _object(obj["top1"], f"{where}.top1").items():
            _output_name(name, f"{where}.top1", outputs)
            top1[name] = bounded_number(share, f"{where}.top1.{_key(name)}", MIN_TOP1, 1.0)
    return Tolerance(
        atol=DEFAULT_ATOL if base.atol is None else base.atol,
        rtol=DEFAULT_RTOL if base.rtol is None else base.rtol,
        families=families,
        outputs=rules,
        top1=top1,
        formats=per_format,
    )


def allowance_problem(
    tolerance: Tolerance, references: Mapping[str, np.ndarray], where: str = "golden.tolerance"
) -> str | None:
    """Why the rule lets some output move by more than its own magnitude allows, or None.

    Checked on every family the rule or the defaults name: a rule that accepts
    anything on TensorRT is as useless as one that does on the CPU.
    """
    families = {"cpu", *DEFAULT_FAMILIES, *tolerance.families_named()}
    for name, ref in references.items():
        if not ref.size:
            continue
        peak = float(np.max(np.abs(ref.astype(np.float64))))
        allowed = max(ALLOWANCE_FLOOR, ALLOWANCE_SHARE * peak)
        for family in sorted(families):
            resolved = tolerance.resolve(name, family, ref)
            if resolved.norm_rtol is not None:
                continue  # judged by its relative L2 error, bounded by its own field
            got = resolved.allowance
            if got > allowed * (1 + 1e-9):
                return (
                    f"{where} lets output {name!r} move by {got:.3g} on {family}, above "
                    f"{allowed:.3g}, the most it may be: {ALLOWANCE_SHARE:.0%} of the largest "
                    f"reference magnitude ({peak:.3g}) or {ALLOWANCE_FLOOR:g}; wider, it would "
                    "let wrong outputs pass"
                )
    return None


# --------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class OutputReport:
    """How one output compared: the figures a person needs to judge the refusal."""

    name: str
    max_abs_diff: float  # NaN when every difference is NaN
    allowance: float
    rtol: float
    steps: float | None  # max_abs_diff in quant steps, when the output has one
    max_steps: float | None
    top1: float | None  # share of cases whose decision agrees (ties within the bound count)
    top1_required: float | None
    nan_values: int
    ok: bool
    norm_error: float | None = None  # the worst case's relative L2 error, when judged so

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class ToleranceReport:
    family: str
    outputs: dict[str, OutputReport]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def max_abs_diff(self) -> dict[str, float]:
        return {name: r.max_abs_diff for name, r in self.outputs.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "ok": self.ok,
            "outputs": {k: v.to_json() for k, v in self.outputs.items()},
            "failures": list(self.failures),
        }


def _top1(want: np.ndarray, have: np.ndarray, bound: np.ndarray) -> tuple[float, int, int] | None:
    """(agreement share, agreeing cases, cases) over the last axis, or None if not a score."""
    if want.ndim == 0 or want.shape[-1] < 2:
        return None
    classes = want.shape[-1]
    w = want.reshape(-1, classes)
    h = have.reshape(-1, classes)
    b = bound.reshape(-1, classes)
    rows = np.arange(len(w))
    top_w = np.argmax(w, axis=1)
    top_h = np.argmax(h, axis=1)
    # A case whose reference ranks both answers within one allowance of each other is
    # a tie either answer settles correctly. Farther apart, a changed answer fails even
    # when each value stayed within its bound: the elementwise check alone would let
    # two values move against each other by up to twice the bound.
    gap = w[rows, top_w] - w[rows, top_h]
    tie = gap <= np.maximum(b[rows, top_w], b[rows, top_h])
    agree = int(np.sum((top_w == top_h) | tie))
    return agree / len(w), agree, len(w)


def norm_errors(want: np.ndarray, have: np.ndarray) -> np.ndarray:
    """Per case (all axes but the last), ||have - want|| / ||want|| over the last axis."""
    if want.ndim == 0:
        want, have = want.reshape(1), have.reshape(1)
    w = want.reshape(-1, want.shape[-1])
    h = have.reshape(-1, want.shape[-1])
    norm = np.linalg.norm(w, axis=1)
    # A zero reference row is judged absolutely: any difference there is all error.
    return np.asarray(np.linalg.norm(h - w, axis=1) / np.where(norm > 0, norm, 1.0))


def compare(
    tolerance: Tolerance,
    family: str,
    expected: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
) -> ToleranceReport:
    """Judge `got` against the golden `expected` with the rule for `family`.

    NaN-aware (`not diff <= bound`, so NaN fails); an output missing or of another
    shape is a failure too. Never raises for values.
    """
    outputs: dict[str, OutputReport] = {}
    failures: list[str] = []
    for name, want in expected.items():
        if name not in got:
            failures.append(f"{name}: not produced by the model")
            continue
        have = np.asarray(got[name])
        if have.shape != want.shape:
            failures.append(f"{name}: shape {list(have.shape)}, expected {list(want.shape)}")
            continue
        want64 = np.asarray(want).astype(np.float64)
        have64 = have.astype(np.float64)
        rule = tolerance.resolve(name, family, want64)
        diff = np.abs(have64 - want64)
        bound = rule.allowance + rule.rtol * np.abs(want64)
        bad = ~(diff <= bound)
        norm_error = None
        if rule.norm_rtol is not None:
            errors = norm_errors(want64, have64)
            norm_error = float(np.nanmax(errors)) if not np.isnan(errors).all() else float("nan")
            bad = ~(errors <= rule.norm_rtol)
        worst = (
            float(np.nanmax(diff))
            if diff.size and not np.isnan(diff).all()
            else (float("nan") if diff.size else 0.0)
        )
        nans = int(np.isnan(have64).sum())
        steps = worst / rule.quant_step if rule.quant_step else None
        required = tolerance.top1.get(name)
        top1 = None
        problems = []
        if bad.any() and norm_error is not None:
            problems.append(
                f"{name}: relative L2 error {norm_error:.3g} exceeds the {family} bound "
                f"{rule.norm_rtol:g} in {int(bad.sum())} of {bad.size} cases"
                + (f"; {nans} NaN output value(s)" if nans else "")
            )
        elif bad.any():
            in_steps = (
                f" ({steps:.3g} quantization steps of {rule.quant_step:.3g}, "
                f"{rule.max_steps:g} allowed)"
                if steps is not None and rule.max_steps is not None
                else ""
            )
            problems.append(
                f"{name}: max abs diff {worst:.3g} exceeds the {family} bound "
                f"{rule.describe()} at {int(bad.sum())} of {bad.size} values{in_steps}"
                + (f"; {nans} NaN output value(s)" if nans else "")
            )
        if required is not None:
            agreement = _top1(want64, np.nan_to_num(have64, nan=-np.inf), bound)
            if agreement is None:
                problems.append(f"{name}: top1 is asked for but the output has no class axis")
            else:
                top1, agree, cases = agreement
                if top1 < required - 1e-12:
                    problems.append(
                        f"{name}: top-1 agrees on {agree} of {cases} golden cases "
                        f"({top1:.0%}); the rule asks for {required:.0%}"
                    )
        failures.extend(problems)
        outputs[name] = OutputReport(
            name=name,
            max_abs_diff=worst,
            allowance=rule.allowance,
            rtol=rule.rtol,
            steps=steps,
            max_steps=rule.max_steps if rule.quant_step else None,
            top1=top1,
            top1_required=required,
            nan_values=nans,
            ok=not problems,
            norm_error=norm_error,
        )
    return ToleranceReport(family, outputs, failures)


__all__ = [
    "DEFAULT_FAMILIES",
    "Bound",
    "OutputReport",
    "OutputRule",
    "Resolved",
    "Tolerance",
    "ToleranceReport",
    "allowance_problem",
    "compare",
    "norm_errors",
    "parse_tolerance",
]

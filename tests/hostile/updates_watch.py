"""Hostile answers for the update watchdog: what a broken or hostile candidate model
can answer, generated at run time, judged by the real observer and comparison code.

Two classes, each case one answer (a dict of arrays as a runtime returns them) of the
served sample model (`logits` [N, 10], labels 0-9):

* ``updates_watch.trial``: the answer is seen by `TrafficRecorder.observe` as a live
  request's; an answer with NaN/inf anywhere in a float output or an empty output is
  counted as bad (``watch.bad_answer``), any other as a good answer
  (``watch.counted``), its top-1 class counted only when it has the classifier's shape.
* ``updates_watch.shadow``: the answer is the candidate's, compared with the served
  answer (argmax 3 on every row) by the shadow worker under both metrics: it agrees
  (``watch.agree``) only when its shape matches and its rows are finite with argmax 3.

A case that raises, or is classified otherwise, fails; nothing here may crash the
request thread or the shadow worker.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import numpy as np

from tests.hostile import Case, Outcome, timed

CLASSES = ("updates_watch.trial", "updates_watch.shadow")
CLASS = "updates_watch"

Answer = dict[str, np.ndarray]


def _logits(rows: int = 1, dtype: Any = np.float32, winner: int = 3) -> np.ndarray:
    out = np.zeros((rows, 10), dtype)
    out[:, winner] = 5
    return out


def answers() -> list[tuple[str, Answer, bool, bool]]:
    """(name, answer, bad, agrees): bad = NaN/inf/empty; agrees = the same top-1 as served."""
    cases: list[tuple[str, Answer, bool, bool]] = []
    for dtype in (np.float16, np.float32, np.float64):
        tag = np.dtype(dtype).name
        for value, vname in ((np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")):
            for where in (0, 3, 9):
                x = _logits(1, dtype)
                x[0, where] = value
                # -inf off the winner leaves the argmax, but the answer is still bad
                cases.append((f"{tag}-{vname}-at-{where}", {"logits": x}, True, False))
        x = _logits(8, dtype)
        x[5, 1] = np.nan
        cases.append((f"{tag}-nan-in-one-row-of-8", {"logits": x}, True, False))
        cases.append((f"{tag}-good", {"logits": _logits(1, dtype)}, False, True))
        cases.append((f"{tag}-other-class", {"logits": _logits(1, dtype, 7)}, False, False))
    big = _logits(1)
    big[0] = np.finfo(np.float32).max  # a float32 sum would overflow; the answer is finite
    big[0, 3] = np.finfo(np.float32).max
    cases.append(("float32-max-everywhere", {"logits": big}, False, False))
    half = _logits(1, np.float16)
    half[0] = 65504.0
    cases.append(("float16-max-everywhere", {"logits": half}, False, False))
    tiny = _logits(1) * np.float32(1e-44)  # subnormals
    cases.append(("subnormal", {"logits": tiny}, False, True))
    neg = _logits(1)
    neg[0, 0] = -0.0
    cases.append(("negative-zero", {"logits": neg}, False, True))
    cases += [
        ("empty-rows", {"logits": np.zeros((0, 10), np.float32)}, True, False),
        ("empty-classes", {"logits": np.zeros((1, 0), np.float32)}, True, False),
        ("no-outputs", {}, True, False),
        ("scalar", {"logits": np.array(3.0, np.float32)}, False, False),
        ("flat-10", {"logits": _logits(1)[0]}, False, False),
        ("rank-3", {"logits": _logits(1)[None]}, False, False),
        ("classes-9", {"logits": np.zeros((1, 9), np.float32)}, False, False),
        ("classes-11", {"logits": np.zeros((1, 11), np.float32)}, False, False),
        ("rows-2-for-1", {"logits": _logits(2)}, False, False),
        ("int64-logits", {"logits": _logits(1).astype(np.int64)}, False, True),
        ("uint8-logits", {"logits": _logits(1).astype(np.uint8)}, False, True),
        ("bool-logits", {"logits": _logits(1).astype(bool)}, False, True),
        ("complex-logits", {"logits": _logits(1).astype(np.complex64)}, False, False),
        ("complex-nan", {"logits": _logits(1).astype(np.complex64) * np.nan}, True, False),
        ("string-logits", {"logits": np.array([["3"] * 10], object)}, False, False),
        ("unicode-logits", {"logits": np.array([["x"] * 10])}, False, False),
        ("strided-view", {"logits": np.repeat(_logits(1), 2, axis=1)[:, ::2]}, False, True),
        ("fortran-order", {"logits": np.asfortranarray(_logits(4))}, False, True),
        ("renamed-output", {"scores": _logits(1)}, False, False),
        ("extra-output", {"logits": _logits(1), "extra": np.full(3, np.nan)}, True, True),
        ("extra-empty-output", {"logits": _logits(1), "e": np.zeros(0)}, True, True),
        ("million-finite", {"logits": np.ones((100_000, 10), np.float32)}, False, False),
    ]
    return cases


# Cases whose served answer has another number of rows than the candidate's.
SERVED_ROWS = {"rows-2-for-1": 1}


def _served_for(name: str, answer: Answer) -> Answer:
    x = answer.get("logits")
    rows = x.shape[0] if x is not None and x.ndim == 2 and x.shape[1] == 10 else 1
    return {"logits": _logits(max(SERVED_ROWS.get(name, rows), 1))}


def cases() -> list[tuple[Case, Answer, bool, bool]]:
    out = []
    for name, answer, bad, agrees in answers():
        trial = Case(
            "updates_watch.trial", name, ("watch.bad_answer",) if bad else ("watch.counted",)
        )
        out.append((trial, answer, bad, agrees))
        shadow = Case(
            "updates_watch.shadow", name, ("watch.agree",) if agrees else ("watch.disagree",)
        )
        out.append((shadow, answer, bad, agrees))
    return out


def _trial(answer: Answer, name: str) -> tuple[str | None, str]:
    from agent.update.trial import TrafficRecorder
    from tests.hostile._updates_watch_host import served_model

    host, model = served_model()
    recorder = TrafficRecorder(host)
    recorder.observe(
        host.generation, model, {"input": np.zeros((1, 1, 8, 8), np.float32)}, answer, None, 1e-3
    )
    figures = recorder.figures(host.generation, recent=False)
    if figures.get("requests") != 1:
        return "watch.lost", f"the answer was not counted: {figures}"
    top1 = int(figures.get("top1_samples", 0))
    if figures["nonfinite"] == 1:
        return "watch.bad_answer", f"counted as a NaN/inf/empty answer; top-1 rows {top1}"
    return "watch.counted", f"counted as a good answer; top-1 rows {top1}"


def _shadow(answer: Answer, name: str) -> tuple[str | None, str]:
    from agent.protocol.update import ShadowSpec
    from agent.update.shadow import ShadowEvaluator, _Run, _Sample
    from tests.hostile._updates_watch_host import served_model

    _, model = served_model()
    verdicts = []
    for metric in ("top1", "cosine"):
        spec = ShadowSpec(metric=metric)  # type: ignore[arg-type]
        run = _Run(model, spec)
        sample = _Sample(
            {"input": np.zeros((1, 1, 8, 8), np.float32)}, _served_for(name, answer), 1e-3
        )
        ShadowEvaluator._compare(run, sample, answer, 1e-3, ("logits", 10), ["logits"], spec)
        agreement = run.agreement()
        if not (np.isfinite(agreement) and -1 <= agreement <= 1):
            return "watch.bad_agreement", f"{metric} agreement {agreement!r}"
        verdicts.append((metric, agreement))
    top1, cos = verdicts[0][1], verdicts[1][1]
    # Agreement is all-or-nothing on these one-class answers; cosine of the same
    # top-1 on finite answers of the served shape is positive.
    if top1 == 1.0 and cos > 0.5:
        return "watch.agree", f"top-1 {top1:.3f}, cosine {cos:.3f}"
    if top1 < 1.0:
        return "watch.disagree", f"top-1 {top1:.3f}, cosine {cos:.3f}"
    return "watch.mixed", f"top-1 agrees but cosine is {cos:.3f}"


def run_corpus(workdir: Path) -> list[Outcome]:
    outcomes = []
    for case, answer, _, _ in cases():
        judge = _trial if case.klass == "updates_watch.trial" else _shadow

        def guarded(
            judge: Any = judge, answer: Answer = answer, name: str = case.name
        ) -> tuple[str | None, str]:
            try:
                return judge(answer, name)
            except Exception:  # a crash is this corpus's failure, shown with its traceback
                return "watch.crashed", traceback.format_exc()

        outcomes.append(timed(case, guarded))
    return outcomes

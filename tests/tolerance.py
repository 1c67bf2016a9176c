"""How close two runs of the same model must agree: derived, not guessed.

Two implementations of the same float graph (torch and onnxruntime, a whole batch
and the same cases one by one, XNNPACK and the reference kernels) differ only in
rounding: summation order, fused multiply-adds, vectorised reductions, threads. Each
rounding moves a value by at most half an ulp of that value, and a model's output
is built from a few dozen such steps over intermediates no larger (in the layers
that matter for the outputs) than the outputs themselves. So the bound is a number
of ulps, scaled by the largest output: ``atol = k * eps(dtype) * max|want|``, plus
``rtol = k * eps(dtype)`` for values far from that maximum.

``k = 64`` covers the depth of the small models these tests run with margin, while
staying four orders of magnitude below any real error (a wrong weight, a wrong axis,
a swapped input). The tiny test model's logits reach ~29, so two float32 runs may
differ by up to ~2.2e-4; a fixed ``atol=1e-5`` failed there on a clean clone at
1.24e-5, under four ulps of the largest logit. Measured on the sample digits model:
ONNX Runtime vs float32 LiteRT differ by 9.5e-6 on logits of up to 28.8 (2.8 ulps).
Integer outputs must be equal.

Quantized models are another matter: their error is the quantization step, not
rounding, and tests comparing them against float state their own accuracy bound.
"""

from __future__ import annotations

import numpy as np

ULPS = 64


def float_tolerance(want: np.ndarray, dtype: np.dtype | type | None = None) -> tuple[float, float]:
    """(atol, rtol) for comparing a float result against `want` computed in `dtype`."""
    eps = float(np.finfo(np.dtype(dtype if dtype is not None else want.dtype)).eps)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return ULPS * eps * scale, ULPS * eps


def assert_close(
    got: np.ndarray, want: np.ndarray, dtype: np.dtype | type | None = None, what: str = ""
) -> None:
    """Assert `got` equals `want` up to the rounding of two float implementations."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype.kind not in "fc":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    atol, rtol = float_tolerance(want, dtype)
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)

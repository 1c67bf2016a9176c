"""Digits flattened to 64 features in [0, 1]: the input of the example ONNX model."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load_splits() -> dict[str, Any]:
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    x_cal, x_ev, y_cal, y_ev = train_test_split(
        x_rest, y_rest, test_size=0.6, random_state=0, stratify=y_rest
    )
    return {
        "train": {"inputs": x_tr, "labels": y_tr},
        "calibration": {"inputs": x_cal, "labels": y_cal},
        "eval": {"inputs": x_ev, "labels": y_ev},
    }

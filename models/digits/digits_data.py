"""scikit-learn's bundled 8x8 digits as train/calibration/eval splits.

Pixels are scaled to [0, 1] (sklearn gives 0..16), shaped [N, 1, 8, 8] float32:
the input contract of the digits bundle. The split is stratified and seeded, so
every build sees the same rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load_splits(seed: int = 0) -> dict[str, Any]:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=seed, stratify=y
    )
    x_cal, x_eval, y_cal, y_eval = train_test_split(
        x_rest, y_rest, test_size=0.6, random_state=seed, stratify=y_rest
    )
    return {
        "train": {"inputs": x_train, "labels": y_train},
        "calibration": {"inputs": x_cal, "labels": y_cal},
        "eval": {"inputs": x_eval, "labels": y_eval},
    }

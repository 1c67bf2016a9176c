"""Knowledge distillation: train a student to match the teacher's outputs.

Classification uses the KD loss of Hinton et al.: alpha * T^2 * KL(teacher_T ||
student_T) + (1 - alpha) * cross-entropy on the labels (the T^2 keeps the soft
term's gradient scale independent of the temperature). Embedding models match
the teacher's vectors with a cosine or MSE loss. The teacher's outputs on the
training split are computed once up front, so an epoch costs one student pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from export.pipeline.errors import BuildError
from export.pipeline.loader import Split
from export.pipeline.progress import progress
from export.pipeline.torchrun import as_tensors, forward, predict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    epochs: int
    lr: float
    temperature: float
    alpha: float
    loss: str  # kd | cosine | mse
    batch_size: int
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ("kd", "cosine", "mse"):
            raise ValueError(
                f"DistillConfig.loss = {self.loss!r} is not supported; allowed: 'kd', 'cosine', "
                "'mse'"
            )
        for name, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1)):
            if value < low:
                raise ValueError(f"DistillConfig.{name} = {value!r} must be >= {low}")
        if not self.lr > 0 or not self.temperature > 0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"DistillConfig: lr ({self.lr}) and temperature ({self.temperature}) must be "
                f"> 0 and alpha ({self.alpha}) within [0, 1]"
            )


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
    temperature: float, alpha: float,
) -> torch.Tensor:  # fmt: skip
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
        reduction="batchmean", log_target=True,
    ) * (t * t)  # fmt: skip
    if labels is None or alpha >= 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student, labels)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=-1)).mean()
    return F.mse_loss(student, teacher)


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    train: Split,
    input_names: Sequence[str],
    output_names: Sequence[str],
    cfg: DistillConfig,
    desc: str = "distill",
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """Train `student` in place; returns the mean loss of each epoch."""
    torch.manual_seed(cfg.seed)
    targets = predict(teacher, train, input_names, output_names, cfg.batch_size, "teacher")
    target = torch.from_numpy(targets[output_names[0]])
    labels = None if train.labels is None else torch.from_numpy(train.labels)
    inputs = as_tensors(train.inputs, input_names)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, (len(train) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    student.train()
    for epoch in progress(range(cfg.epochs), desc, total=cfg.epochs):
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for start in range(0, len(train), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            out = forward(student, tuple(x[idx] for x in inputs), 1, "student")[0]
            if cfg.loss == "kd":
                loss = kd_loss(out, target[idx], None if labels is None else labels[idx],
                               cfg.temperature, cfg.alpha)  # fmt: skip
            else:
                loss = embedding_loss(out, target[idx], cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if after_step is not None:
                after_step()  # e.g. keep pruned weights at zero
            sched.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / max(1, len(train)))
        log.debug("%s epoch %d loss %.4f", desc, epoch + 1, history[-1])
    student.eval()
    if not np.isfinite(history[-1]):
        raise BuildError(f"{desc}: the loss diverged ({history[-1]}); lower distill.lr")
    log.info("%s: %d epochs, final loss %.4f", desc, cfg.epochs, history[-1])
    return history

"""Pruning: structured (channels really removed, via torch-pruning) or unstructured magnitude.

Structured pruning builds torch-pruning's dependency graph so that removing an
output channel of one conv also removes the matching input channel of the next
layer (and of BatchNorm, residual adds...), leaving a smaller dense model: the
exported graph has fewer parameters and FLOPs, which is what a CPU actually
runs faster. Unstructured magnitude pruning zeroes the smallest weights instead;
shapes stay the same, so it only pays off with sparse kernels or compression.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from export.pipeline.errors import BuildError
from export.pipeline.torchrun import count_nonzero, count_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneStats:
    params_before: int
    params_after: int
    flops_before: int  # multiply-accumulates for one example (batch 1)
    flops_after: int
    nonzero_after: int


def count_flops(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        macs, _ = tp.utils.count_ops_and_params(model, tuple(x[:1] for x in example))
    except Exception as exc:  # counting is informative; never fail a build over it
        log.warning("cannot count FLOPs: %s", exc)
        macs = 0
    model.train(was_training)
    return int(macs)


def _output_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The last Linear/Conv: its outputs are the model's outputs, never prunable."""
    prunable: list[torch.nn.Module] = [m for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d
                                                            | torch.nn.Conv1d)]  # fmt: skip
    return prunable[-1:]


def prune_structured(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...], ratio: float,
    ignore: Sequence[str] = (),
) -> PruneStats:  # fmt: skip
    import torch_pruning as tp

    params_before = count_params(model)
    flops_before = count_flops(model, example)
    named = dict(model.named_modules())
    missing = [n for n in ignore if n not in named]
    if missing:
        raise BuildError(
            f"prune.ignore names {missing}, which are not modules of the student; "
            f"modules: {', '.join(n for n in named if n)[:500]}"
        )
    ignored = _output_layers(model) + [named[n] for n in ignore]
    model.eval()
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            tuple(x[:1] for x in example),
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
        )
        pruner.step()
    except Exception as exc:
        raise BuildError(
            f"structured pruning failed on this model ({type(exc).__name__}: {exc}); "
            "set prune.method = 'magnitude' or list the offending layers in prune.ignore"
        ) from exc
    stats = PruneStats(params_before, count_params(model), flops_before,
                       count_flops(model, example), count_nonzero(model))  # fmt: skip
    log.info(
        "structured pruning %.0f%%: params %d -> %d, MACs %d -> %d",
        ratio * 100, stats.params_before, stats.params_after,
        stats.flops_before, stats.flops_after,
    )  # fmt: skip
    if stats.params_after >= stats.params_before:
        raise BuildError(
            f"structured pruning at ratio {ratio} removed nothing (params {params_before}); "
            "raise prune.ratio or check prune.ignore"
        )
    return stats


def prune_magnitude(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...], ratio: float,
    ignore: Sequence[str] = (),
) -> PruneStats:  # fmt: skip
    from torch.nn.utils import prune

    params = count_params(model)
    flops = count_flops(model, example)
    skip = {id(m) for m in _output_layers(model)}
    named = dict(model.named_modules())
    skip |= {id(named[n]) for n in ignore if n in named}
    targets = [
        (m, "weight") for m in model.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d) and id(m) not in skip
    ]  # fmt: skip
    if not targets:
        raise BuildError("magnitude pruning found no Linear/Conv layers to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=ratio)
    for module, name in targets:
        prune.remove(module, name)  # type: ignore[no-untyped-call]  # bake the mask into the weight
    stats = PruneStats(params, count_params(model), flops, flops, count_nonzero(model))
    log.info("magnitude pruning %.0f%%: nonzero params %d -> %d", ratio * 100, params,
             stats.nonzero_after)  # fmt: skip
    return stats


class MaskKeeper:
    """Re-apply the zero pattern after each optimizer step (fine-tuning a sparse model)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.masks = [(p, p.detach() != 0) for p in model.parameters() if p.dim() > 1]

    @torch.no_grad()
    def apply(self) -> None:
        for p, mask in self.masks:
            p.mul_(mask)

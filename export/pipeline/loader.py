"""Resolve the recipe's `module:function` builders and check what they return.

Modules resolve from the recipe's folder first, so a recipe ships with its own
builders. Every failure names the recipe key, so the message points at the line
to fix. The dataset contract (checked here, before any training starts):

    builder() -> {"train": SPLIT, "calibration": SPLIT, "eval": SPLIT}
    SPLIT = {"inputs": {name: ndarray} (or one ndarray for a one-input model),
             "labels": ndarray of int class ids (classification only)}
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.pipeline.errors import DatasetError, LoadError
from export.pipeline.recipe import ModelSource, Recipe, TensorDecl, split_builder

log = logging.getLogger(__name__)

SPLITS = ("train", "calibration", "eval")


@dataclass
class Split:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, n: int) -> Split:
        labels = None if self.labels is None else self.labels[:n]
        return Split({k: v[:n] for k, v in self.inputs.items()}, labels)

    def batches(self, size: int) -> Iterator[Split]:
        for start in range(0, len(self), size):
            labels = None if self.labels is None else self.labels[start : start + size]
            yield Split({k: v[start : start + size] for k, v in self.inputs.items()}, labels)


@dataclass
class Splits:
    train: Split
    calibration: Split
    eval: Split


@contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with suppress(ValueError):  # a builder may have removed it itself
            sys.path.remove(str(folder))


def resolve(spec: str, key: str, folder: Path) -> Callable[..., Any]:
    module_name, func_name = split_builder(spec)
    with _on_path(folder):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise LoadError(
                f"{key} = {spec!r}: cannot import module {module_name!r} ({exc}); modules "
                f"resolve from the recipe folder {folder} and the installed packages"
            ) from exc
        except Exception as exc:
            raise LoadError(
                f"{key} = {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        raise LoadError(f"{key} = {spec!r}: module {module_name!r} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]


def load_model(source: ModelSource, key: str, folder: Path) -> Any:
    """Build a torch module and load its checkpoint; returns it in eval mode."""
    import torch

    builder = resolve(source.builder, f"{key}.builder", folder)
    try:
        with _on_path(folder):
            model = builder()
    except Exception as exc:
        raise LoadError(
            f"{key}.builder = {source.builder!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise LoadError(
            f"{key}.builder = {source.builder!r} returned {type(model).__name__}, "
            "expected a torch.nn.Module"
        )
    if source.checkpoint:
        path = (folder / source.checkpoint).resolve()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise LoadError(f"{key}.checkpoint = {source.checkpoint!r}: {path} not found") from exc
        except Exception as exc:
            raise LoadError(
                f"{key}.checkpoint = {source.checkpoint!r}: cannot read {path}: {exc}"
            ) from exc
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise LoadError(
                f"{key}.checkpoint = {source.checkpoint!r} does not fit the model built by "
                f"{source.builder!r}: {str(exc).splitlines()[0]}"
            ) from exc
    return model.eval()


def _as_split(value: Any, name: str, recipe: Recipe) -> Split:
    where = f"dataset.builder = {recipe.dataset.builder!r}: split {name!r}"
    if not isinstance(value, Mapping) or "inputs" not in value:
        raise DatasetError(f"{where} must be a mapping with 'inputs' (and 'labels')")
    unknown = set(value) - {"inputs", "labels"}
    if unknown:
        raise DatasetError(f"{where} has unknown keys {sorted(unknown)}; allowed: inputs, labels")
    raw = value["inputs"]
    if isinstance(raw, np.ndarray):
        if len(recipe.inputs) != 1:
            raise DatasetError(
                f"{where} gives one array but the recipe declares {len(recipe.inputs)} inputs; "
                "return {name: array}"
            )
        raw = {recipe.inputs[0].name: raw}
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{where}: inputs must be an array or a mapping of name to array")
    declared = [t.name for t in recipe.inputs]
    if sorted(raw) != sorted(declared):
        raise DatasetError(f"{where} has inputs {sorted(raw)}; the recipe declares {declared}")
    inputs: dict[str, np.ndarray] = {}
    for decl in recipe.inputs:
        inputs[decl.name] = _check_array(raw[decl.name], decl, where)
    rows = {v.shape[0] for v in inputs.values()}
    if len(rows) != 1:
        raise DatasetError(f"{where}: inputs disagree on the number of rows: {sorted(rows)}")
    n = rows.pop()
    labels = value.get("labels")
    if recipe.task == "classification":
        if labels is None:
            raise DatasetError(f"{where} has no labels; a classification task needs them")
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f"{where}: labels must be {n} integer class ids, got {labels.dtype} "
                f"shape {list(labels.shape)}"
            )
        if recipe.labels and n and (labels.min() < 0 or labels.max() >= len(recipe.labels)):
            raise DatasetError(
                f"{where}: labels span {labels.min()}..{labels.max()}; the recipe names "
                f"{len(recipe.labels)} classes"
            )
        labels = labels.astype(np.int64)
    elif labels is not None:
        labels = np.asarray(labels)
    return Split(inputs, labels)


def _check_array(value: Any, decl: TensorDecl, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise DatasetError(f"{where}: input {decl.name!r} is {type(value).__name__}, not ndarray")
    if value.dtype.name != decl.dtype:
        raise DatasetError(
            f"{where}: input {decl.name!r} is {value.dtype.name}; the recipe declares {decl.dtype}"
        )
    shape = list(value.shape)
    if len(shape) != len(decl.shape) or any(
        d not in (-1, s) for d, s in zip(decl.shape, shape, strict=False)
    ):
        raise DatasetError(
            f"{where}: input {decl.name!r} has shape {shape}; the recipe declares {decl.shape} "
            "(-1 = any)"
        )
    return np.ascontiguousarray(value)


def load_splits(recipe: Recipe) -> Splits:
    builder = resolve(recipe.dataset.builder, "dataset.builder", recipe.root)
    with _on_path(recipe.root):
        try:
            raw = builder()
        except Exception as exc:
            raise DatasetError(
                f"dataset.builder = {recipe.dataset.builder!r} raised {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(raw, Mapping):
        raise DatasetError(
            f"dataset.builder = {recipe.dataset.builder!r} returned {type(raw).__name__}; "
            f"expected a mapping with splits {', '.join(SPLITS)}"
        )
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise DatasetError(
            f"dataset.builder = {recipe.dataset.builder!r} lacks split(s) {', '.join(missing)}; "
            f"expected {', '.join(SPLITS)}"
        )
    splits = Splits(*(_as_split(raw[s], s, recipe) for s in SPLITS))
    if len(splits.eval) == 0:
        raise DatasetError("the eval split is empty; gates need data to measure against")
    if recipe.distill_on and len(splits.train) == 0:
        raise DatasetError("the train split is empty; distillation needs training data")
    log.info(
        "dataset: %d train, %d calibration, %d eval rows",
        len(splits.train),
        len(splits.calibration),
        len(splits.eval),
    )
    return splits

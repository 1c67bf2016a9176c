"""Sentences for calibration and evaluation, made offline and deterministically.

The text is the documentation of Python's own standard library (docstrings of
well-known modules), split into sentences: real English prose on many topics,
available on every machine with no download. Tokenized with the model's own
tokenizer to a fixed length, so every split has the same shapes.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import numpy as np
from minilm import MAX_LENGTH, model_dir

MODULES = (
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions",
    "functools", "heapq", "http.client", "json", "logging", "os", "pathlib", "pickle",
    "random", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "textwrap", "threading", "unittest", "urllib.request", "uuid", "zipfile",
)  # fmt: skip


def sentences(limit: int = 2000) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for _, member in sorted(vars(module).items()):
            if inspect.isfunction(member) or inspect.isclass(member):
                docs.append(inspect.getdoc(member) or "")
        for doc in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = s.split()
                if 6 <= len(words) <= 40 and s not in seen and re.match(r"[A-Z]", s):
                    seen.add(s)
                    out.append(s)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(out))
    return [out[i] for i in order[:limit]]


def _encode(texts: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    enc = tok(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
              return_tensors="np")  # fmt: skip
    return {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
    }


def load_splits(train: int = 256, calibration: int = 128, evaluation: int = 256) -> dict[str, Any]:
    texts = sentences(train + calibration + evaluation)
    a, b = train, train + calibration
    return {
        "train": {"inputs": _encode(texts[:a])},
        "calibration": {"inputs": _encode(texts[a:b])},
        "eval": {"inputs": _encode(texts[b:])},
    }


def load_small_splits() -> dict[str, Any]:
    """For tests: fewer rows, same shapes."""
    return load_splits(train=32, calibration=32, evaluation=48)

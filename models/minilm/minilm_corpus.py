"""An offline English corpus: the docstrings of the installed Python packages.

Every `.py` file of every top-level package in site-packages is parsed with `ast`
(nothing is imported or run), and the docstrings of its module, classes and
functions are split into sentences. Prose paragraphs only: doctest, reST
directives, parameter tables and code-looking lines are dropped, and a sentence is
kept when it is ASCII, 6-40 words, starts with a capital letter, ends with `.`,
`!` or `?` and is mostly letters. Sentences are deduplicated across the whole
corpus (the first package in sorted order keeps it).

The split is by package, so held-out text comes from packages never trained on:
a package is held out when the first byte of sha256(its name) is below
HELDOUT_BYTE, a rule that does not depend on which other packages are installed.
A sentence that is in the held-out set is removed from the training set (vendored
copies: pip's vendored `packaging` is held out with `packaging`).

Deterministic: packages and files are walked in sorted order, nothing depends
on the file system's order, and `sample()` shuffles with a seeded generator.

    python models/minilm/minilm_corpus.py        # sizes and a digest of the corpus
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache"
HELDOUT_BYTE = 26  # ~10% of package names (26/256)
MIN_WORDS, MAX_WORDS = 6, 40
MAX_FILE_BYTES = 2_000_000  # generated tables, not prose
# Paragraphs that are not prose: doctest, reST directives and fields, numpydoc/Google
# section headers, tables, code.
_NOT_PROSE = re.compile(
    r"^\s*(>>>|\.\.\s|:\w+|[-=~^*]{3,}|\+[-+]+|\||\$ |#|@|Args:|Arguments:|Returns:|Raises:"
    r"|Yields:|Examples?:|Attributes:|Parameters|Note:|Warning:)",
    re.MULTILINE,
)
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_BAD = re.compile(r"[`*_{}\[\]<>|\\=#@$^~]|::|\.\.\.|https?:|www\.|\be\.g\.$|\bi\.e\.$")
_ABBREV_END = re.compile(r"\b(e\.g|i\.e|etc|vs|cf|Mr|Dr|No|Fig|Eq)\.$")


@dataclass(frozen=True)
class Corpus:
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    train_packages: tuple[str, ...]
    heldout_packages: tuple[str, ...]

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.train, self.heldout):
            for s in part:
                h.update(s.encode() + b"\n")
            h.update(b"\0")
        return h.hexdigest()[:16]


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def is_heldout(package: str) -> bool:
    return hashlib.sha256(package.encode()).digest()[0] < HELDOUT_BYTE


def packages(root: Path) -> list[tuple[str, list[Path]]]:
    """Top-level packages (folders) and modules (.py files) of `root`, sorted, with files."""
    out: list[tuple[str, list[Path]]] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.startswith((".", "_")) or name.endswith((".dist-info", ".egg-info", ".pth")):
            continue
        if entry.is_dir():
            files = sorted(
                (p for p in entry.rglob("*.py") if "__pycache__" not in p.parts),
                key=lambda p: p.relative_to(entry).as_posix(),
            )
            if files:
                out.append((name, files))
        elif entry.suffix == ".py":
            out.append((entry.stem, [entry]))
    return out


def docstrings(source: str) -> Iterator[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # Python 2 files, templates, NUL bytes
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def split_sentences(doc: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", doc):
        if _NOT_PROSE.search(paragraph):
            continue
        lines = paragraph.splitlines()
        # Indented blocks, definition lists ("name : type") and bullet lists are not prose.
        if any(line.startswith((" ", "\t", "- ", "* ")) or " : " in line for line in lines):
            continue
        text = " ".join(paragraph.split())
        for sentence in _SPLIT.split(text):
            if keep(sentence):
                yield sentence


def keep(sentence: str) -> bool:
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or not sentence.isascii():
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?" or _ABBREV_END.search(sentence):
        return False
    if _BAD.search(sentence) or "()" in sentence or "(self" in sentence:
        return False
    letters = sum(c.isalpha() for c in sentence)
    return letters >= 0.75 * len(sentence.replace(" ", ""))


def package_sentences(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            source = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for doc in docstrings(source):
            yield from split_sentences(doc)


def build_corpus(root: Path | None = None, which: str = "both") -> Corpus:
    """Both splits (`which="both"`), or only the held-out one (cheap: train packages unread)."""
    root = site_packages() if root is None else Path(root)
    train: dict[str, None] = {}  # insertion-ordered sets
    heldout: dict[str, None] = {}
    train_pkgs: list[str] = []
    heldout_pkgs: list[str] = []
    for name, files in packages(root):
        held = is_heldout(name)
        if not held and which == "heldout":
            continue
        (heldout_pkgs if held else train_pkgs).append(name)
        target = heldout if held else train
        for sentence in package_sentences(files):
            target.setdefault(sentence, None)
    # A sentence of a train package that a held-out package also has leaves the
    # training set: held-out text must be unseen.
    kept = tuple(s for s in train if s not in heldout)
    return Corpus(kept, tuple(heldout), tuple(train_pkgs), tuple(heldout_pkgs))


def _fingerprint(root: Path) -> str:
    """What the corpus depends on: this code and the installed distributions' names."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(str(root).encode())
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        h.update(entry.name.encode() + b"\n")
    return h.hexdigest()[:16]


def cached_corpus(root: Path | None = None, cache_dir: Path | None = None) -> Corpus:
    """build_corpus() for both splits, kept in a JSON file until site-packages changes."""
    root = site_packages() if root is None else Path(root)
    cache_dir = CACHE_DIR if cache_dir is None else Path(cache_dir)
    path = cache_dir / f"minilm-corpus-{_fingerprint(root)}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Corpus(*(tuple(raw[k]) for k in ("train", "heldout", "train_packages",
                                                  "heldout_packages")))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: build it again
    corpus = build_corpus(root)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(corpus)), encoding="utf-8")
    os.replace(tmp, path)
    return corpus


def sample(sentences: tuple[str, ...] | list[str], n: int, seed: int = 0) -> list[str]:
    """`n` sentences in a seeded random order (all of them when n <= 0 or n > len)."""
    order = np.random.default_rng(seed).permutation(len(sentences))
    if 0 < n < len(sentences):
        order = order[:n]
    return [sentences[i] for i in order]


def main() -> int:
    corpus = cached_corpus()
    words = sum(len(s.split()) for s in corpus.train)
    print(f"site-packages: {site_packages()}")
    print(f"train: {len(corpus.train)} sentences ({words} words) from "
          f"{len(corpus.train_packages)} packages")  # fmt: skip
    print(f"held-out: {len(corpus.heldout)} sentences from {len(corpus.heldout_packages)} "
          f"packages: {', '.join(corpus.heldout_packages)}")  # fmt: skip
    print(f"digest: {corpus.digest()}")
    for s in sample(corpus.train, 5) + sample(corpus.heldout, 5):
        print("  ", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

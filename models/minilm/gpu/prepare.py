"""Pack what the GPU distillation run needs, with no transformers/safetensors there.

    python models/minilm/gpu/prepare.py OUT_DIR

Writes OUT_DIR/data.npz (the corpus tokenized here: train pool, held-out packages,
the recipe's standard-library eval split; int16 ids padded to MAX_LENGTH + lengths) and
OUT_DIR/teacher.fp16.pt (the teacher's state dict in fp16, HF key names, its word
embeddings cut to the word pieces the text uses, ids remapped) and
OUT_DIR/student.fp16.pt (the shipped student's layers, to resume from). The same
selection rules as distill_student.py: no standard-library sentence is trained on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from minilm import MAX_LENGTH, STUDENT_WEIGHTS, init_layers, model_dir  # noqa: E402
from minilm_corpus import cached_corpus  # noqa: E402


def pack(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    ids = tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    out = np.zeros((len(ids), MAX_LENGTH), dtype=np.int16)
    lengths = np.array([len(x) for x in ids], dtype=np.int16)
    for i, x in enumerate(ids):
        out[i, : len(x)] = x
    return out, lengths


def write(out: Path, pool: list[str], held: list[str], stdlib: list[str], digest: str,
          student: Path = STUDENT_WEIGHTS) -> None:  # fmt: skip
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir())
    assert tok.vocab_size < 32768  # int16 ids
    arrays = {}
    for name, texts in (("train", pool), ("held", held), ("stdlib", stdlib)):
        ids, lengths = pack(tok, texts)
        arrays[f"{name}_ids"], arrays[f"{name}_len"] = ids, lengths
        print(name, ids.shape, "mean length", float(lengths.mean()))
    # Only the ~11,000 word pieces this text uses travel (the call carries 64 MiB): ids
    # are remapped to rows of the reduced embedding table. Padding (0) stays row 0.
    used = np.unique(np.concatenate([v.ravel() for k, v in arrays.items() if k.endswith("_ids")]))
    used = np.union1d(used, [0]).astype(np.int64)
    remap = np.zeros(tok.vocab_size, dtype=np.int16)
    remap[used] = np.arange(len(used), dtype=np.int16)
    for k in [k for k in arrays if k.endswith("_ids")]:
        arrays[k] = remap[arrays[k].astype(np.int64)]
    np.savez_compressed(out / "data.npz", corpus=np.array(digest), vocab=used, **arrays)
    teacher = load_file(str(model_dir() / "model.safetensors"))
    words = teacher["embeddings.word_embeddings.weight"]
    teacher["embeddings.word_embeddings.weight"] = words[torch.from_numpy(used)]
    torch.save({k: v.half() for k, v in teacher.items() if k != "embeddings.position_ids"},
               out / "teacher.fp16.pt")  # fmt: skip
    layers = load_file(str(student))
    torch.save({"layers": {k.removeprefix("layer."): v for k, v in layers.items()},
                "init_layers": init_layers(student)}, out / "student.fp16.pt")  # fmt: skip
    for p in sorted(out.iterdir()):
        print(p.name, p.stat().st_size)


def main() -> int:
    from minilm_data import sentences as stdlib_sentences

    corpus = cached_corpus()
    every_stdlib = set(stdlib_sentences(limit=1 << 30))
    pool = [s for s in corpus.train if s not in every_stdlib]
    stdlib = stdlib_sentences(640)[384:]  # the recipe's eval split (minilm_data.load_splits)
    write(Path(sys.argv[1]), pool, list(corpus.heldout), stdlib, corpus.digest())
    return 0


if __name__ == "__main__":
    sys.exit(main())

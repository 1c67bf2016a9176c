"""The GPU distillation scripts (models/minilm/gpu), checked here on CPU with the real models.

train.py is a plain-torch BERT (the GPU machine has no transformers): its maths must be
BertModel's, or what it trains is not the student the recipe builds. prepare.py cuts the
word embeddings to the word pieces the text uses and remaps ids: the same sentence must
embed the same through that table. A two-step run writes layers that the recipe's
student builder loads.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

MINILM = Path(__file__).resolve().parents[2] / "models" / "minilm"
GPU = MINILM / "gpu"


@pytest.fixture(scope="module", autouse=True)
def _on_path() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI's 2 cores are shared by the other test processes
    sys.path[:0] = [str(GPU), str(MINILM)]
    yield
    for p in (str(GPU), str(MINILM)):
        sys.path.remove(p)
    for name in ("minilm", "minilm_data", "minilm_corpus", "train", "prepare"):
        sys.modules.pop(name, None)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from minilm_data import sentences

    return sentences(640)[384:416]  # the recipe's eval sentences: real prose, 32 of them


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    from prepare import write

    out = tmp_path_factory.mktemp("gpu-data")
    write(out, texts[:24], texts[24:], texts[:8], "test")
    return out


def _hf(model: object, texts: list[str]) -> np.ndarray:
    import torch
    from distill_student import encode, tokenizer

    with torch.no_grad():
        return model(**encode(tokenizer(), texts)).numpy()  # type: ignore[operator,no-any-return]


def _plain(model: object, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    import torch
    from train import pooled

    n = int(lengths.max())
    t = torch.from_numpy(ids[:, :n].astype(np.int64))
    m = (torch.arange(n)[None, :] < torch.from_numpy(lengths.astype(np.int64))[:, None]).long()
    with torch.no_grad():
        return pooled(model(t, m)[-1], m).numpy()  # type: ignore[operator,no-any-return]


def test_plain_encoder_is_bertmodel_on_reduced_vocab(packed: Path, texts: list[str]) -> None:
    import torch
    from minilm import build_student, build_teacher
    from train import load_teacher, make_student

    data = np.load(packed / "data.npz")
    ids, lengths = data["train_ids"], data["train_len"]
    assert ids.max() < len(data["vocab"])  # remapped into the reduced table
    teacher = load_teacher(torch.load(packed / "teacher.fp16.pt"))
    shipped = torch.load(packed / "student.fp16.pt")
    student = make_student(teacher, shipped["layers"], tuple(shipped["init_layers"]), 0.0)
    ref_t, ref_s = _hf(build_teacher(), texts[:24]), _hf(build_student(), texts[:24])
    got_t, got_s = _plain(teacher, ids, lengths), _plain(student.eval(), ids, lengths)
    # fp16 teacher weights (what travels): per-sentence cosine to the fp32 model ~1 - 1e-6.
    assert np.sum(got_t * ref_t, axis=-1).min() > 0.99999
    assert np.sum(got_s * ref_s, axis=-1).min() > 0.99999
    # ...and it is the model, not any encoder: the student is not the teacher.
    assert np.sum(got_s * got_t, axis=-1).mean() < 0.99


def test_augment_keeps_cls_sep_and_padding(packed: Path) -> None:
    from train import augment

    data = np.load(packed / "data.npz")
    vocab = data["vocab"]
    cls, sep = int(np.searchsorted(vocab, 101)), int(np.searchsorted(vocab, 102))
    ids, lengths = data["train_ids"], data["train_len"]
    rng = np.random.default_rng(0)
    out, out_len = augment(ids, lengths, rng, 1.0, 0.2, len(vocab), cls, sep)
    assert (out_len <= lengths).all() and (out_len < lengths).any()
    rows = np.arange(len(out))
    assert (out[:, 0] == cls).all() and (out[rows, out_len - 1] == sep).all()
    pad = np.arange(out.shape[1])[None, :] >= out_len[:, None]
    assert (out[pad] == 0).all()
    inner = ~pad & (np.arange(out.shape[1])[None, :] > 0)
    inner[rows, out_len - 1] = False
    assert ((out[inner] >= 1) & (out[inner] < len(vocab))).all()
    assert (ids == data["train_ids"]).all()  # the corpus itself is left as it was


def test_two_steps_write_layers_the_recipe_loads(packed: Path, tmp_path: Path) -> None:
    import torch
    from minilm import build_student_3_layers

    out = tmp_path / "out"
    cmd = [sys.executable, str(GPU / "train.py"), "--data", str(packed), "--out", str(out),
           "--name", "t", "--device", "cpu", "--max-steps", "2", "--batch", "8",
           "--seconds", "600", "--eval-every", "1000", "--crop", "0.5", "--replace", "0.1"]  # fmt: skip
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "done: 2 steps, 16 sentences" in run.stdout
    saved = torch.load(out / "t.pt")
    student = build_student_3_layers(tuple(saved["init_layers"]))
    student.bert.encoder.layer.load_state_dict({k: v.float() for k, v in saved["layers"].items()})
    curve = (out / "t.json").read_text()
    assert '"heldout_cosine"' in curve and '"stdlib_cosine"' in curve

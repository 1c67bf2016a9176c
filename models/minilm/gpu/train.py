"""Distill the MiniLM teacher into the 3-layer student on one GPU, in plain torch.

    python train.py --data DIR --out DIR --name A --seconds 360 [options]

The GPU machine has torch but neither transformers nor safetensors, so this is a
plain-torch BERT encoder (post-LayerNorm, erf GELU, eps 1e-12: BertModel's eager
maths, checked against it on CPU by tests/export/test_minilm_student_gpu.py) loaded
from the fp16 state dicts prepare.py wrote. The recipe is distill_student.py's: frozen
teacher embeddings, loss (1 - pooled cosine) + hidden-weight x last-layer token MSE
(+ layer-weight x MSE of student layer k against teacher layer 2k+1), AdamW, linear
warm-up then cosine decay, gradient clipping 1.0, bf16 autocast. The schedule runs on
wall-clock time (progress = elapsed / --seconds), so a run ends on time whatever its
throughput. Optional augmentation (new inputs for the same function to match): random
contiguous crops of a sentence, and random word-piece replacement.

Every --eval-every seconds it measures in fp32 the mean cosine to the teacher on the
held-out packages and on the recipe's standard-library eval split; when the held-out
cosine is the best so far it writes the layers (fp16, key names as the shipped
safetensors file without the "layer." prefix) to OUT/NAME.pt, and the curve to
OUT/NAME.json at every evaluation, so a killed run still leaves its best weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, HEADS, FFN, EPS = 384, 12, 1536, 1e-12
TEACHER_FOR = (1, 3, 5)  # student layer k is trained towards teacher layer 2k+1


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int, norm: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if norm:
            self.LayerNorm = nn.LayerNorm(d_out, eps=EPS)


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self = _SelfAttention()
        self.output = _Dense(HIDDEN, HIDDEN, norm=True)


class Layer(nn.Module):
    """One BertLayer, same parameter names, so state dicts load as they are."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.attention = _Attention()
        self.intermediate = _Dense(HIDDEN, FFN, norm=False)
        self.output = _Dense(FFN, HIDDEN, norm=True)
        self.p = dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        a = self.attention.self

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, HEADS, HIDDEN // HEADS).transpose(1, 2)

        p = self.p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(
            heads(a.query(x)), heads(a.key(x)), heads(a.value(x)), attn_mask=bias, dropout_p=p
        )
        ctx = ctx.transpose(1, 2).reshape(b, n, HIDDEN)
        o = self.attention.output
        h = o.LayerNorm(x + F.dropout(o.dense(ctx), p, self.training))
        f = F.gelu(self.intermediate.dense(h))
        return self.output.LayerNorm(h + F.dropout(self.output.dense(f), p, self.training))


class Embeddings(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, HIDDEN)
        self.position_embeddings = nn.Embedding(512, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.position_embeddings.weight[: ids.shape[1]]
        x = self.word_embeddings(ids) + pos + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class Encoder(nn.Module):
    def __init__(self, vocab: int, layers: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab)
        self.layer = nn.ModuleList(Layer(dropout) for _ in range(layers))
        self.p = dropout

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states: the embeddings' output, then each layer's."""
        # Padded keys are never attended to (BertModel adds finfo.min there: the same).
        bias = mask[:, None, None, :].bool()
        x = F.dropout(self.embeddings(ids), self.p, self.training)
        out = [x]
        for layer in self.layer:
            x = layer(x, bias)
            out.append(x)
        return out


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def load_teacher(state: dict[str, torch.Tensor]) -> Encoder:
    vocab = state["embeddings.word_embeddings.weight"].shape[0]
    enc = Encoder(vocab, 6)
    enc.load_state_dict(
        {
            k.removeprefix("encoder."): v.float()
            for k, v in state.items()
            if not k.startswith("pooler.")
        }
    )
    return enc.eval()


def make_student(teacher: Encoder, layers: dict[str, torch.Tensor] | None,
                 init: tuple[int, ...], dropout: float) -> Encoder:  # fmt: skip
    s = Encoder(teacher.embeddings.word_embeddings.num_embeddings, 3, dropout)
    s.embeddings.load_state_dict(teacher.embeddings.state_dict())
    if layers is None:
        for k, i in enumerate(init):
            s.layer[k].load_state_dict(teacher.layer[i].state_dict())
    else:
        s.layer.load_state_dict({k: v.float() for k, v in layers.items()})
    for p in s.embeddings.parameters():
        p.requires_grad_(False)
    return s


def batches(lengths: np.ndarray, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then sort chunks of 50 batches by length: little padding, random order."""
    order = rng.permutation(len(lengths))
    chunk = batch * 50
    out: list[np.ndarray] = []
    for i in range(0, len(order), chunk):
        part = order[i : i + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        out.extend(part[j : j + batch] for j in range(0, len(part), batch))
    return [out[i] for i in rng.permutation(len(out))]


def augment(ids: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, crop: float,
            replace: float, vocab: int, cls: int, sep: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Crop a fraction `crop` of the rows to a random span (>= 4 word pieces, CLS/SEP
    kept); replace a fraction `replace` of the word pieces by random ones."""
    ids, lengths = ids.copy(), lengths.copy()
    for r in np.nonzero(rng.random(len(ids)) < crop)[0]:
        n = int(lengths[r]) - 2  # word pieces between CLS and SEP
        if n < 6:
            continue
        span = int(rng.integers(4, n + 1))
        s = int(rng.integers(0, n - span + 1))
        body = ids[r, 1 + s : 1 + s + span].copy()
        ids[r] = 0
        ids[r, 0], ids[r, 1 : 1 + span], ids[r, 1 + span] = cls, body, sep
        lengths[r] = span + 2
    if replace > 0:
        pos = np.arange(ids.shape[1])[None, :]
        inner = (pos > 0) & (pos < (lengths[:, None] - 1))
        hit = inner & (rng.random(ids.shape) < replace)
        ids[hit] = rng.integers(1, vocab, size=int(hit.sum()))  # row 0 is padding
    return ids, lengths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="run")
    p.add_argument("--seconds", type=float, default=360.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many (a CPU check)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of the time")
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--layer-weight", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--crop", type=float, default=0.0)
    p.add_argument("--replace", type=float, default=0.0)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--init-layers", default="0,4,5")
    p.add_argument("--eval-every", type=float, default=20.0, help="seconds")
    p.add_argument("--eval-held", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    t0 = time.monotonic()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    data = np.load(args.data / "data.npz")
    vocab_ids = data["vocab"]
    cls = int(np.searchsorted(vocab_ids, 101))  # [CLS], [SEP] in the reduced table
    sep = int(np.searchsorted(vocab_ids, 102))
    teacher = load_teacher(torch.load(args.data / "teacher.fp16.pt")).to(dev)
    shipped = torch.load(args.data / "student.fp16.pt")
    if args.resume:
        init = tuple(shipped["init_layers"])
        student = make_student(teacher, shipped["layers"], init, args.dropout)
    else:
        init = tuple(int(i) for i in args.init_layers.split(","))
        student = make_student(teacher, None, init, args.dropout)
    student.to(dev)
    for q in teacher.parameters():
        q.requires_grad_(False)
    params = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=dev.type == "cuda")

    def lr_factor(progress: float) -> float:
        if progress < args.warmup:
            return max(progress / args.warmup, 1e-3)
        x = (progress - args.warmup) / max(1e-9, 1 - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, x)))

    def to_dev(ids: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(lengths.max())
        t = torch.from_numpy(ids[:, :n].astype(np.int64)).to(dev, non_blocking=True)
        m = torch.arange(n)[None, :] < torch.from_numpy(lengths.astype(np.int64))[:, None]
        return t, m.to(dev, dtype=torch.int64)

    rng = np.random.default_rng(args.seed)
    sel = rng.permutation(len(data["held_len"]))[: args.eval_held]
    evals = {"heldout": (data["held_ids"][sel], data["held_len"][sel]),
             "stdlib": (data["stdlib_ids"], data["stdlib_len"])}  # fmt: skip

    @torch.no_grad()
    def embed(model: Encoder, ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        model.eval()
        out = []
        for i in range(0, len(ids), 256):
            t, m = to_dev(ids[i : i + 256], lengths[i : i + 256])
            out.append(pooled(model(t, m)[-1], m))
        return torch.cat(out)

    targets = {k: embed(teacher, *v) for k, v in evals.items()}
    curve: list[dict[str, float]] = []
    best = -1.0
    args.out.mkdir(parents=True, exist_ok=True)

    def evaluate(step: int, seen: int, elapsed: float) -> None:
        nonlocal best
        row: dict[str, float] = {"step": step, "sentences_seen": seen,
                                 "elapsed_s": round(elapsed, 1)}  # fmt: skip
        for k, (ids, lengths) in evals.items():
            row[f"{k}_cosine"] = round(float((embed(student, ids, lengths) * targets[k]).sum(-1)
                                             .mean()), 5)  # fmt: skip
        if row["heldout_cosine"] > best:
            best = row["heldout_cosine"]
            layers = {k: v.detach().half().cpu() for k, v in student.layer.state_dict().items()}
            torch.save({"layers": layers, "init_layers": list(init), "row": row},
                       args.out / f"{args.name}.pt")  # fmt: skip
            row["saved"] = 1
        curve.append(row)
        print(args.name, json.dumps(row), flush=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "corpus": str(data["corpus"]),
             "train_sentences": len(data["train_len"]), "curve": curve}, indent=1) + "\n")  # fmt: skip

    train_ids, train_len = data["train_ids"], data["train_len"]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    start = time.monotonic()
    evaluate(0, 0, time.monotonic() - t0)
    step = seen = 0
    next_eval = args.eval_every
    done = False
    while not done:
        for idx in batches(train_len, args.batch, rng):
            elapsed = time.monotonic() - start
            progress = elapsed / args.seconds
            if progress >= 1.0 or (args.max_steps and step >= args.max_steps):
                done = True
                break
            for g in opt.param_groups:
                g["lr"] = args.lr * lr_factor(progress)
            ids, lengths = augment(train_ids[idx], train_len[idx], rng, args.crop, args.replace,
                                   len(vocab_ids), cls, sep)  # fmt: skip
            t, m = to_dev(ids, lengths)
            student.train()
            with autocast:
                with torch.no_grad():
                    t_out = teacher(t, m)
                s_out = student(t, m)
            t_last, s_last = t_out[-1].float(), s_out[-1].float()
            cos = 1 - (pooled(s_last, m) * pooled(t_last, m)).sum(-1).mean()
            mf = m.unsqueeze(-1).float()
            denom = mf.sum() * HIDDEN

            def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return (((a.float() - b.float()) ** 2) * mf).sum() / denom  # noqa: B023

            loss = cos + args.hidden_weight * mse(s_last, t_last)
            if args.layer_weight:
                for k, tl in enumerate(TEACHER_FOR[:-1]):
                    loss = loss + args.layer_weight * mse(s_out[k + 1], t_out[tl + 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            seen += len(idx)
            if time.monotonic() - start >= next_eval:
                next_eval += args.eval_every
                evaluate(step, seen, time.monotonic() - t0)
    evaluate(step, seen, time.monotonic() - t0)
    print(args.name, f"done: {step} steps, {seen} sentences, best held-out {best}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

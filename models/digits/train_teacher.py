"""Train the digits teacher and save its state_dict (models/digits/teacher.pt).

    python models/digits/train_teacher.py [--epochs 30] [--out teacher.pt]

The recipe loads this checkpoint: the build starts, as in real use, from a model
that someone already trained.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_data import load_splits
from digits_models import build_teacher

log = logging.getLogger("train_teacher")


def train(epochs: int = 30, lr: float = 3e-3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    splits = load_splits(seed)
    x = torch.from_numpy(splits["train"]["inputs"])
    y = torch.from_numpy(splits["train"]["labels"])
    model = build_teacher()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * ((len(x) + 63) // 64))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            # Small random shifts: a teacher that generalizes is worth distilling.
            xb = torch.roll(x[idx], shifts=tuple(np.random.randint(-1, 2, 2)), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.info("epoch %d loss %.4f", epoch + 1, float(loss))
    model.eval()
    with torch.no_grad():
        xe = torch.from_numpy(splits["eval"]["inputs"])
        acc = (model(xe).argmax(1).numpy() == splits["eval"]["labels"]).mean() * 100
    log.info("teacher eval accuracy %.2f%%", acc)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "teacher.pt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    np.random.seed(0)
    model = train(args.epochs)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

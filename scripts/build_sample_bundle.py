"""Build the sample digits bundle shipped in models/digits/ (needs the export extra).

A small CNN trained on scikit-learn's bundled digits (no download), exported to
ONNX (and TFLite when litert-torch is installed), packaged and signed with the
demo key. The export pipeline (`edge-export build models/digits/recipe.toml`)
makes the fully optimized version; this script keeps the agent's sample stable.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from export.package import package_model

ROOT = Path(__file__).resolve().parents[1]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "digits")
    parser.add_argument("--key", type=Path, default=ROOT / "models/keys/demo-INSECURE.key")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(args.seed)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(30):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean())
    print(f"test accuracy {acc:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model, (torch.from_numpy(x[:1]),), str(onnx_path),
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip
        tflite_path = None
        try:
            import litert_torch

            edge = litert_torch.convert(model, (torch.from_numpy(x[:1]),))
            tflite_path = Path(tmp) / "model.tflite"
            edge.export(str(tflite_path))
        except ImportError:
            print("litert-torch not installed: the sample carries ONNX only")
        out = package_model(
            onnx_path=onnx_path,
            tflite_path=tflite_path,
            name="digits",
            version=args.version,
            golden_inputs={"input": x[test][:8]},
            key_path=args.key,
            out_dir=args.out,
            labels=[str(i) for i in range(10)],
            extra_manifest={"figures": {"accuracy": round(acc, 4), "eval_cases": len(test)}},
        )
    print(out)


if __name__ == "__main__":
    main()

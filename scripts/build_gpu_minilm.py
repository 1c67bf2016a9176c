"""Build the two MiniLM bundles the GPU tier and bench/gpu.py use (tests/gpu/README.md).

`edge-export build models/minilm/recipe.toml` ships the variant it selects (INT8 on a
CPU); the GPU tier wants both: this exports the float model the same way the pipeline
does and packages each with `edge-export package` (the same golden rule the pipeline
writes), as minilm-float-1.0.0 and minilm-int8-1.0.0.

    python scripts/build_gpu_minilm.py --int8-bundle out/minilm-1.0.0.edgebundle --out DIR
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models" / "minilm"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--int8-bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    from agent.bundle import unpack_bundle
    from agent.signing import load_public_key
    from export.package import package_model

    key = ROOT / "models/keys/demo-INSECURE.key"
    pub = load_public_key(ROOT / "models/keys/demo-INSECURE.pub")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        verified = unpack_bundle(args.int8_bundle, work / "int8", [pub])
        with np.load(work / "int8" / "golden/inputs.npz") as data:
            golden = {k: data[k] for k in data.files}
        from minilm import build_teacher

        model = build_teacher()
        float_path = work / "float.onnx"
        names = ["input_ids", "attention_mask"]
        torch.onnx.export(
            model,
            tuple(torch.from_numpy(golden[n][:2]) for n in names),
            str(float_path),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "input_ids_dim1"},
                "attention_mask": {0: "batch", 1: "attention_mask_dim1"},
                "embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
            do_constant_folding=True,
        )
        int8_path = work / "int8" / verified.manifest.formats["onnx"]
        for kind, path in (("float", float_path), ("int8", int8_path)):
            out = package_model(
                onnx_path=path,
                tflite_path=None,
                name=f"minilm-{kind}",
                version="1.0.0",
                golden_inputs=golden,
                key_path=key,
                out_dir=args.out,
                runs=10,
            )
            print(out, out.stat().st_size)


if __name__ == "__main__":
    main()

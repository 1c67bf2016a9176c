"""Rebuild the sample bundle shipped as models/digits/digits-1.0.0.edgebundle (export extra).

The sample is what the build pipeline makes of models/digits/recipe.toml (distilled,
pruned, INT8, ONNX and TFLite, gates, the golden tolerance rule per output and
device family), released under version 1.0.0 with the INT8 ONNX and the float TFLite
selected, and signed with the demo key:

    python -m scripts.build_sample_bundle        # = edge-export build models/digits/recipe.toml
                                                 #   --version 1.0.0, bundle moved into place

The version stays 1.0.0 because the tests, docs and demo build newer versions of it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from export.pipeline.build import Options, run_build

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "digits")
    parser.add_argument("--key", type=Path, default=ROOT / "models/keys/demo-INSECURE.key")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="edgerun-sample-") as tmp:
        # The INT8 ONNX (what a device should run: a third of the size, faster) and the
        # float TFLite, whatever this machine's latency noise says: the sample then
        # exercises both kinds of golden rule (INT8 steps, float rounding).
        options = Options(version=args.version, prefer={"onnx": "int8", "tflite": "float"})
        result = run_build(ROOT / "models/digits/recipe.toml", Path(tmp), args.key, options)
        target = args.out / result.bundle.name
        shutil.copyfile(result.bundle, target)
        print(f"{target}: selected {result.report['selected']}")


if __name__ == "__main__":
    main()

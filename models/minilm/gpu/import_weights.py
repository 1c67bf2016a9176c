"""Turn a GPU run's layers (train.py's NAME.pt) into the shipped student file.

    python models/minilm/gpu/import_weights.py B.pt [--out models/minilm/student/...]

Writes the fp16 safetensors file (key names "layer.<k>...", init_layers metadata) and its
.sha256, as distill_student.py does, then loads it back through minilm.build_student
(the real transformers model) and prints its mean cosine to the teacher on the
held-out packages and on the recipe's eval split, so the file is checked here, on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from minilm import STUDENT_WEIGHTS, build_student, build_teacher  # noqa: E402


def main() -> int:
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, default=STUDENT_WEIGHTS)
    p.add_argument("--held", type=int, default=1024, help="held-out sentences to check")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = torch.load(args.run)
    tensors = {f"layer.{k}": v.to(torch.float16).contiguous() for k, v in run["layers"].items()}
    keep = ",".join(str(i) for i in run["init_layers"])
    save_file(tensors, str(args.out),
              metadata={"format": "pt", "of": "encoder.layer (3 layers)", "init_layers": keep})  # fmt: skip
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    args.out.with_name(args.out.name + ".sha256").write_text(f"{digest}  {args.out.name}\n")
    print(f"wrote {args.out} sha256 {digest}; GPU run's last row {run.get('row')}")

    from distill_student import embed, tokenizer
    from minilm_corpus import cached_corpus, sample
    from minilm_data import sentences

    tok, teacher, student = tokenizer(), build_teacher(), build_student(args.out)
    for name, texts in (("heldout", sample(cached_corpus().heldout, args.held, 1)),
                        ("stdlib", sentences(640)[384:])):  # fmt: skip
        cos = (embed(student, tok, texts) * embed(teacher, tok, texts)).sum(-1)
        print(
            f"{name}: {len(texts)} sentences, mean cosine {float(cos.mean()):.4f}, "
            f"min {float(cos.min()):.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

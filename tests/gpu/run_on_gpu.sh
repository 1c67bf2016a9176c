#!/usr/bin/env bash
# Run on the GPU machine, in this checkout, once the payload is in /tmp/g
# (tests/gpu/README.md): ortgpu.part0* (the onnxruntime-gpu wheel, split), whl/*.whl,
# mini.part0* (the MiniLM bundles' tar, split; optional). Installs into /tmp/site,
# then runs the GPU tier and bench/gpu.py; figures go under $OUT when set.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ ! -d /tmp/site/onnxruntime ]; then
  cat /tmp/g/ortgpu.part0* > /tmp/g/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  if ls /tmp/g/mini.part0* >/dev/null 2>&1; then
    mkdir -p /tmp/g/minilm && cat /tmp/g/mini.part0* | tar -x -C /tmp/g/minilm || exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --target /tmp/site \
    /tmp/g/onnxruntime_gpu-*.whl /tmp/g/whl/*.whl || exit 3
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import onnxruntime as ort
from agent.runtimes.ort_providers import capi_directory, system_problem, elf_needed, PROVIDER_LIBRARY
print("onnxruntime", ort.__version__, ort.get_available_providers())
capi = capi_directory()
for p, lib in PROVIDER_LIBRARY.items():
    print(p, "needs", elf_needed(capi / lib))
    print(p, "problem:", system_problem(capi)(p))
PY
EDGERUN_GPU_MINILM=/tmp/g/minilm timeout 300 python3 -m pytest -q -p no:cacheprovider \
  tests/gpu -rfEs 2>&1 | grep -v "plugin EP device found" | tee "$OUT/tier.txt" | tail -40
timeout 240 python3 bench/gpu.py --minilm /tmp/g/minilm --runs ${RUNS:-100} --warmup 10 --agent \
  --out "$OUT/gpu.json" 2>&1 | grep -v "plugin EP device found" | tee "$OUT/bench.txt" | tail -30

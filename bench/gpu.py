"""CPU against CUDA: latency at batch 1 and 32, RSS and GPU memory, time to ready.

For the sample bundle and the MiniLM bundles (float and INT8, `--minilm DIR`), each
provider runs in a fresh child process (so RSS and GPU memory are that provider's
own): the agent's OrtRuntime opens the bundle's model with [provider] (+ CPU for
the nodes a GPU provider does not take), "ready" is session open plus the first
result, then `--runs` timed runs per batch size (medians; `--warmup` untimed first).
GPU memory is this process's `usedGpuMemory` from NVML (nvidia-ml-py).
`--agent` also times `edge-agent run` to its first 200 on /v2/health/ready with the
sample on each provider (golden replay on: a refusal is printed as such).

    python bench/gpu.py --minilm /tmp/minilm --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from _common import DEMO_PUB, ROOT, SAMPLE

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
MB = 1024 * 1024


def _feeds(directory: Path, manifest: Any, rows: int) -> dict[str, np.ndarray]:
    with np.load(directory / manifest.golden_inputs) as data:
        golden = {k: data[k] for k in data.files}
    out = {}
    for spec in manifest.inputs:
        array = golden[spec.name]
        reps = -(-rows // array.shape[0])
        out[spec.name] = np.concatenate([array] * reps)[:rows]
    return out


def _gpu_used() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return round(proc.usedGpuMemory / MB, 1)
        return 0.0
    except Exception:  # no NVML here: not a figure
        return None


def child(bundle: Path, provider: str, runs: int, warmup: int) -> dict[str, Any]:
    from agent.bundle import unpack_bundle
    from agent.runtimes.ort import OrtConfig, OrtRuntime
    from agent.signing import load_public_key

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    verified = unpack_bundle(bundle, work / "b", [load_public_key(DEMO_PUB)])
    manifest = verified.manifest
    directory = work / "b"
    model = directory / manifest.formats["onnx"]
    providers = [provider] if provider == CPU else [provider, CPU]
    one = _feeds(directory, manifest, 1)
    t0 = time.perf_counter()
    rt = OrtRuntime(model, manifest.inputs, manifest.outputs, OrtConfig(providers=providers))
    rt.run(one)
    ready_ms = (time.perf_counter() - t0) * 1000
    result: dict[str, Any] = {
        "bundle": f"{manifest.name}-{manifest.version}",
        "file": manifest.formats["onnx"],
        "provider": provider,
        "providers": rt.providers(),
        "ready_ms": round(ready_ms, 1),
    }
    for batch in (1, 32):
        feeds = _feeds(directory, manifest, batch)
        for _ in range(warmup):
            rt.run(feeds)
        times = []
        for _ in range(runs):
            s = time.perf_counter()
            rt.run(feeds)
            times.append((time.perf_counter() - s) * 1000)
        result[f"p50_ms_b{batch}"] = round(statistics.median(times), 4)
    result["rss_mb"] = round(psutil.Process().memory_info().rss / MB, 1)
    result["gpu_mb"] = _gpu_used()
    return result


def run_child(bundle: Path, provider: str, runs: int, warmup: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(bundle), provider, str(runs), str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        return {"bundle": bundle.name, "provider": provider, "error": done.stderr[-800:]}
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def agent_ready(provider: str) -> dict[str, Any]:
    """Spawn to first ready of `edge-agent run` with the sample on `provider`."""
    from _common import agent_process

    providers = f'["{provider}"]' if provider == CPU else f'["{provider}", "{CPU}"]'
    extra = f"[runtimes.onnxruntime]\nproviders = {providers}\n"
    try:
        with agent_process(SAMPLE, extra=extra) as (proc, _sock, ready):
            rss = psutil.Process(proc.pid).memory_info().rss / MB
        return {"provider": provider, "ready_s": round(ready, 2), "rss_mb": round(rss, 1)}
    except Exception as exc:  # refused at start (e.g. golden replay): a result, not a crash
        return {"provider": provider, "error": str(exc)[-600:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minilm", type=Path, help="folder with minilm-*.edgebundle")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--agent", action="store_true", help="also time edge-agent to ready")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        bundle, provider, runs, warmup = args.child
        print(json.dumps(child(Path(bundle), provider, int(runs), int(warmup))))
        return
    bundles = [SAMPLE]
    if args.minilm:
        bundles += sorted(args.minilm.glob("minilm-*.edgebundle"))
    rows = [run_child(b, p, args.runs, args.warmup) for b in bundles for p in (CPU, CUDA)]
    print(
        f"{'bundle':<34} {'provider':<22} {'ready ms':>9} {'b1 p50 ms':>10} {'b32 p50 ms':>11} "
        f"{'RSS MB':>8} {'GPU MB':>8}  really on"
    )
    for r in rows:
        name = f"{r['bundle']} {r.get('file', '')}"
        if "error" in r:
            print(f"{name:<34} {r['provider']:<22} error: {r['error'].splitlines()[-1]}")
            continue
        print(
            f"{name:<34} {r['provider']:<22} {r['ready_ms']:>9.1f} {r['p50_ms_b1']:>10.4f} "
            f"{r['p50_ms_b32']:>11.4f} {r['rss_mb']:>8.1f} {r['gpu_mb']!s:>8}  "
            f"{','.join(p.replace('ExecutionProvider', '') for p in r['providers'])}"
        )
    for b in {r["bundle"] + r.get("file", "") for r in rows}:
        pair = {r["provider"]: r for r in rows if r["bundle"] + r.get("file", "") == b}
        if CPU in pair and CUDA in pair and "error" not in pair[CPU] and "error" not in pair[CUDA]:
            print(
                f"CUDA/CPU latency {b}: batch 1 {pair[CUDA]['p50_ms_b1'] / pair[CPU]['p50_ms_b1']:.2f}x,"
                f" batch 32 {pair[CUDA]['p50_ms_b32'] / pair[CPU]['p50_ms_b32']:.2f}x"
            )
    ready = [agent_ready(p) for p in (CPU, CUDA)] if args.agent else []
    for r in ready:
        print(f"edge-agent run to ready, sample on {r['provider']}: {r}")
    if args.out:
        args.out.write_text(json.dumps({"models": rows, "agent": ready}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

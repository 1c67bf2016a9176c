#!/usr/bin/env bash
# The device agent on an emulated aarch64 Linux (qemu-user + Debian arm64 python3.11).
#
#   scripts/aarch64_smoke.sh        # exit 0 when every check passed
#
# The sysroot and the aarch64 wheels come from scripts/aarch64_rootfs.sh (cached under
# $EDGERUN_AARCH64_CACHE); edgerun is installed fresh from this checkout on each run.
# Under qemu-aarch64 (10.0, see aarch64_rootfs.sh) it runs `edge-agent check-config`, `verify` (the sample bundle,
# and a tampered copy that must be refused), then `edge-agent run` on the sample bundle,
# offline on a Unix socket, once per runtime (onnxruntime, then LiteRT). For each run it
# waits for readiness, sends inferences through the local API from a native client (the
# socket is shared) and from the emulated `edge-agent infer/status`, checks the answers
# against the bundle's golden outputs and scikit-learn's digits labels (when sklearn is
# installed on the host), prints the figures, sends SIGTERM and expects exit code 0.
#
# Env: EDGERUN_AARCH64_CACHE (see aarch64_rootfs.sh), EDGERUN_AARCH64_KEEP=1 keeps the work
# directory, EDGERUN_AARCH64_RUNTIMES="onnxruntime litert" picks the runtimes to serve,
# EDGERUN_AARCH64_CPU (qemu -cpu, default cortex-a53), PYTHON (host python with numpy).
# Then the variant choice: a multi-variant bundle built on the host (tests/variant_bundles.py,
# its INT8 golden file deliberately wrong) must be served by a float variant, the INT8 one
# failing its golden replay; the figures are printed (emulated: they rank nothing).
# Figures are under emulation: they say nothing about real ARM hardware.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
T_START=$SECONDS
PYTHON="${PYTHON:-python3}"
RUNTIMES="${EDGERUN_AARCH64_RUNTIMES:-onnxruntime litert}"
# The emulated core: Cortex-A53 is plain ARMv8.0-A (Raspberry Pi 3 / Zero 2 W, i.MX 8M, many
# SoCs), so a wheel that needs a later extension fails here instead of on such a board.
# "max" enables everything qemu implements (SVE2, SME, ...); `qemu-aarch64 -cpu help` lists.
CPU="${EDGERUN_AARCH64_CPU:-cortex-a53}"
BUNDLE="$ROOT/models/digits/digits-1.0.0.edgebundle"
PUBKEY="$ROOT/models/keys/demo-INSECURE.pub"
READY_TIMEOUT_S="${EDGERUN_AARCH64_READY_TIMEOUT:-180}"
STOP_TIMEOUT_S=60

say() { echo "aarch64_smoke: [$((SECONDS - T_START))s] $*"; }
AGENT_PID=""
WORK=""
fail() {
    echo "aarch64_smoke: FAILED: $*" >&2
    if [ -n "$WORK" ]; then
        for f in "$WORK"/*.log; do
            [ -f "$f" ] || continue
            echo "----- $f (last 40 lines)" >&2
            tail -n 40 "$f" >&2
        done
    fi
    exit 1
}
cleanup() {
    if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -KILL "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    if [ -n "$WORK" ] && [ "${EDGERUN_AARCH64_KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    elif [ -n "$WORK" ]; then
        echo "aarch64_smoke: work directory kept: $WORK" >&2
    fi
}
trap cleanup EXIT

[ -f "$BUNDLE" ] || fail "sample bundle $BUNDLE missing"
[ -f "$PUBKEY" ] || fail "demo public key $PUBKEY missing"
"$PYTHON" -c 'import numpy' 2>/dev/null || fail "host $PYTHON has no numpy (the native API client needs it)"

# A short path: Unix socket paths are limited to 107 bytes.
WORK="$(mktemp -d /tmp/edgerun-aarch64.XXXXXX)"
t0=$SECONDS
paths="$(EDGERUN_AARCH64_EDGERUN_DIR="$WORK/edgerun" bash "$ROOT/scripts/aarch64_rootfs.sh")" ||
    fail "scripts/aarch64_rootfs.sh could not make the aarch64 sysroot (see above)"
SYSROOT="$(sed -n 's/^SYSROOT=//p' <<<"$paths")"
SITE="$(sed -n 's/^SITE=//p' <<<"$paths")"
EDGERUN_DIR="$(sed -n 's/^EDGERUN_DIR=//p' <<<"$paths")"
QEMU="$(sed -n 's/^QEMU=//p' <<<"$paths")"
say "sysroot ready in $((SECONDS - t0)) s: $SYSROOT"
# Keep the cache from being rebuilt under this run (aarch64_rootfs.sh rebuilds exclusively).
exec 8>>"$(dirname "$SYSROOT")/.lock"
flock -s 8

# The emulated interpreter, with only the sysroot, the aarch64 wheels and this edgerun.
# The agent reads every EDGERUN_* variable as a config override and refuses unknown ones,
# so this harness's own variables (EDGERUN_AARCH64_CACHE, ...) must not reach it.
GUEST=(env -u PYTHONHOME -u PYTHONSTARTUP -u VIRTUAL_ENV)
for var in $(compgen -e); do
    case "$var" in EDGERUN_*) GUEST+=(-u "$var") ;; esac
done
GUEST+=(
    PYTHONPATH="$EDGERUN_DIR:$SITE" PYTHONNOUSERSITE=1
    "$QEMU" -cpu "$CPU" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11")
guest_python() { "${GUEST[@]}" "$@"; }
# edge-agent as pip installed it (the console script of pyproject's [project.scripts]).
# The short commands do no linear algebra: one OpenBLAS thread spares ~1 s of emulated
# thread start-up each (`run` keeps OpenBLAS's default, as on a device).
guest_agent() { OPENBLAS_NUM_THREADS=1 guest_python "$EDGERUN_DIR/bin/edge-agent" "$@"; }
# The native client: host python, the same pure-Python edgerun build, the shared socket.
host_client() { PYTHONPATH="$EDGERUN_DIR" "$PYTHON" "$WORK/client.py" "$@"; }

cat >"$WORK/client.py" <<'PY'
"""Native-side checks for aarch64_smoke.sh: talk to the emulated agent over its socket."""
import io
import json
import sys
import tarfile
import time

import numpy as np

from agent.api.client import ApiClient


def golden(bundle, fmt):
    with tarfile.open(bundle) as tar:
        def npz(name):
            with np.load(io.BytesIO(tar.extractfile(name).read())) as data:
                return {k: data[k] for k in data.files}
        return npz("golden/inputs.npz"), npz(f"golden/outputs-{fmt}.npz")


def wait_ready(sock, timeout, pid):
    import os
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit("the agent exited before it was ready")
        try:
            with ApiClient(sock, timeout=5) as c:
                if c.get_json("/v2/edgerun/status").get("ready"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"the agent was not ready after {timeout} s")


def check(sock, bundle, runtime, out_npy):
    fmt = {"onnxruntime": "onnx", "litert": "tflite"}[runtime]
    problems = []
    fig = {}
    with ApiClient(sock, timeout=120) as c:
        st = c.get_json("/v2/edgerun/status")
        model = st["model"]["name"]
        served = st["model"]["runtime"]
        fig["runtime"] = f"{served.get('runtime')} {served.get('version', '')}".strip()
        if served.get("runtime") != runtime:
            problems.append(f"serves {served.get('runtime')}, expected {runtime}")
        # 1. The bundle's golden cases (recorded on x86 at export time).
        gin, gout = golden(bundle, fmt)
        out = c.infer(model, {k: v.astype(np.float32) for k, v in gin.items()})
        # A sample for the emulated `edge-agent infer`: 10 labelled digits, else the golden cases.
        sample, expect = next(iter(gin.values())), next(iter(gout.values())).argmax(1)
        for name, want in gout.items():
            got = out[name]
            diff = float(np.max(np.abs(got - want)))
            fig[f"golden_max_abs_diff_{name}"] = diff
            if not np.array_equal(got.argmax(1), want.argmax(1)):
                problems.append(f"golden {name}: argmax {got.argmax(1)} != {want.argmax(1)}")
            if not np.allclose(got, want, atol=1e-3, rtol=1e-3):
                problems.append(f"golden {name}: max abs diff {diff:.3g} beyond 1e-3")
        # 2. Real digits with their labels (scikit-learn ships the data set; no download).
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            fig["digits"] = "sklearn not installed on the host: golden outputs only"
        else:
            # The first 256 of the 1797 (one batch): emulated convolutions are slow.
            d = load_digits()
            x = (d.images[:256] / 16.0).astype(np.float32)[:, None]
            target = d.target[:256]
            preds = []
            t = time.perf_counter()
            for i in range(0, len(x), 256):
                preds.append(next(iter(c.infer(model, {"input": x[i : i + 256]}, binary=True).values())).argmax(1))
            fig["batch256_ms_mean"] = round((time.perf_counter() - t) * 1000 / len(preds), 1)
            acc = float((np.concatenate(preds) == target).mean())
            fig["digits_accuracy"] = round(acc, 4)
            fig["digits_cases"] = len(x)
            if acc < 0.95:
                problems.append(f"accuracy on scikit-learn digits {acc:.4f} < 0.95")
            sample, expect = x[:10], target[:10]
        np.save(out_npy, sample.astype(np.float32))
        with open(out_npy + ".labels", "w") as f:
            f.write(" ".join(str(v) for v in expect))
        # 3. Latency of one-item requests, JSON encoding, through the socket.
        one = next(iter(gin.values()))[:1].astype(np.float32)
        lat = []
        for _ in range(100):
            t = time.perf_counter()
            c.infer(model, {"input": one})
            lat.append((time.perf_counter() - t) * 1000)
        fig["latency_ms_p50"] = round(float(np.percentile(lat, 50)), 2)
        fig["latency_ms_p95"] = round(float(np.percentile(lat, 95)), 2)
        st = c.get_json("/v2/edgerun/status")
        fig["rss_mb"] = st["memory"]["rss_mb"]
        fig["peak_rss_mb"] = st["memory"]["peak_rss_mb"]
        fig["agent_p50_ms"] = st["metrics"]["p50_ms"]
        fig["requests"] = st["metrics"]["requests"]
        if st["metrics"]["errors"]:
            problems.append(f"{st['metrics']['errors']} request error(s) counted by the agent")
    print(json.dumps(fig))
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def variants(sock):
    """The variant the emulated agent chose: INT8 (a wrong golden file) must have failed."""
    problems = []
    with ApiClient(sock, timeout=120) as c:
        st = c.get_json("/v2/edgerun/status")
    sel = (st.get("model") or {}).get("selection") or {}
    by_id = {v["id"]: v for v in sel.get("variants", [])}
    if set(by_id) != {"onnx-fp32", "onnx-int8", "tflite-fp32"}:
        problems.append(f"selection lists {sorted(by_id)}")
    int8 = by_id.get("onnx-int8", {})
    if int8.get("status") != "failed" or int8.get("code") != "bundle.golden_mismatch":
        problems.append(f"onnx-int8 (wrong golden file) is {int8.get('status')} {int8.get('code')}")
    chosen = sel.get("chosen")
    if chosen not in ("onnx-fp32", "tflite-fp32") or by_id.get(chosen, {}).get("status") != "served":
        problems.append(f"serves {chosen!r}, expected a float variant")
    if st["model"].get("variant") != chosen:
        problems.append(f"status model.variant {st['model'].get('variant')!r} != {chosen!r}")
    print(json.dumps({"chosen": chosen, "runtime": sel.get("runtime"),
                      **{f"{k}_p50_ms": v.get("p50_ms") for k, v in by_id.items()}}))
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def build_variants(out_dir):
    """The multi-variant test bundle (tests/variant_bundles.py), INT8 golden file wrong."""
    from pathlib import Path
    from agent.signing import load_private_key
    from tests.helpers import DEMO_KEY, unpack_sample
    from tests.variant_bundles import variant_bundle
    out = Path(out_dir)
    parts = unpack_sample(out / "sample")
    print(variant_bundle(parts, load_private_key(DEMO_KEY), out / "built", "1.1.0",
                         wrong=("onnx-int8",), label="smoke"))


def tamper(src, dst):
    """Copy the bundle with one byte of the model changed; signature stays the original."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w:", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            if m.name == "model.onnx":
                data = bytearray(data)
                data[len(data) // 2] ^= 0xFF
                data = bytes(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "wait-ready":
        wait_ready(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "check":
        sys.exit(check(*sys.argv[2:6]))
    elif cmd == "tamper":
        tamper(sys.argv[2], sys.argv[3])
    elif cmd == "variants":
        sys.exit(variants(sys.argv[2]))
    elif cmd == "build-variants":
        build_variants(sys.argv[2])
PY

# 0. The interpreter really is aarch64, with the pinned runtimes.
arch_line="$(guest_python -c 'import platform
from importlib.metadata import version
print(platform.machine(), "python", platform.python_version(),
      *(f"{p} {version(p)}" for p in ("numpy", "onnxruntime", "ai-edge-litert", "cryptography")))' \
    2>"$WORK/arch.log")" || fail "the emulated python does not run"
say "guest ($CPU): $arch_line"
[ "${arch_line%% *}" = aarch64 ] || fail "the guest interpreter reports ${arch_line%% *}, not aarch64"

write_config() { # runtime [bundle] -> $WORK/agent-<runtime>.toml ("auto": the variant choice)
    cat >"$WORK/agent-$1.toml" <<EOF
device_id = "qemu-aarch64"
state_dir = "$WORK/state-$1"
log_level = "info"

[model]
bundle = "${2:-$BUNDLE}"
runtime = "$1"

[trust]
public_keys = ["$PUBKEY"]

[api]
socket = "$WORK/$1.sock"
EOF
}
write_config onnxruntime

# 1. check-config
out="$(guest_agent check-config "$WORK/agent-onnxruntime.toml" 2>"$WORK/check-config.log")" ||
    fail "edge-agent check-config exited $?: $out"
say "check-config: $out"

# 2. verify the sample bundle (ed25519 signature and digests, with cryptography on aarch64)
t=$SECONDS
out="$(guest_agent verify --config "$WORK/agent-onnxruntime.toml" "$BUNDLE" 2>"$WORK/verify.log")" ||
    fail "edge-agent verify refused the sample bundle: $out"
grep -q "^OK " <<<"$out" || fail "edge-agent verify printed no OK line: $out"
say "verify: $(head -1 <<<"$out") ($((SECONDS - t)) s)"

# 3. ... and a copy with one byte of model.onnx flipped must be refused
host_client tamper "$BUNDLE" "$WORK/tampered.edgebundle" || fail "cannot write the tampered bundle"
set +e
out="$(guest_agent verify --key "$PUBKEY" "$WORK/tampered.edgebundle" 2>"$WORK/verify-tampered.log")"
rc=$?
set -e
[ "$rc" = 1 ] && grep -q "^REFUSED" <<<"$out" ||
    fail "the tampered bundle was not refused (exit $rc): $out"
say "verify tampered: $out"

# 4. serve the sample bundle, once per runtime
summary=()
for runtime in $RUNTIMES; do
    case "$runtime" in onnxruntime | litert) ;; *) fail "unknown runtime $runtime" ;; esac
    write_config "$runtime"
    sock="$WORK/$runtime.sock"
    log="$WORK/run-$runtime.log"
    start_ns=$(date +%s%N)
    # Not through a shell function: $! must be the emulated agent itself (env execs qemu).
    "${GUEST[@]}" "$EDGERUN_DIR/bin/edge-agent" run --config "$WORK/agent-$runtime.toml" >"$log" 2>&1 &
    AGENT_PID=$!
    host_client wait-ready "$sock" "$READY_TIMEOUT_S" "$AGENT_PID" ||
        fail "$runtime: edge-agent run did not become ready"
    ready_s=$(awk -v a="$start_ns" -v b="$(date +%s%N)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
    agent_ready="$(sed -n 's/.*ready in \([0-9.]*\) s.*/\1/p' "$log" | head -1)"
    say "$runtime: ready after ${ready_s} s wall clock (agent's own count: ${agent_ready:-?} s)"

    figures="$(host_client check "$sock" "$BUNDLE" "$runtime" "$WORK/sample.npy" 2>"$WORK/check-$runtime.log")" ||
        fail "$runtime: wrong answers or API errors: $(cat "$WORK/check-$runtime.log")"
    say "$runtime: figures $figures"

    # The emulated CLI client on the same socket (once: it does not depend on the runtime).
    if [ "$runtime" = "${RUNTIMES%% *}" ]; then
        # status and infer side by side: two emulated starts cost twice as much one by one.
        guest_agent status --socket "$sock" >"$WORK/status.json" 2>>"$WORK/cli.log" &
        status_pid=$!
        want="$(cat "$WORK/sample.npy.labels")"
        out="$(guest_agent infer --socket "$sock" --input "$WORK/sample.npy" 2>>"$WORK/cli.log")" ||
            fail "$runtime: edge-agent infer (emulated) exited non-zero: $out"
        got="$("$PYTHON" -c 'import json, sys; print(" ".join(json.load(sys.stdin)["top1"]))' <<<"$out")" ||
            fail "$runtime: edge-agent infer printed no top1: $out"
        [ "$got" = "$want" ] || fail "$runtime: edge-agent infer says $got, expected $want"
        wait "$status_pid" || fail "$runtime: edge-agent status (emulated) exited non-zero: $(cat "$WORK/status.json")"
        grep -q '"ready": true' "$WORK/status.json" || fail "$runtime: edge-agent status does not say ready"
        say "$runtime: emulated edge-agent status: ready; infer: top1 $got as expected"
    fi

    # SIGTERM: drain, stop, exit 0.
    kill -TERM "$AGENT_PID"
    waited=0
    while kill -0 "$AGENT_PID" 2>/dev/null && [ $waited -lt $((STOP_TIMEOUT_S * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -0 "$AGENT_PID" 2>/dev/null && fail "$runtime: still running ${STOP_TIMEOUT_S} s after SIGTERM"
    set +e
    wait "$AGENT_PID"
    rc=$?
    set -e
    AGENT_PID=""
    [ "$rc" = 0 ] || fail "$runtime: edge-agent run exited $rc after SIGTERM"
    if grep -E "Traceback|CRITICAL|qemu: uncaught" "$log" >/dev/null; then
        fail "$runtime: the agent's log has a traceback or a crash"
    fi
    say "$runtime: SIGTERM -> exit 0 after $(awk -v w=$waited 'BEGIN { printf "%.1f", w / 10 }') s"
    summary+=("$runtime ready ${ready_s}s $figures")
done

# 5. A multi-variant bundle (onnx-fp32, onnx-int8 with a deliberately wrong golden file,
# tflite-fp32), runtime auto: the agent measures each variant under emulation and must
# serve a float one. Which float one says nothing (emulated timings); that it chose does.
vbundle="$(PYTHONPATH="$ROOT" "$PYTHON" "$WORK/client.py" build-variants "$WORK/variants" 2>"$WORK/build-variants.log" | tail -1)" ||
    fail "cannot build the multi-variant bundle on the host: $(tail -3 "$WORK/build-variants.log")"
write_config auto "$vbundle"
log="$WORK/run-auto.log"
"${GUEST[@]}" "$EDGERUN_DIR/bin/edge-agent" run --config "$WORK/agent-auto.toml" >"$log" 2>&1 &
AGENT_PID=$!
host_client wait-ready "$WORK/auto.sock" "$READY_TIMEOUT_S" "$AGENT_PID" ||
    fail "variants: edge-agent run did not become ready"
figures="$(host_client variants "$WORK/auto.sock" 2>"$WORK/check-variants.log")" ||
    fail "variants: $(cat "$WORK/check-variants.log")"
say "variants: $figures"
kill -TERM "$AGENT_PID"
set +e
wait "$AGENT_PID"
rc=$?
set -e
AGENT_PID=""
[ "$rc" = 0 ] || fail "variants: edge-agent run exited $rc after SIGTERM"
grep -E "Traceback|CRITICAL|qemu: uncaught" "$log" >/dev/null && fail "variants: traceback or crash in the log"
summary+=("variants $figures")

say "PASSED on emulated aarch64, $CPU ($arch_line) in $((SECONDS - t0)) s"
for line in "${summary[@]}"; do say "  $line"; done
say "(qemu-user timings and RSS include the emulator; they say nothing about real hardware)"

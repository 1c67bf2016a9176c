#!/usr/bin/env bash
# Build (or reuse) an emulated aarch64 Python for the device agent, without ARM hardware.
#
#   scripts/aarch64_rootfs.sh            # prints the paths as KEY=VALUE lines on stdout
#
# What it makes, cached under $EDGERUN_AARCH64_CACHE (default ~/.cache/edgerun/aarch64):
#   sysroot/   Debian 12 (bookworm) arm64 python3.11 and the shared libraries it and the
#              wheels need, unpacked with dpkg-deb -x (no chroot, no root needed). apt runs
#              with private state under apt-*/, so the host's apt config is left alone.
#   qemu/      qemu-aarch64 10.0 from Debian's bookworm-backports (a static binary). Debian
#              12's own qemu-user-static (7.2) dies with SIGSEGV in the wheels the project
#              pins: onnxruntime 1.31.1 on import, ai-edge-litert >= 2.2 when it builds an
#              interpreter. Both run under 10.0. QEMU_AARCH64=/path/to/qemu-aarch64 overrides.
#   site/      aarch64 manylinux wheels (pip install --target) of pyproject.toml's core
#              dependencies and its `device` and `litert` extras, as pinned there; the
#              constraints below pin what pyproject leaves open (ranges, transitive deps).
#   wheels/    the downloaded wheels
# and, on every call (it is cheap and must match the checkout), edgerun itself from this
# repository, built as a pure-Python wheel and installed with --no-deps into
# $EDGERUN_AARCH64_EDGERUN_DIR (default $EDGERUN_AARCH64_CACHE/edgerun).
#
# Run the agent with:
#   PYTHONPATH=$EDGERUN_DIR:$SITE $QEMU -L $SYSROOT $SYSROOT/usr/bin/python3.11 \
#       $EDGERUN_DIR/bin/edge-agent ...
#
# The cache is keyed on everything it is made of: change a pin and the next call rebuilds.
# Needs: apt-get, dpkg-deb, python3 -m pip, flock, tar; network access to the Debian archive
# and PyPI on a cold cache only. No root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${EDGERUN_AARCH64_CACHE:-$HOME/.cache/edgerun/aarch64}"
EDGERUN_DIR="${EDGERUN_AARCH64_EDGERUN_DIR:-$CACHE/edgerun}"
PYTHON="${PYTHON:-python3}"
MIRROR="${EDGERUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${EDGERUN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
QEMU_OVERRIDE="${QEMU_AARCH64:-}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian arm64 packages; apt adds their dependencies (libc6, libssl3, libffi8, zlib1g, ...).
# libstdc++6/libgcc-s1 are for the onnxruntime and LiteRT wheels, which do not bundle them.
DEBS=(python3.11-minimal libpython3.11-stdlib libstdc++6 libgcc-s1)

# Versions for what pyproject.toml does not pin exactly, so that a cold cache rebuilds the
# same thing. A package that pyproject pins with == is taken from pyproject instead.
CONSTRAINTS=(
    numpy==2.4.6
    cryptography==48.0.1
    cffi==2.1.1
    pycparser==3.12
    flatbuffers==25.12.19
    packaging==26.3
    protobuf==7.36.2
    ml-dtypes==0.6.0
    backports-strenum==1.2.8
    tqdm==4.70.1
    typing-extensions==4.16.0
)

# Bookworm's glibc is 2.36. pip expands only the legacy manylinux2014 alias to older tags,
# so list every manylinux_2_x tag the sysroot can load (numpy and onnxruntime are 2_27/2_28).
PIP_PLATFORM=(--platform manylinux2014_aarch64)
for minor in $(seq 17 36); do PIP_PLATFORM+=(--platform "manylinux_2_${minor}_aarch64"); done
PIP_PLATFORM+=(--python-version 3.11 --implementation cp --only-binary=:all:)

log() { echo "aarch64_rootfs: $*" >&2; }
die() { echo "aarch64_rootfs: ERROR: $*" >&2; exit 1; }

for tool in apt-get dpkg-deb dpkg flock sha256sum tar; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON -m pip does not work"
if [ -n "$QEMU_OVERRIDE" ]; then
    QEMU_OVERRIDE="$(command -v "$QEMU_OVERRIDE")" || die "QEMU_AARCH64=$QEMU_AARCH64 not found"
fi

# The device's requirements, from pyproject.toml: core dependencies + device + litert.
REQUIREMENTS="$("$PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project.get("optional-dependencies", {})
reqs = project.get("dependencies", []) + extras.get("device", []) + extras.get("litert", [])
seen = []
for r in reqs:
    if r not in seen:
        seen.append(r)
print("\n".join(seen))
PY
)" || die "cannot read the device requirements from $ROOT/pyproject.toml"
# Drop the constraints that pyproject pins exactly (pip refuses two different == pins).
pinned="$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' <<<"$REQUIREMENTS" | tr 'A-Z_.' 'a-z--')"
CONSTRAINTS_TXT=""
for c in "${CONSTRAINTS[@]}"; do
    grep -qx "${c%%==*}" <<<"$pinned" || CONSTRAINTS_TXT+="$c"$'\n'
done

HOST_ARCH="$(dpkg --print-architecture)"
KEY="$(printf '%s\n' "format 3" "$MIRROR" "$SECURITY_MIRROR" "$HOST_ARCH" "${DEBS[@]}" \
    "$REQUIREMENTS" "$CONSTRAINTS_TXT" "${PIP_PLATFORM[@]}" | sha256sum | cut -c1-16)"
mkdir -p "$CACHE"
# $CACHE/.lock: shared while the cache is read or used (aarch64_smoke.sh holds it for its run),
# exclusive while it is rebuilt, so a rebuild waits for the runs using the old one.
exec 9>"$CACHE/.lock"

# apt with private state: $1 dir, $2 architecture, $3... apt-get arguments.
apt_private() {
    local dir="$1" arch="$2"
    shift 2
    mkdir -p "$dir/etc/preferences.d" "$dir/state/lists/partial" "$dir/cache/archives/partial"
    [ -f "$dir/state/status" ] || : >"$dir/state/status"
    apt-get -o "APT::Architecture=$arch" -o "APT::Architectures::=$arch" \
        -o "Dir::State=$dir/state" -o "Dir::State::status=$dir/state/status" \
        -o "Dir::Cache=$dir/cache" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" \
        -o "Dir::Etc::SourceList=$dir/etc/sources.list" -o "Dir::Etc::SourceParts=/nonexistent" \
        -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$dir/etc/preferences.d" \
        -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)" "$@"
}

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

build_sysroot() { # -> $1/sysroot, $1/debs.txt
    local apt="$CACHE/apt-arm64" out="$1"
    mkdir -p "$apt/etc" "$out/sysroot"
    cat >"$apt/etc/sources.list" <<EOF
deb [arch=arm64 signed-by=$KEYRING] $MIRROR bookworm main
deb [arch=arm64 signed-by=$KEYRING] $MIRROR bookworm-updates main
deb [arch=arm64 signed-by=$KEYRING] $SECURITY_MIRROR bookworm-security main
EOF
    log "apt-get update (arm64, private state in $apt)"
    apt_private "$apt" arm64 update -qq >&2 || die "apt-get update for arm64 failed"
    rm -f "$apt/cache/archives/"*.deb
    log "downloading ${DEBS[*]} and their dependencies (arm64)"
    apt_private "$apt" arm64 install -y -qq --download-only --no-install-recommends "${DEBS[@]}" >&2 ||
        die "apt-get download of the arm64 packages failed"
    local deb n=0
    for deb in "$apt/cache/archives/"*.deb; do
        dpkg-deb -x "$deb" "$out/sysroot"
        basename "$deb" >>"$out/debs.txt"
        n=$((n + 1))
    done
    rm -f "$apt/cache/archives/"*.deb
    log "unpacked $n Debian packages into the sysroot"
    [ -x "$out/sysroot/usr/bin/python3.11" ] || die "python3.11 missing from the unpacked sysroot"
}

fetch_qemu() { # -> $1/qemu/qemu-aarch64
    local apt="$CACHE/apt-$HOST_ARCH" out="$1"
    mkdir -p "$apt/etc" "$out/qemu"
    cat >"$apt/etc/sources.list" <<EOF
deb [arch=$HOST_ARCH signed-by=$KEYRING] $MIRROR bookworm-backports main
EOF
    log "apt-get update (bookworm-backports, $HOST_ARCH, private state in $apt)"
    apt_private "$apt" "$HOST_ARCH" update -qq >&2 || die "apt-get update for bookworm-backports failed"
    rm -f "$apt/cache/archives/"*.deb
    log "downloading qemu-user from bookworm-backports"
    (cd "$apt/cache/archives" && apt_private "$apt" "$HOST_ARCH" download -qq qemu-user/bookworm-backports) >&2 ||
        die "cannot download qemu-user from bookworm-backports"
    local deb tmpx
    deb="$(ls "$apt/cache/archives/"qemu-user_*.deb)"
    tmpx="$(mktemp -d "$out/qemu.XXXXXX")"
    dpkg-deb -x "$deb" "$tmpx"
    mv "$tmpx/usr/bin/qemu-aarch64" "$out/qemu/qemu-aarch64"
    basename "$deb" >"$out/qemu/version.txt"
    rm -rf "$tmpx" "$deb"
    "$out/qemu/qemu-aarch64" --version >/dev/null || die "the downloaded qemu-aarch64 does not run here"
}

# Byte-compile $3... for the sysroot's python3.11 ($1 out dir, $2 qemu). Debian compiles the
# stdlib in python3.11-minimal's postinst, which dpkg-deb -x does not run: without .pyc files
# every emulated start recompiles what it imports (seconds). A host Python 3.11 writes the
# same bytecode (3.11 kept one magic number) natively; any other runs it under emulation.
compile_py() {
    local out="$1" qemu="$2"
    shift 2
    if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        "$PYTHON" -m compileall -q -j 0 "$@" >/dev/null 2>&1 || true
    else
        "$qemu" -L "$out/sysroot" "$out/sysroot/usr/bin/python3.11" -m compileall -q "$@" \
            >/dev/null 2>&1 || true
    fi
}

install_wheels() { # $1 out dir, $2 qemu -> $1/site, $1/wheels
    local out="$1" qemu="$2"
    printf '%s\n' "$REQUIREMENTS" >"$out/requirements.txt"
    printf '%s' "$CONSTRAINTS_TXT" >"$out/constraints.txt"
    log "downloading aarch64 wheels for: $(tr '\n' ' ' <"$out/requirements.txt")"
    "$PYTHON" -m pip download -q "${PIP_PLATFORM[@]}" -d "$out/wheels" \
        -r "$out/requirements.txt" -c "$out/constraints.txt" >&2 ||
        die "pip download of the aarch64 wheels failed"
    "$PYTHON" -m pip install -q --no-deps --no-compile "${PIP_PLATFORM[@]}" \
        --target "$out/site" "$out/wheels/"*.whl >&2 || die "pip install --target of the aarch64 wheels failed"
    compile_py "$out" "$qemu" "$out/sysroot/usr/lib/python3.11" "$out/site"
    (cd "$out/wheels" && ls -1 -- *.whl) >"$out/wheels.txt"

    log "checking the emulated interpreter imports the wheels"
    PYTHONPATH="$out/site" PYTHONNOUSERSITE=1 "$qemu" -L "$out/sysroot" "$out/sysroot/usr/bin/python3.11" -c '
import platform, ssl, ctypes, numpy, psutil, onnxruntime, ai_edge_litert.interpreter
from cryptography.hazmat.primitives.asymmetric import ed25519
ed25519.Ed25519PrivateKey.generate()
assert platform.machine() == "aarch64", platform.machine()
print("aarch64_rootfs: aarch64 python", platform.python_version(), "numpy", numpy.__version__,
      "onnxruntime", onnxruntime.__version__)
' >&2 || die "the emulated python cannot import the aarch64 wheels"
}

cache_ok() {
    [ "$(cat "$CACHE/key" 2>/dev/null)" = "$KEY" ] && [ -x "$CACHE/sysroot/usr/bin/python3.11" ] &&
        [ -x "$CACHE/qemu/qemu-aarch64" ] && [ -d "$CACHE/site/onnxruntime" ]
}
started=$SECONDS
flock -s 9
if cache_ok; then
    log "cache warm: $CACHE"
else
    flock -u 9
    flock 9
fi
if ! cache_ok; then
    log "building in $CACHE (cold cache, or the package lists changed)"
    [ -f "$KEYRING" ] || die "$KEYRING missing (apt-get install debian-archive-keyring)"
    tmp="$CACHE/.build"
    rm -rf "$tmp" "$CACHE/key"
    mkdir -p "$tmp"
    build_sysroot "$tmp"
    fetch_qemu "$tmp"
    install_wheels "$tmp" "${QEMU_OVERRIDE:-$tmp/qemu/qemu-aarch64}"
    rm -rf "$CACHE/sysroot" "$CACHE/site" "$CACHE/wheels" "$CACHE/qemu"
    for item in sysroot site wheels qemu debs.txt wheels.txt requirements.txt constraints.txt; do
        mv "$tmp/$item" "$CACHE/$item"
    done
    rm -rf "$tmp"
    echo "$KEY" >"$CACHE/key"
    log "sysroot, qemu and wheels ready in $((SECONDS - started)) s"
fi
QEMU="${QEMU_OVERRIDE:-$CACHE/qemu/qemu-aarch64}"

# edgerun itself, from this checkout: a pure-Python wheel built from a copy of the sources
# (so the build leaves no egg-info or build/ in the work tree), installed with --no-deps.
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
(cd "$ROOT" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml README.md agent export fleet) |
    tar -xf - -C "$src" || die "cannot copy the edgerun sources from $ROOT"
if ! "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$src/dist" "$src" \
    >/dev/null 2>"$src/wheel.err"; then
    log "build without isolation failed ($(tail -1 "$src/wheel.err")); retrying isolated"
    "$PYTHON" -m pip wheel -q --no-deps -w "$src/dist" "$src" >&2 ||
        die "cannot build the edgerun wheel from $ROOT"
fi
rm -rf "$EDGERUN_DIR.new"
"$PYTHON" -m pip install -q --no-deps --ignore-requires-python --target "$EDGERUN_DIR.new" \
    "$src/dist/"edgerun-*.whl >&2 || die "cannot install the edgerun wheel"
rm -rf "$EDGERUN_DIR"
mv "$EDGERUN_DIR.new" "$EDGERUN_DIR"
[ -f "$EDGERUN_DIR/bin/edge-agent" ] || die "the edgerun wheel installed no edge-agent script"

echo "SYSROOT=$CACHE/sysroot"
echo "SITE=$CACHE/site"
echo "EDGERUN_DIR=$EDGERUN_DIR"
echo "PYTHON_AARCH64=$CACHE/sysroot/usr/bin/python3.11"
echo "QEMU=$QEMU"

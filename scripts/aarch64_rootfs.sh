#!/usr/bin/env bash
# Build (or reuse) an emulated aarch64 Python for the device agent, without ARM hardware.
#
#   scripts/aarch64_rootfs.sh            # prints the paths as KEY=VALUE lines on stdout
#
# What it makes, cached under $EDGERUN_AARCH64_CACHE (default ~/.cache/edgerun/aarch64):
#   sysroot/   Debian 12 (bookworm) arm64 python3.11 and the shared libraries it and the
#              wheels need, unpacked with dpkg-deb -x (no chroot, no root needed). apt runs
#              with private state under apt/, so the host's apt config is left alone.
#   site/      aarch64 manylinux wheels of the device's dependencies (pip install --target)
#   wheels/    the downloaded wheels
# and, on every call (it is cheap and must match the checkout), edgerun itself from this
# repository, built as a pure-Python wheel and installed with --no-deps into
# $EDGERUN_AARCH64_EDGERUN_DIR (default $EDGERUN_AARCH64_CACHE/edgerun).
#
# Run the agent with:
#   PYTHONPATH=$EDGERUN_DIR:$SITE qemu-aarch64-static -L $SYSROOT $SYSROOT/usr/bin/python3.11 \
#       $EDGERUN_DIR/bin/edge-agent ...
#
# The cache is keyed on the package lists below: change one and the next call rebuilds.
# Needs: apt-get, dpkg-deb, python3 -m pip, qemu-aarch64-static (Debian: qemu-user-static),
# flock, and network access to the Debian archive and PyPI on a cold cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${EDGERUN_AARCH64_CACHE:-$HOME/.cache/edgerun/aarch64}"
EDGERUN_DIR="${EDGERUN_AARCH64_EDGERUN_DIR:-$CACHE/edgerun}"
PYTHON="${PYTHON:-python3}"
MIRROR="${EDGERUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${EDGERUN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
QEMU="${QEMU_AARCH64:-qemu-aarch64-static}"
export PIP_ROOT_USER_ACTION=ignore

# onnxruntime: the pyproject pins 1.31.1, whose aarch64 wheel dies with SIGSEGV on import
# under qemu-user 7.2 (Debian 12's qemu-user-static); 1.27.0 is the newest 1.27.x and runs.
ORT_VERSION="${EDGERUN_AARCH64_ORT:-1.27.0}"

# Debian arm64 packages; apt adds their dependencies (libc6, libssl3, libffi8, zlib1g, ...).
# libstdc++6/libgcc-s1 are for the onnxruntime and LiteRT wheels, which do not bundle them.
DEBS=(python3.11-minimal libpython3.11-stdlib libstdc++6 libgcc-s1)

# The device extra (pyproject.toml: device + litert) with onnxruntime swapped as said above,
# and its transitive dependencies, all pinned so that a cold cache rebuilds the same thing.
WHEELS=(
    numpy==2.4.6
    psutil==7.2.2
    paho-mqtt==2.2.0
    cryptography==48.0.1
    cffi==2.1.1
    pycparser==3.12
    "onnxruntime==$ORT_VERSION"
    flatbuffers==25.12.19
    packaging==26.3
    protobuf==7.36.2
    ai-edge-litert==2.3.0
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

command -v "$QEMU" >/dev/null 2>&1 ||
    die "$QEMU not found: apt-get install -y qemu-user-static (or set QEMU_AARCH64)"
for tool in apt-get dpkg-deb flock sha256sum tar; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON -m pip does not work"

KEY="$(printf '%s\n' "format 1" "$MIRROR" "$SECURITY_MIRROR" "${DEBS[@]}" "${WHEELS[@]}" "${PIP_PLATFORM[@]}" | sha256sum | cut -c1-16)"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

build_cache() {
    local apt="$CACHE/apt" tmp="$CACHE/.build"
    rm -rf "$tmp"
    mkdir -p "$apt/etc/sources.list.d" "$apt/etc/preferences.d" "$apt/state/lists/partial" \
        "$apt/cache/archives/partial" "$tmp/sysroot" "$tmp/wheels"
    cat >"$apt/etc/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Architectures: arm64
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: bookworm-security
Components: main
Architectures: arm64
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] ||
        die "/usr/share/keyrings/debian-archive-keyring.gpg missing (apt-get install debian-archive-keyring)"
    : >"$apt/state/status"
    local opts=(
        -o "APT::Architecture=arm64" -o "APT::Architectures::=arm64"
        -o "Dir::State=$apt/state" -o "Dir::State::status=$apt/state/status"
        -o "Dir::Cache=$apt/cache" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
        -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt/etc/sources.list.d"
        -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$apt/etc/preferences.d"
        -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)"
    )
    log "apt-get update (arm64, private state in $apt)"
    apt-get "${opts[@]}" update -qq >&2 || die "apt-get update for arm64 failed"
    rm -f "$apt/cache/archives/"*.deb
    log "downloading ${DEBS[*]} and their dependencies (arm64)"
    apt-get "${opts[@]}" install -y -qq --download-only --no-install-recommends "${DEBS[@]}" >&2 ||
        die "apt-get download of the arm64 packages failed"
    local deb n=0
    for deb in "$apt/cache/archives/"*.deb; do
        dpkg-deb -x "$deb" "$tmp/sysroot"
        basename "$deb" >>"$tmp/debs.txt"
        n=$((n + 1))
    done
    log "unpacked $n Debian packages into the sysroot"
    [ -x "$tmp/sysroot/usr/bin/python3.11" ] || die "python3.11 missing from the unpacked sysroot"

    log "downloading aarch64 wheels: ${WHEELS[*]}"
    "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps "${PIP_PLATFORM[@]}" \
        -d "$tmp/wheels" "${WHEELS[@]}" >&2 || die "pip download of the aarch64 wheels failed"
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --no-compile \
        "${PIP_PLATFORM[@]}" --target "$tmp/site" "$tmp/wheels/"*.whl >&2 ||
        die "pip install --target of the aarch64 wheels failed"
    (cd "$tmp/wheels" && ls -1 ./*.whl | sed 's|^\./||') >"$tmp/wheels.txt"

    log "checking the emulated interpreter imports the wheels"
    PYTHONPATH="$tmp/site" PYTHONNOUSERSITE=1 PYTHONHOME='' \
        "$QEMU" -L "$tmp/sysroot" "$tmp/sysroot/usr/bin/python3.11" -c '
import platform, ssl, ctypes, numpy, psutil, onnxruntime, ai_edge_litert.interpreter
from cryptography.hazmat.primitives.asymmetric import ed25519
ed25519.Ed25519PrivateKey.generate()
assert platform.machine() == "aarch64", platform.machine()
print("aarch64 python", platform.python_version(), "numpy", numpy.__version__,
      "onnxruntime", onnxruntime.__version__)
' >&2 2> >(grep -v 'cpuid_info warning' >&2) || die "the emulated python cannot import the aarch64 wheels"
    # Byte-compile with the emulated interpreter once (warm runs then skip it).
    PYTHONPATH="$tmp/site" PYTHONNOUSERSITE=1 "$QEMU" -L "$tmp/sysroot" \
        "$tmp/sysroot/usr/bin/python3.11" -m compileall -q -j 0 "$tmp/site" >/dev/null 2>&1 || true

    rm -rf "$CACHE/sysroot" "$CACHE/site" "$CACHE/wheels"
    mv "$tmp/sysroot" "$tmp/site" "$tmp/wheels" "$CACHE/"
    mv "$tmp/debs.txt" "$CACHE/debs.txt"
    mv "$tmp/wheels.txt" "$CACHE/wheels.txt"
    rm -rf "$tmp"
    echo "$KEY" >"$CACHE/key"
}

started=$SECONDS
if [ "$(cat "$CACHE/key" 2>/dev/null)" = "$KEY" ] && [ -x "$CACHE/sysroot/usr/bin/python3.11" ] &&
    [ -d "$CACHE/site/onnxruntime" ]; then
    log "cache warm: $CACHE"
else
    log "building the aarch64 sysroot in $CACHE (cold cache or changed package lists)"
    build_cache
    log "sysroot and wheels ready in $((SECONDS - started)) s"
fi

# edgerun itself, from this checkout: a pure-Python wheel built from a copy of the sources
# (so the build leaves no egg-info or build/ in the work tree), installed with --no-deps.
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
(cd "$ROOT" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml README.md agent export fleet) |
    tar -xf - -C "$src" || die "cannot copy the edgerun sources from $ROOT"
if ! "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$src/dist" "$src" >/dev/null 2>"$src/wheel.err"; then
    log "build without isolation failed ($(tail -1 "$src/wheel.err")); retrying isolated"
    "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$src/dist" "$src" >&2 ||
        die "cannot build the edgerun wheel from $ROOT"
fi
rm -rf "$EDGERUN_DIR.new"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python \
    --target "$EDGERUN_DIR.new" "$src/dist/"edgerun-*.whl >&2 || die "cannot install the edgerun wheel"
rm -rf "$EDGERUN_DIR"
mv "$EDGERUN_DIR.new" "$EDGERUN_DIR"
[ -f "$EDGERUN_DIR/bin/edge-agent" ] || die "the edgerun wheel installed no edge-agent script"

echo "SYSROOT=$CACHE/sysroot"
echo "SITE=$CACHE/site"
echo "EDGERUN_DIR=$EDGERUN_DIR"
echo "PYTHON_AARCH64=$CACHE/sysroot/usr/bin/python3.11"
echo "QEMU=$(command -v "$QEMU")"

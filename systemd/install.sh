#!/bin/sh
# Install the edgerun agent as a systemd service on this device.
#   sudo systemd/install.sh [--extras device,litert] [--prefix /opt/edgerun] [--jetson]
#                           [--python python3.11]
# Creates a venv, the edgerun user, /etc/edgerun/agent.toml (if absent) and the unit;
# --jetson adds the drop-in that opens the GPU's device nodes (docs/jetson.md).
set -eu
EXTRAS=device
PREFIX=/opt/edgerun
JETSON=no
PYTHON=python3
SRC=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -gt 0 ]; do
    case "$1" in
        --extras) EXTRAS=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --jetson) JETSON=yes; shift ;;
        --python) PYTHON=$2; shift 2 ;;  # the interpreter of the venv (3.11 or newer)
        --root) ROOT=$2; shift 2 ;;  # stage into a directory (packaging, tests)
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
ROOT=${ROOT:-}
[ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }

install -d "$ROOT/etc/edgerun/keys" "$ROOT/usr/lib/systemd/system" \
    "$ROOT/usr/lib/sysusers.d" "$ROOT/usr/lib/tmpfiles.d" "$ROOT/usr/local/bin"
install -m 0644 "$SRC/systemd/edgerun-agent.service" "$ROOT/usr/lib/systemd/system/"
install -m 0644 "$SRC/systemd/edgerun.sysusers" "$ROOT/usr/lib/sysusers.d/edgerun.conf"
install -m 0644 "$SRC/systemd/edgerun.tmpfiles" "$ROOT/usr/lib/tmpfiles.d/edgerun.conf"
if [ "$JETSON" = yes ]; then
    install -d "$ROOT/etc/systemd/system/edgerun-agent.service.d"
    install -m 0644 "$SRC/systemd/edgerun-agent.service.d/jetson.conf" \
        "$ROOT/etc/systemd/system/edgerun-agent.service.d/jetson.conf"
fi
if [ ! -e "$ROOT/etc/edgerun/agent.toml" ]; then
    # No key is trusted until the operator adds their own (never the demo key).
    install -m 0640 "$SRC/systemd/agent.toml.example" "$ROOT/etc/edgerun/agent.toml"
fi
if [ -z "$ROOT" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "$PYTHON is older than 3.11: pass --python python3.11 (docs/install.md)" >&2; exit 1; }
    "$PYTHON" -m venv "$PREFIX"
    "$PREFIX/bin/pip" install --quiet "$SRC[$EXTRAS]"
    ln -sf "$PREFIX/bin/edge-agent" /usr/local/bin/edge-agent
    systemd-sysusers edgerun.conf 2>/dev/null || systemd-sysusers
    systemd-tmpfiles --create edgerun.conf 2>/dev/null || systemd-tmpfiles --create
    systemctl daemon-reload
    echo "installed. Put your release public key in /etc/edgerun/keys/release.pub, then:"
    echo "  systemctl enable --now edgerun-agent"
fi

#!/usr/bin/env bash
# Prepare a machine for `make test` / `make demo`: system packages where missing, a virtual environment, and the
# package installed in it with its C extension. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

need=()
command -v "$PY" >/dev/null 2>&1 || need+=(python3)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || need+=(make)
if command -v "$PY" >/dev/null 2>&1; then
    "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
    inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [ -f "$inc/Python.h" ] || need+=(python3-dev)
fi
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
# The tests start their own mosquitto (TLS, ACLs) on a free loopback port: the broker must be installed.
have mosquitto || need+=(mosquitto)
# Gateway storage tests run against a real PostgreSQL: the one the machine runs, or one the fixture starts with initdb.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# The unit file is checked with systemd-analyze verify.
have systemd-analyze || need+=(systemd)
# The stream-source tests encode their input with ffmpeg and serve it over RTSP with GStreamer's gst-rtsp-server,
# run by the system Python (its GObject bindings; the venv has none): the elements tests/rtsp_server.py uses.
have ffmpeg || need+=(ffmpeg)
gst_probe='import gi; gi.require_version("Gst", "1.0"); gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer; Gst.init(None)
names = ("matroskademux", "h264parse", "rtph264pay", "rtpbin", "udpsink", "appsink")
raise SystemExit(any(Gst.ElementFactory.find(n) is None for n in names))'
/usr/bin/python3 -c "$gst_probe" >/dev/null 2>&1 || need+=(python3-gi gir1.2-gst-rtsp-server-1.0
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad)
for extra in "$@"; do
    # Extra requirements come as "command:package" pairs.
    cmd=${extra%%:*}; pkg=${extra#*:}
    have "$cmd" || need+=("$pkg")
done

if [ ${#need[@]} -gt 0 ]; then
    echo "bootstrap: installing system packages: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The alert rules (deploy/prometheus) are checked with promtool. Debian's prometheus package has it, but installing
# that package starts a Prometheus server: unpack only usr/bin/promtool from it into .cache/promtool (no daemon, no
# root), where tests/test_deploy_files.py looks when promtool is not on PATH.
PROMTOOL_DIR=.cache/promtool
if ! have promtool && [ ! -x "$PROMTOOL_DIR/usr/bin/promtool" ]; then
    deb_dir=$(mktemp -d)
    chmod 755 "$deb_dir"  # apt downloads as its _apt user
    if ! (cd "$deb_dir" && apt-get download -qq prometheus >/dev/null 2>&1); then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO=sudo
        $SUDO apt-get update -qq  # no package lists yet
        (cd "$deb_dir" && apt-get download -qq prometheus)
    fi
    mkdir -p "$PROMTOOL_DIR"
    dpkg-deb --fsys-tarfile "$deb_dir"/prometheus_*.deb | tar -x -C "$PROMTOOL_DIR" ./usr/bin/promtool
    rm -rf "$deb_dir"
    echo "bootstrap: promtool unpacked: $PROMTOOL_DIR/usr/bin/promtool"
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools >/dev/null
"$VENV/bin/python" -m pip install -q -e '.[dev]'
# The build must have produced the extension: a silent fallback to the numpy twin is not an install.
"$VENV/bin/python" -c 'import edge._native as n; print("bootstrap: edge._native built, paths:", n.simd_paths())'

#!/usr/bin/env bash
# The emulated aarch64 tier (`make test-arm64`; docs/arm64.md): run the test subset of tools/qemu/tests.txt on an
# aarch64 CPython under qemu-user with QEMU_CPU=cortex-a72 (the Raspberry Pi 4 core), against edge._native
# cross-compiled for aarch64, so the NEON kernels and the aarch64 builds of numpy, onnxruntime and cryptography are
# what the tests exercise.
#
# Steps, each cached under .cache/arm64/ in a directory named after the hash of its inputs (a second run only
# re-syncs the source tree and runs the tests):
#   1. host tools: the cross compiler and qemu-user-static from apt when missing; binfmt_misc mounted and the
#      aarch64 entry registered (from the qemu package's own binfmt.d file) so aarch64 binaries run, also when a test
#      starts a subprocess with sys.executable;
#   2. sysroot: the dependency closure of tools/qemu/packages.txt resolved for arm64 by apt-get from the machine's
#      own sources (private apt state: the machine's dpkg configuration is not touched), unpacked with dpkg -x, an
#      ARM /proc/cpuinfo added (onnxruntime crashes on the host's x86 one), the stdlib precompiled on the host;
#   3. wheels: tools/qemu/requirements.txt for cp311 aarch64 with the host's pip (--target, every manylinux tag up
#      to the sysroot's glibc: with manylinux2014 alone pip picks an onnxruntime built for numpy 1.x);
#   4. edge._native: the sources and flags of setup.py, cross-compiled with -Werror;
#   5. a copy of the work tree with the aarch64 extension dropped in (the repository's edge/ keeps its x86 build),
#      then a check that NEON is the chosen backend, then pytest with EDGE_REQUIRE_NATIVE=1.
# On an aarch64 machine (a board) it skips all that and runs the check and the same tests natively with the venv.
#
# Invariant: it never passes silently. A step that cannot run (no binfmt, no root to install or register, a
# download that fails, a backend other than native-neon) prints why and exits non-zero; pytest's exit status is
# the script's. Extra arguments go to pytest (e.g. `-x`, `-k neon`).
set -Eeuo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/tools/qemu
CACHE=${EDGE_ARM64_CACHE:-$ROOT/.cache/arm64}
HOST_PY=${HOST_PY:-$ROOT/.venv/bin/python}
# Bump when a step's recipe changes in a way its input files do not show.
RECIPE=1

say() { printf 'arm64: %s\n' "$*"; }
die() {
    printf 'arm64: FAILED: %s\n' "$*" >&2
    exit 1
}
# Any other failing command: say which, so no failure is silent.
trap 'die "line $LINENO: \"$BASH_COMMAND\" failed"' ERR
T0=$SECONDS
step_done() { say "$1 ($((SECONDS - T0)) s so far)"; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

[ -x "$HOST_PY" ] || die "$HOST_PY is missing: run tools/bootstrap.sh (make test does) first"
mkdir -p "$CACHE"
# One run at a time per cache: a second make test-arm64 waits instead of racing on the same directories.
exec 9>"$CACHE/.lock"
flock 9

mapfile -t TESTS < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^[[:space:]]*$/d' "$HERE/tests.txt")
[ ${#TESTS[@]} -gt 0 ] || die "tools/qemu/tests.txt lists no tests"

# Check that the interpreter `run` starts is aarch64 with NEON chosen, then run the listed tests with it.
check_and_test() {
    local where=$1 probe machine chosen status=0
    shift
    probe=$(run -c 'import platform
from edge.inference import preprocess as p
print(platform.machine(), p.backend(), ",".join(p.available_backends()))') ||
        die "the $where interpreter cannot import edge (output above)"
    say "$where: $probe"
    read -r machine chosen _ <<<"$probe"
    [ "$machine" = aarch64 ] || die "the interpreter reports machine '$machine', not aarch64"
    [ "$chosen" = native-neon ] || die "preprocessing chose '$chosen' on aarch64, not native-neon"
    step_done "NEON chosen"
    say "pytest, $where: ${TESTS[*]}"
    # pytest_no_skips: a skip (a wheel missing, a module skipped whole) fails the run instead of passing it.
    run -m pytest -q -p no:cacheprovider -p pytest_no_skips "${TESTS[@]}" "$@" || status=$?
    say "done in $((SECONDS - T0)) s, pytest exit status $status"
    exit $status
}

# On an aarch64 machine (a board) nothing needs emulating: the same checks and tests, natively, with the repository's
# own build of the extension.
if [ "$(uname -m)" = aarch64 ]; then
    run() { (env -u EDGE_PREPROCESS EDGE_REQUIRE_NATIVE=1 PYTHONPATH="$HERE" "$HOST_PY" "$@"); }
    check_and_test "native aarch64" "$@"
fi

# ---------------------------------------------------------------- 1. host tools and binfmt

need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
[ -f /usr/lib/binfmt.d/qemu-aarch64.conf ] || need+=(qemu-user-static)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v flock >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    say "installing host packages: ${need[*]}"
    $SUDO apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${need[@]}" || die "apt-get install ${need[*]} failed"
fi

BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
    $SUDO mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null ||
        die "binfmt_misc is not mounted at $BINFMT and cannot be mounted here: aarch64 binaries cannot run"
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    # What systemd-binfmt would do at boot with the qemu package's own entry (magic, mask, interpreter, flags F).
    $SUDO sh -c "cat /usr/lib/binfmt.d/qemu-aarch64.conf > $BINFMT/register" 2>/dev/null ||
        die "cannot register the qemu-aarch64 binfmt entry in $BINFMT (needs root): aarch64 binaries cannot run"
fi
grep -qx enabled "$BINFMT/status" || die "binfmt_misc is disabled ($BINFMT/status): aarch64 binaries cannot run"
grep -qx enabled "$BINFMT/qemu-aarch64" || die "the qemu-aarch64 binfmt entry is disabled: aarch64 binaries cannot run"
step_done "host tools and binfmt ready"

# ---------------------------------------------------------------- 2. sysroot

# The machine's apt sources are an input: another suite or snapshot means other packages.
sources=$(find /etc/apt -maxdepth 2 -type f \( -name '*.list' -o -name '*.sources' \) | sort)
SYSROOT_KEY=$( (echo "recipe $RECIPE"; cat "$HERE/packages.txt" "$HERE/cpuinfo"; for f in $sources; do cat "$f"; done) | sha256sum | cut -c1-16)
SYSROOT=$CACHE/sysroot-$SYSROOT_KEY
if [ ! -f "$SYSROOT/.complete" ]; then
    say "building the arm64 sysroot ($SYSROOT)"
    aptdir=$CACHE/apt
    mkdir -p "$aptdir/state/lists/partial" "$aptdir/cache/archives/partial"
    : >"$aptdir/state/status" # an empty system: apt resolves the whole closure
    APT=(apt-get -q -o "Dir::State=$aptdir/state" -o "Dir::State::status=$aptdir/state/status"
        -o "Dir::Cache=$aptdir/cache" -o APT::Architecture=arm64 -o APT::Architectures::=arm64)
    "${APT[@]}" update >"$aptdir/update.log" 2>&1 || { cat "$aptdir/update.log" >&2; die "apt-get update (arm64) failed"; }
    rm -f "$aptdir/cache/archives/"*.deb
    mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$HERE/packages.txt")
    "${APT[@]}" install --download-only -y --no-install-recommends "${pkgs[@]}" >"$aptdir/download.log" 2>&1 ||
        { cat "$aptdir/download.log" >&2; die "downloading the arm64 packages failed"; }
    tmp=$SYSROOT.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"
    for deb in "$aptdir/cache/archives/"*.deb; do dpkg -x "$deb" "$tmp" || die "dpkg -x $deb failed"; done
    [ -x "$tmp/usr/bin/python3.11" ] || die "the sysroot has no usr/bin/python3.11"
    mkdir -p "$tmp/proc"
    cp "$HERE/cpuinfo" "$tmp/proc/cpuinfo"
    # The highest manylinux tag the wheels may have: the sysroot's glibc.
    dpkg-deb -f "$aptdir/cache/archives/"libc6_*_arm64.deb Version | sed 's/-.*//' >"$tmp/.glibc"
    # Same bytecode magic on the host's 3.11: compiling here saves every emulated run from doing it.
    "$HOST_PY" -m compileall -q -j 2 -x '/(test|idlelib|tkinter|turtledemo|lib2to3)/' "$tmp/usr/lib/python3.11" \
        >/dev/null || die "compileall of the sysroot stdlib failed"
    touch "$tmp/.complete"
    mv "$tmp" "$SYSROOT"
fi
find "$CACHE" -maxdepth 1 -name 'sysroot-*' ! -path "$SYSROOT" -exec rm -rf {} +
GLIBC=$(cat "$SYSROOT/.glibc")
step_done "sysroot ready (glibc $GLIBC)"

# ---------------------------------------------------------------- 3. wheels

WHEELS_KEY=$( (echo "recipe $RECIPE glibc $GLIBC"; cat "$HERE/requirements.txt") | sha256sum | cut -c1-16)
WHEELS=$CACHE/wheels-$WHEELS_KEY
if [ ! -f "$WHEELS/.complete" ]; then
    say "installing aarch64 wheels ($WHEELS)"
    plats=(--platform manylinux2014_aarch64)
    for ((v = 17; v <= ${GLIBC#2.}; v++)); do plats+=(--platform "manylinux_2_${v}_aarch64"); done
    tmp=$WHEELS.tmp
    rm -rf "$tmp"
    "$HOST_PY" -m pip install -q --disable-pip-version-check --target "$tmp" --only-binary=:all: \
        --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none "${plats[@]}" --platform any \
        -r "$HERE/requirements.txt" >"$CACHE/pip.log" 2>&1 ||
        { cat "$CACHE/pip.log" >&2; die "pip could not install the aarch64 wheels"; }
    touch "$tmp/.complete"
    mv "$tmp" "$WHEELS"
fi
find "$CACHE" -maxdepth 1 -name 'wheels-*' ! -path "$WHEELS" -exec rm -rf {} +
# Found by the interpreter itself, also in subprocesses whose PYTHONPATH a test replaces.
mkdir -p "$SYSROOT/usr/lib/python3/dist-packages"
echo "$WHEELS" >"$SYSROOT/usr/lib/python3/dist-packages/edge-arm64-wheels.pth"
step_done "wheels ready"

# ---------------------------------------------------------------- 4. edge._native for aarch64

# setup.py is the one list of sources and flags.
mapfile -t build < <("$HOST_PY" - <<'EOF'
import ast

found = {}
for node in ast.parse(open("setup.py", encoding="utf-8").read()).body:
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        if node.targets[0].id in ("SOURCES", "compile_args"):
            found[node.targets[0].id] = ast.literal_eval(node.value)
print(" ".join(found["SOURCES"]))
print(" ".join(found["compile_args"]))
EOF
)
read -r -a srcs <<<"${build[0]}"
read -r -a cflags <<<"${build[1]}"
[ ${#srcs[@]} -gt 0 ] && [ ${#cflags[@]} -gt 0 ] || die "cannot read SOURCES and compile_args from setup.py"
SUFFIX=$(sed -n "s/.*'EXT_SUFFIX': '\([^']*\)'.*/\1/p" "$SYSROOT"/usr/lib/python3.11/_sysconfigdata__*.py | head -n1)
[ -n "$SUFFIX" ] || die "cannot read EXT_SUFFIX from the sysroot's sysconfigdata"
CC=${CROSS_CC:-aarch64-linux-gnu-gcc}
NATIVE_KEY=$( (echo "recipe $RECIPE $SYSROOT_KEY ${cflags[*]}"; "$CC" --version; cat setup.py native/*.c native/*.h) | sha256sum | cut -c1-16)
NATIVE=$CACHE/native-$NATIVE_KEY/_native$SUFFIX
if [ ! -f "$NATIVE" ]; then
    say "cross-compiling edge._native"
    mkdir -p "$(dirname "$NATIVE")"
    "$CC" --sysroot="$SYSROOT" -I"$SYSROOT/usr/include/python3.11" -Inative "${cflags[@]}" -Werror -fPIC -shared \
        "${srcs[@]}" -o "$NATIVE.tmp" || die "cross-compiling edge._native failed"
    mv "$NATIVE.tmp" "$NATIVE"
fi
find "$CACHE" -maxdepth 1 -name 'native-*' ! -path "$(dirname "$NATIVE")" -exec rm -rf {} +
step_done "edge._native built for aarch64"

# ---------------------------------------------------------------- 5. run

TREE=$CACHE/tree
# The whole work tree (tests read docs/ and tools/ too) without the host's builds, caches and environments.
# --delete keeps the copy exact; excluded names are not deleted, so bytecode and the hypothesis database of earlier
# emulated runs survive.
rsync -a --delete --exclude /.git --exclude /.venv --exclude /.cache --exclude /build --exclude /dist \
    --exclude '*.egg-info' --exclude __pycache__ --exclude '*.so' --exclude .mypy_cache --exclude .ruff_cache \
    --exclude .pytest_cache --exclude .hypothesis ./ "$TREE/"
cp "$NATIVE" "$TREE/edge/"

run() {
    (cd "$TREE" && env -u PYTHONHOME -u PYTHONSTARTUP -u VIRTUAL_ENV -u EDGE_PREPROCESS \
        QEMU_LD_PREFIX="$SYSROOT" QEMU_CPU=cortex-a72 EDGE_REQUIRE_NATIVE=1 PYTHONPATH="$TREE:$TREE/tools/qemu" \
        "$SYSROOT/usr/bin/python3.11" "$@")
}
check_and_test "emulated (qemu-aarch64, QEMU_CPU=cortex-a72)" "$@"

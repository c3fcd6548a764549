#!/usr/bin/env python3
"""Build the system image: an arm64 Debian box that boots under qemu-system-aarch64 (docs/system.md).

The image is the box as the Yocto layer installs it: edge.service from edge/data/ (unmodified) enabled, the ``edge``
system user in groups dialout and video, the layer's tmpfiles.d entry and /etc/edge/edge.toml, the factory models
read-only in /usr/share/edge/models, /data its own ext4 filesystem, the root filesystem mounted read-only. The box
package only: no edge.fleet. Added for the tests alone: a test agent answering on virtio-serial, journald copying to
the console, a udev name for the sensor UART.

Steps, each cached under ``.cache/system/`` (``EDGE_SYSTEM_CACHE``) in a directory named after a hash of its inputs;
a step whose directory is complete is not redone, and older keyed directories of the step are removed:

| step | inputs (the key) | result |
|---|---|---|
| rootfs | packages.txt, the machine's apt sources | Debian bookworm arm64 from mmdebstrap (postinsts emulated) |
| kernel | the apt sources, guest/init, MODULES | Debian's arm64 kernel and a busybox initramfs made on the host |
| sysroot | tools/qemu/packages.txt, the apt sources | Python headers and libc for cross-compiling edge._native |
| wheels | pyproject.toml's dependencies pinned by tools/qemu/requirements.txt, glibc | cp311 aarch64 wheels |
| native | setup.py, native/*, the compiler | edge._native for aarch64 |
| image | the keys above, edge/ (not fleet), the layer's files, guest/ | vmlinuz, initrd.img, rootfs.ext4, manifest |

The box goes in one of two ways, chosen by the one line ``BOX = ...``: ``box_from_wheels`` (the emulated tier's
way, with the sysroot, wheels and native steps: the layer's files, the user and a private venv installed from the
host) or ``box_from_deb`` (the Debian package of tools/deb/build.py, which caches its own work in .cache/deb/,
installed with dpkg inside the image, its maintainer scripts emulated; the sysroot, wheels and native steps are
then not needed).

Invariant: it never passes silently. A step that cannot run raises ``BuildError`` naming the step and the command;
nothing half-built is ever taken for a result (each step writes to ``<dir>.tmp`` and renames when complete).

Usage: ``build.py`` prints the image directory on its last line (``--quiet`` prints only that).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
HERE = ROOT / "tools" / "qemu" / "system"
GUEST = HERE / "guest"
LAYER_FILES = ROOT / "yocto" / "meta-edge" / "recipes-edge" / "edge" / "files"
CACHE = Path(os.environ.get("EDGE_SYSTEM_CACHE", ROOT / ".cache" / "system"))
# The fleet side never goes into the image, so its changes do not rebuild it.
FLEET = ROOT / "edge" / "fleet"
HOST_PY = Path(os.environ.get("HOST_PY", ROOT / ".venv" / "bin" / "python"))
SUITE = "bookworm"
# Bump when a step's recipe changes in a way its input files do not show. build.py's own text is not an input:
# editing a comment must not cost a cold rebuild.
RECIPE = 2
# Modules the initramfs loads (the rest of the kernel's needs are built in): PCI virtio transport, the disks, ext4
# and its crc32c, virtio-serial (the agent's port), fw_cfg, the virtio RNG (entropy for Python at boot), the NIC.
MODULES = (
    "virtio_pci",
    "virtio_blk",
    "ext4",
    "crc32c_generic",
    "virtio_console",
    "qemu_fw_cfg",
    "virtio_rng",
    "virtio_net",
)
# Modules installed into the root filesystem (with their dependencies and a depmod index) for a test to modprobe:
# vivid, the kernel's virtual V4L2 camera (the camera scenario).
ROOTFS_MODULES = ("vivid",)
# Where box_from_wheels puts the box's private Python environment (where the Debian package puts its own).
BOX_ENV = "/usr/lib/edge/venv"
PYVER = "3.11"
KERNEL_CMDLINE = "console=ttyAMA0 root=/dev/vda ro quiet panic=-1 systemd.getty_auto=0"


@dataclass(frozen=True)
class BoxInstall:
    """How the box gets into the image: a key naming exactly what is installed, and the installer."""

    key: str
    install: Callable[[Path], None]


class BuildError(Exception):
    """A build step that could not run; the message names the step and the reason."""


def say(message: str) -> None:
    print(f"system-build: {message}", file=sys.stderr, flush=True)


def sh(argv: Sequence[str | Path], *, log: Path | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise BuildError with its output (or the log file's tail)."""
    cmd = [str(a) for a in argv]
    if log is None:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
        output = done.stdout + done.stderr
    else:
        with log.open("w") as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, check=False, **kw)  # type: ignore[call-overload]
        output = log.read_text(errors="replace")
    if done.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        raise BuildError(f"{' '.join(cmd[:6])}... exited with {done.returncode}:\n{tail}")
    return done


def digest(*parts: object) -> str:
    """A short key over strings, bytes and files (paths are read, directories walked in order)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
            for f in files:
                if "__pycache__" in f.parts or f.suffix in (".so", ".pyc") or f.is_relative_to(FLEET):
                    continue
                h.update(str(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f).encode())
                h.update(f.read_bytes())
        else:
            h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def apt_sources() -> list[Path]:
    """The machine's apt sources: no mirror is named anywhere, and another suite or snapshot changes the keys."""
    return sorted(
        p for p in Path("/etc/apt").glob("sources.list*") if p.is_file() and p.suffix in (".list", ".sources")
    ) + sorted(p for p in Path("/etc/apt/sources.list.d").glob("*") if p.suffix in (".list", ".sources"))


def cached(step: str, key: str, make: Callable[[Path], None]) -> Path:
    """The directory ``<step>-<key>``: built by ``make(tmp)`` unless complete; other keys of the step removed."""
    final = CACHE / f"{step}-{key}"
    if not (final / ".complete").exists():
        tmp = CACHE / f"{step}-{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.monotonic()
        say(f"{step}: building ({final.name})")
        try:
            make(tmp)
        except BuildError as e:
            raise BuildError(f"step {step}: {e}") from e
        (tmp / ".complete").write_text(f"{time.monotonic() - t0:.1f}\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        say(f"{step}: done in {time.monotonic() - t0:.0f} s")
    for other in CACHE.glob(f"{step}-*"):
        if other != final and other.name.removeprefix(f"{step}-").split(".")[0] != key:
            shutil.rmtree(other, ignore_errors=True)
    return final


# ---------------------------------------------------------------- host tools


def host_tools() -> None:
    """Install what is missing with apt-get (as tools/bootstrap.sh does) and make aarch64 binaries runnable."""
    wanted = {
        "mmdebstrap": "mmdebstrap",
        "arch-test": "arch-test",  # mmdebstrap's check that binfmt runs arm64
        "qemu-system-aarch64": "qemu-system-arm",
        "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
        "mkfs.ext4": "e2fsprogs",
        "depmod": "kmod",
        "cpio": "cpio",
        "useradd": "passwd",
        "socat": "socat",  # run.py's guestfwd helper: one host connection per guest connection
    }
    need = sorted({pkg for cmd, pkg in wanted.items() if not shutil.which(cmd, path="/usr/sbin:/usr/bin:/sbin:/bin")})
    if not Path("/usr/lib/binfmt.d/qemu-aarch64.conf").exists():
        need.append("qemu-user-static")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if need:
        say(f"installing host packages: {' '.join(need)}")
        sh([*sudo, "apt-get", "update", "-qq"])
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sh([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *need], env=env)
    # mmdebstrap runs the arm64 maintainer scripts through binfmt_misc (as tools/qemu/arm64.sh sets it up).
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        sh([*sudo, "mount", "-t", "binfmt_misc", "binfmt_misc", binfmt])
    if not (binfmt / "qemu-aarch64").exists():
        sh([*sudo, "sh", "-c", f"cat /usr/lib/binfmt.d/qemu-aarch64.conf > {binfmt}/register"])
    if "enabled" not in (binfmt / "qemu-aarch64").read_text():
        raise BuildError("the qemu-aarch64 binfmt entry is disabled: maintainer scripts cannot run")


# ---------------------------------------------------------------- arm64 packages with a private apt state


class Apt:
    """apt-get for arm64 on the machine's own sources, with its own state: the machine's dpkg is not touched."""

    def __init__(self) -> None:
        self.dir = CACHE / "apt"
        self._updated = False

    def _argv(self, tool: str) -> list[str]:
        d = self.dir
        return [
            tool,
            "-q",
            f"-o=Dir::State={d}/state",
            f"-o=Dir::State::status={d}/state/status",
            f"-o=Dir::Cache={d}/cache",
            "-o=APT::Architecture=arm64",
            "-o=APT::Architectures::=arm64",
            "-o=APT::Sandbox::User=root",
        ]

    def update(self) -> None:
        if self._updated:
            return
        for sub in ("state/lists/partial", "cache/archives/partial"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "state" / "status").write_text("")  # an empty system: apt resolves whole closures
        sh([*self._argv("apt-get"), "update"], log=self.dir / "update.log")
        self._updated = True

    def download(self, packages: Iterable[str], *, closure: bool) -> list[Path]:
        """The .deb files of ``packages`` (with their dependency closure if ``closure``)."""
        self.update()
        archives = self.dir / "cache" / "archives"
        for old in archives.glob("*.deb"):
            old.unlink()
        pkgs = list(packages)
        if closure:
            sh([*self._argv("apt-get"), "install", "--download-only", "-y", "--no-install-recommends", *pkgs])
        else:
            sh([*self._argv("apt-get"), "download", *pkgs], cwd=archives)
        return sorted(archives.glob("*.deb"))

    def depends_of(self, package: str) -> str:
        """The first dependency of the candidate of a metapackage (linux-image-arm64 -> linux-image-6.1.0-N-arm64)."""
        self.update()
        out = sh([*self._argv("apt-cache"), "depends", "--no-recommends", package]).stdout
        for line in out.splitlines():
            if line.strip().startswith("Depends:"):
                return line.split(":", 1)[1].strip()
        raise BuildError(f"apt-cache depends {package}: no dependency found")


# ---------------------------------------------------------------- steps


def read_list(path: Path) -> list[str]:
    return [s for line in path.read_text().splitlines() if (s := line.split("#", 1)[0].strip())]


def make_rootfs(out: Path) -> None:
    """Debian arm64 from mmdebstrap: the essential variant plus packages.txt; no docs, manuals or locales."""
    root = out / "root"
    argv: list[str | Path] = [
        "mmdebstrap",
        "--arch=arm64",
        "--variant=essential",
        "--mode=root",
        "--format=directory",
        f"--include={','.join(read_list(HERE / 'packages.txt'))}",
        # merged /usr without running usrmerge (perl) under emulation
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        '--aptopt=Acquire::Check-Valid-Until "false"',
        '--aptopt=APT::Install-Recommends "false"',
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        SUITE,
        root,
        *apt_sources(),
    ]
    sh(argv, log=out / "mmdebstrap.log")
    libc = sh(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f=${Version}", "libc6"]).stdout
    (out / "glibc").write_text(libc.split("-")[0].strip() + "\n")


def make_kernel(out: Path, apt: Apt) -> None:
    """Debian's arm64 kernel and an initramfs assembled on the host: busybox-static, MODULES, guest/init."""
    image_pkg = apt.depends_of("linux-image-arm64")
    debs = apt.download([image_pkg, "busybox-static"], closure=False)
    unpack = out / "unpack"
    for deb in debs:
        sh(["dpkg-deb", "-x", deb, unpack])
    (vmlinuz,) = (unpack / "boot").glob("vmlinuz-*")
    kver = vmlinuz.name.removeprefix("vmlinuz-")
    modroot = unpack / "lib" / "modules" / kver
    if not modroot.exists():
        modroot = unpack / "usr" / "lib" / "modules" / kver
    # depmod -b wants <base>/lib/modules/<kver>
    base = modroot.parents[2]
    sh(["depmod", "-b", base, kver])
    order: list[Path] = []
    for module in MODULES:
        shown = sh(["modprobe", "-d", base, "-S", kver, "--show-depends", module]).stdout
        for line in shown.splitlines():
            if line.startswith("insmod ") and (path := Path(line.split()[1])) not in order:
                order.append(path)
            elif line.startswith("builtin "):
                continue
    initrd = out / "initrd"
    (initrd / "bin").mkdir(parents=True)
    (initrd / "modules").mkdir()
    for d in ("dev", "proc", "sys", "root"):
        (initrd / d).mkdir()
    (busybox,) = (p for p in unpack.rglob("busybox") if p.parent.name == "bin" and not p.is_symlink())
    shutil.copy2(busybox, initrd / "bin" / "busybox")
    names = []
    for path in order:
        if path.suffix != ".ko":
            raise BuildError(f"{path.name}: compressed modules are not handled (the kernel config changed)")
        shutil.copy2(path, initrd / "modules" / path.name)
        names.append(path.name)
    (initrd / "modules" / "order").write_text("\n".join(names) + "\n")
    # The root filesystem's modules: the same tree layout, only ROOTFS_MODULES' closure, indexed for modprobe.
    rootfs_modules = out / "modules" / "lib" / "modules" / kver
    for module in ROOTFS_MODULES:
        shown = sh(["modprobe", "-d", base, "-S", kver, "--show-depends", module]).stdout
        for line in shown.splitlines():
            if line.startswith("insmod "):
                path = Path(line.split()[1])
                target = rootfs_modules / path.relative_to(modroot)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (modroot / name).exists():
            shutil.copy2(modroot / name, rootfs_modules / name)
    sh(["depmod", "-b", out / "modules", kver])
    shutil.copy2(GUEST / "init", initrd / "init")
    (initrd / "init").chmod(0o755)
    listing = sh(["find", ".", "-print0"], cwd=initrd).stdout
    with (out / "initrd.img").open("wb") as f:
        cpio = subprocess.run(
            ["cpio", "--null", "--create", "--format=newc", "--owner=0:0", "--quiet"],
            input=listing.encode(),
            stdout=subprocess.PIPE,
            cwd=initrd,
            check=True,
        )
        f.write(cpio.stdout)
    shutil.copy2(vmlinuz, out / "vmlinuz")
    (out / "kernel-version").write_text(kver + "\n")
    shutil.rmtree(unpack)
    shutil.rmtree(initrd)


def make_sysroot(out: Path, apt: Apt) -> None:
    """What cross-compiling edge._native needs: tools/qemu/packages.txt's closure, unpacked (as arm64.sh does)."""
    for deb in apt.download(read_list(ROOT / "tools" / "qemu" / "packages.txt"), closure=True):
        sh(["dpkg-deb", "-x", deb, out])


def runtime_requirements() -> list[str]:
    """pyproject.toml's runtime dependencies: the box's, without the fleet's or the developers' extras."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def make_wheels(out: Path, glibc: str) -> None:
    """The runtime wheels for cp311 aarch64, pinned by tools/qemu/requirements.txt (one list of pins)."""
    plats = ["--platform", "manylinux2014_aarch64"]
    for minor in range(17, int(glibc.split(".")[1]) + 1):
        plats += ["--platform", f"manylinux_2_{minor}_aarch64"]
    sh(
        [
            HOST_PY,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--target",
            out / "site",
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            PYVER,
            "--abi",
            "cp311",
            "--abi",
            "abi3",
            "--abi",
            "none",
            *plats,
            "--platform",
            "any",
            "-c",
            ROOT / "tools" / "qemu" / "requirements.txt",
            *runtime_requirements(),
        ],
        log=out / "pip.log",
    )


def native_build_args() -> tuple[list[str], list[str]]:
    """SOURCES and compile_args of setup.py: the one list of the extension's sources and flags."""
    found = {}
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id in ("SOURCES", "compile_args"):
            found[target.id] = ast.literal_eval(node.value)  # type: ignore[union-attr]
    return list(found["SOURCES"]), list(found["compile_args"])


def make_native(out: Path, sysroot: Path) -> None:
    sources, cflags = native_build_args()
    sh(
        [
            "aarch64-linux-gnu-gcc",
            f"--sysroot={sysroot}",
            f"-I{sysroot}/usr/include/python{PYVER}",
            "-Inative",
            *cflags,
            "-Werror",
            "-fPIC",
            "-shared",
            *sources,
            "-o",
            out / "_native.cpython-311-aarch64-linux-gnu.so",
        ],
        cwd=ROOT,
    )


# ---------------------------------------------------------------- the box in the image


def install_layer_files(root: Path) -> None:
    """What meta-edge's do_install puts beside the package: the units, tmpfiles.d, the configuration."""
    units = root / "usr/lib/systemd/system"
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ("edge.service", "edge-enroll.service"):
        shutil.copy2(ROOT / "edge" / "data" / unit, units / unit)  # unmodified, as the recipe installs it
        (wants / unit).symlink_to(f"/usr/lib/systemd/system/{unit}")
    shutil.copy2(LAYER_FILES / "edge-tmpfiles.conf", root / "usr/lib/tmpfiles.d/edge.conf")
    (root / "etc/edge").mkdir(parents=True, exist_ok=True)
    shutil.copy2(LAYER_FILES / "edge.toml", root / "etc/edge/edge.toml")
    # useradd's class in the recipe: a system user without a login, in dialout and video for sensor boards and
    # cameras. The host's useradd --root edits the image's files without running anything from it.
    sh(["groupadd", "--root", root, "--system", "edge"])
    sh(
        [
            "useradd",
            "--root",
            root,
            "--system",
            "--gid",
            "edge",
            "--groups",
            "dialout,video",
            "--home-dir",
            "/data/edge",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "edge",
        ]
    )


def _install_from_wheels(root: Path, wheels: Path, native: Path) -> None:
    """The box package into a private environment: aarch64 wheels, edge/ without fleet, the cross-built extension.

    The environment is a venv made by hand (pyvenv.cfg and a link to the guest's python3.11): python3-venv would
    pull in ca-certificates, whose postinst takes ~70 s emulated.
    """
    install_layer_files(root)
    env = root / BOX_ENV.lstrip("/")
    site = env / "lib" / f"python{PYVER}" / "site-packages"
    shutil.copytree(wheels / "site", site, symlinks=True)
    shutil.copytree(
        ROOT / "edge",
        site / "edge",
        ignore=lambda d, names: [n for n in names if n in ("__pycache__", "fleet") or n.endswith((".so", ".pyc"))],
    )
    shutil.copy2(next(native.glob("_native*.so")), site / "edge")
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python3").symlink_to(f"/usr/bin/python{PYVER}")
    (env / "bin" / "python").symlink_to("python3")
    query = ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f=${Version}", f"python{PYVER}"]
    version = sh(query).stdout.split("-")[0].strip()
    (env / "pyvenv.cfg").write_text(f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {version}\n")
    script = root / "usr/bin/edge"
    script.write_text(f"#!{BOX_ENV}/bin/python3\nimport sys\n\nfrom edge.cli import main\n\nsys.exit(main())\n")
    script.chmod(0o755)
    # The factory models read-only under /usr/share, the package's copies links to them (as the recipe does).
    models = root / "usr/share/edge/models"
    models.mkdir(parents=True)
    for model in sorted((site / "edge" / "models").glob("*.onnx")):
        shutil.copy2(model, models / model.name)
        (models / model.name).chmod(0o444)
        model.unlink()
        model.symlink_to(os.path.relpath(models / model.name, model.parent))
    # ProtectSystem=strict: the service cannot write __pycache__, so compile here with the guest's CPython minor
    # version (the host's 3.11 writes the same bytecode), paths as the guest sees them.
    sh([HOST_PY, "-m", "compileall", "-q", "-j", "2", "-s", root, "-p", "/", env])


def box_from_wheels(apt: Apt, glibc: str) -> BoxInstall:
    """The box from aarch64 wheels and the cross-built extension, as tools/qemu/arm64.sh assembles them."""
    sources = apt_sources()
    sysroot = cached(
        "sysroot", digest(RECIPE, ROOT / "tools/qemu/packages.txt", *sources), lambda out: make_sysroot(out, apt)
    )
    wheels_key = digest(RECIPE, glibc, ROOT / "tools/qemu/requirements.txt", *runtime_requirements())
    wheels = cached("wheels", wheels_key, lambda out: make_wheels(out, glibc))
    cc = sh(["aarch64-linux-gnu-gcc", "--version"]).stdout
    native_key = digest(RECIPE, sysroot.name, cc, ROOT / "setup.py", ROOT / "native")
    native = cached("native", native_key, lambda out: make_native(out, sysroot))
    key = digest("wheels", wheels.name, native.name, ROOT / "edge", LAYER_FILES)
    return BoxInstall(key, lambda root: _install_from_wheels(root, wheels, native))


def box_from_deb(apt: Apt, glibc: str) -> BoxInstall:
    """The box from its Debian package (tools/deb/build.py, cached in .cache/deb/), installed with dpkg in the image.

    The package brings everything the Yocto layer installs (units, user, tmpfiles.d, configuration, models); its
    maintainer scripts run inside the image under qemu-user, as on a board.
    """
    del apt, glibc  # the package carries its own environment
    out = CACHE / "deb"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # Uncompressed: the same package's content, without packing ~100 MB with xz at every build (the image only
    # unpacks it once).
    argv = [HOST_PY, ROOT / "tools/deb/build.py", "--arch", "arm64", "--out", out, "--compression", "none"]
    sh(argv, log=CACHE / "deb.log")
    debs = sorted(out.glob("*.deb"))
    if len(debs) != 1:
        raise BuildError(f"tools/deb/build.py left {len(debs)} packages in {out}; expected one")
    deb = debs[0]

    def install(root: Path) -> None:
        shutil.copy2(deb, root / "tmp" / deb.name)
        # As on a board: the maintainer scripts (systemd-tmpfiles among them) want /proc.
        sh(["mount", "-t", "proc", "proc", root / "proc"])
        try:
            sh(["chroot", root, "dpkg", "--install", f"/tmp/{deb.name}"], log=CACHE / "dpkg.log")
        finally:
            sh(["umount", root / "proc"])
        (root / "tmp" / deb.name).unlink()

    return BoxInstall(digest("deb", deb), install)


# The one line that chooses how the box gets into the image: its Debian package (tools/deb/build.py), or
# box_from_wheels (the aarch64 wheels and cross-built extension of the emulated tier).
BOX = box_from_deb


def install_test_harness(root: Path, machine_id: str) -> None:
    """The test image's additions: the agent, console journal, sensor UART name, read-only root with volatile /var."""
    shutil.copy2(GUEST / "fstab", root / "etc/fstab")
    (root / "data").mkdir(exist_ok=True)
    (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
    # A fixed machine id: with a read-only root systemd could not write one, and an empty file means first boot.
    (root / "etc/machine-id").write_text(machine_id + "\n")
    (root / "etc/hostname").write_text("edge-box\n")
    journald = root / "etc/systemd/journald.conf.d"
    journald.mkdir(parents=True, exist_ok=True)
    shutil.copy2(GUEST / "journald.conf", journald / "edge-system.conf")
    shutil.copy2(GUEST / "60-edge-sensor.rules", root / "etc/udev/rules.d/60-edge-sensor.rules")
    dropins = root / "etc/systemd/system/edge.service.d"
    dropins.mkdir(parents=True, exist_ok=True)
    shutil.copy2(GUEST / "edge-tcg.conf", dropins / "tcg.conf")
    # The network by systemd-networkd (in Debian's systemd), and network-online.target reached once DHCP is done:
    # edge.service and edge-enroll.service wait for it, as on a box.
    shutil.copy2(GUEST / "20-box.network", root / "etc/systemd/network/20-box.network")
    for unit, target in (
        ("systemd-networkd.service", "multi-user.target"),
        ("systemd-networkd-wait-online.service", "network-online.target"),
    ):
        wants_dir = root / "etc/systemd/system" / f"{target}.wants"
        wants_dir.mkdir(parents=True, exist_ok=True)
        (wants_dir / unit).unlink(missing_ok=True)
        (wants_dir / unit).symlink_to(f"/lib/systemd/system/{unit}")
    agent_dir = root / "usr/lib/edge-system"
    agent_dir.mkdir(parents=True)
    shutil.copy2(GUEST / "agent.py", agent_dir / "agent.py")
    shutil.copy2(GUEST / "edge-system-agent.service", root / "usr/lib/systemd/system/edge-system-agent.service")
    wants = root / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "edge-system-agent.service").symlink_to("/usr/lib/systemd/system/edge-system-agent.service")
    sh([HOST_PY, "-m", "compileall", "-q", "-s", root, "-p", "/", agent_dir])
    # ConditionNeedsUpdate=/etc: nothing to update on a read-only /etc built just now.
    (root / "etc/.updated").touch()


def make_image(out: Path, rootfs: Path, kernel: Path, box: BoxInstall, machine_id: str) -> None:
    staging = out / "root"
    sh(["cp", "-a", "--reflink=auto", rootfs / "root", staging])
    box.install(staging)
    install_test_harness(staging, machine_id)
    # The kernel step's modules for modprobe (merged /usr: /lib is a link to /usr/lib).
    (staging / "usr" / "lib" / "modules").mkdir(parents=True, exist_ok=True)
    sh(["cp", "-a", f"{kernel / 'modules' / 'lib' / 'modules'}/.", staging / "usr" / "lib" / "modules"])
    uid = gid = None
    for line in (staging / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "edge":
            uid, gid = int(fields[2]), int(fields[3])
    if uid is None:
        raise BuildError("the image has no edge user")
    used = int(sh(["du", "-s", "--block-size=1M", staging]).stdout.split()[0])
    size_mb = used + used // 4 + 64
    sh(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", staging, out / "rootfs.ext4", f"{size_mb}M"])
    shutil.rmtree(staging)
    for name in ("vmlinuz", "initrd.img"):
        shutil.copy2(kernel / name, out / name)
    manifest = {
        "kernel": (kernel / "kernel-version").read_text().strip(),
        "cmdline": KERNEL_CMDLINE,
        "edge_uid": uid,
        "edge_gid": gid,
        "rootfs_mb": size_mb,
        "install": BOX.__name__,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def build() -> Path:
    """Build (or find in the cache) every step; returns the image directory."""
    CACHE.mkdir(parents=True, exist_ok=True)
    host_tools()
    apt = Apt()
    sources = apt_sources()
    rootfs = cached("rootfs", digest(RECIPE, HERE / "packages.txt", *sources), make_rootfs)
    glibc = (rootfs / "glibc").read_text().strip()
    kernel = cached(
        "kernel",
        digest(RECIPE, GUEST / "init", " ".join(MODULES), " ".join(ROOTFS_MODULES), *sources),
        lambda out: make_kernel(out, apt),
    )
    box = BOX(apt, glibc)
    # This file too: how the image is assembled (the harness, the network) is code here, cheap to redo.
    image_key = digest(RECIPE, rootfs.name, kernel.name, box.key, GUEST, KERNEL_CMDLINE, Path(__file__))
    machine_id = hashlib.sha256(image_key.encode()).hexdigest()[:32]
    return cached("image", image_key, lambda out: make_image(out, rootfs, kernel, box, machine_id))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="print only the image directory")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    lock = CACHE / ".lock"
    CACHE.mkdir(parents=True, exist_ok=True)
    # One build at a time per cache: a second make test-system waits instead of racing on the same directories.
    with lock.open("w") as f:
        import fcntl  # noqa: PLC0415

        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            image = build()
        except BuildError as e:
            print(f"system-build: FAILED: {e}", file=sys.stderr)
            return 1
    if not args.quiet:
        say(f"image ready in {time.monotonic() - t0:.1f} s")
    print(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())

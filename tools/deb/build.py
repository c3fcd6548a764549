#!/usr/bin/env python3
"""Build the box as a Debian package: ``tools/deb/build.py --arch arm64|amd64 --out DIR`` prints the .deb's path.

The package ``edge`` (docs/debian.md) installs on Debian 12 and Raspberry Pi OS bookworm (64-bit) the box that the
Yocto image installs:

- ``/usr/bin/edge``, a launcher of the package's private Python environment ``/usr/lib/edge``: a venv over the
  system's CPython 3.11 (``pyvenv.cfg``, ``bin/python3 -> /usr/bin/python3.11``) whose site-packages hold n3-edge
  without ``edge/fleet`` and with its C extension built for the target, and pyproject.toml's dependencies with the
  ``camera`` extra (the box's: no ``fleet`` extra) from upstream manylinux wheels at the versions
  tools/deb/requirements.txt pins; bytecode
  precompiled with unchecked hashes (reproducible, and nothing is written under a read-only /usr at run time);
- the units ``edge.service`` and ``edge-enroll.service`` from edge/data/, unmodified, in /usr/lib/systemd/system;
- the manual page edge(1) and the bash and zsh completions, generated from the box's parser by
  tools/gen_cli_docs.py ``--box`` (the dev extra's argparse-manpage and shtab, on the build machine);
- sysusers.d (the ``edge`` user), tmpfiles.d (``/data/edge``) and ``/etc/edge/edge.toml`` (a conffile), the last two
  the Yocto layer's own files, and the factory models in /usr/share/edge/models;
- maintainer scripts (tools/deb/files/) that create the user and the directory, enable both units, and purge.

Steps, each cached under .cache/deb/ (``EDGE_DEB_CACHE``) in a directory named after the hash of its inputs, as
tools/qemu/arm64.sh caches its own (a warm build only stages, checks and packs):

1. host tools: the target's C compiler (gcc or the cross compiler) and dpkg-dev, from apt when missing;
2. Python headers: Debian's libpython3.11-dev for the target architecture, fetched with a private apt state from
   the machine's own sources (the machine's dpkg configuration is not touched);
3. dependencies: the wheels downloaded into .cache/deb/wheels/ (``pip download``, every manylinux tag up to
   bookworm's glibc), installed with ``--target`` for the target platform, every installed distribution checked
   against the pins, bytecode compiled;
4. n3-edge: a wheel built without isolation from a copy of the work tree's files (git's view: ignored files
   excluded), without dependencies;
5. ``edge._native``: setup.py's sources and flags plus Debian's hardening flags, compiled for the target, stripped;
6. the package: a staged tree (the cached layers hard-linked into it), the checks below, DEBIAN/ (control with the
   computed Depends and Installed-Size, conffiles, md5sums, the scripts), modes normalised, every mtime set to
   SOURCE_DATE_EPOCH (default: the time of the last commit), then ``dpkg-deb --root-owner-group --build``, which
   sorts the archive's members; a tree packed before (the same digest of every path, mode and content) is copied
   from the cache instead of packed again.

Invariant: it never passes silently. A package that would not run on bookworm is not built: the build fails when
the tree holds edge/fleet, an ELF file of another machine, a glibc or libstdc++ symbol version newer than
bookworm's, a needed shared library that neither the package nor a known Debian package provides, or a Python
distribution that the pins do not name. ``--lint`` runs lintian afterwards and fails on any error or warning that
tools/deb/files/lintian-overrides does not explain.
"""

from __future__ import annotations

import argparse
import ast
import base64
import fcntl
import gzip
import hashlib
import os
import platform
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tools" / "deb"
FILES = HERE / "files"
PINS = HERE / "requirements.txt"
# The image's own files: the package installs the same ones.
YOCTO_FILES = ROOT / "yocto" / "meta-edge" / "recipes-edge" / "edge" / "files"

PACKAGE = "edge"
MAINTAINER = "N3 Edge developers <edge@n3-edge.invalid>"
SECTION = "net"
# The interpreter the private environment runs on: Debian 12's and Raspberry Pi OS bookworm's python3.
PY = "3.11"
PY_TAG = "cp311"
PREFIX = "usr/lib/edge"
SITE = f"{PREFIX}/lib/python{PY}/site-packages"
MODELS = "usr/share/edge/models"
UNIT_DIR = "usr/lib/systemd/system"
MANPAGE = "usr/share/man/man1/edge.1.gz"
BASH_COMPLETION = "usr/share/bash-completion/completions/edge"
ZSH_COMPLETION = "usr/share/zsh/vendor-completions/_edge"
UNITS = ("edge.service", "edge-enroll.service")
CONFFILE = "etc/edge/edge.toml"
# What bookworm provides: glibc 2.36 (the newest manylinux tag a wheel may have), libstdc++6 of GCC 12.
GLIBC = (2, 36)
GLIBCXX = (3, 4, 30)
CXXABI = (1, 3, 13)
# Shared libraries that the system provides, by soname, and the Debian package that provides them.
SYSTEM_LIBRARIES = {
    "libc.so.6": "libc6",
    "libm.so.6": "libc6",
    "libmvec.so.1": "libc6",  # glibc's vector math (x86-64 only), which the FFmpeg in PyAV's wheel uses
    "libpthread.so.0": "libc6",
    "libdl.so.2": "libc6",
    "librt.so.1": "libc6",
    "libutil.so.1": "libc6",
    "libresolv.so.2": "libc6",
    "ld-linux-aarch64.so.1": "libc6",
    "ld-linux-x86-64.so.2": "libc6",
    "libgcc_s.so.1": "libgcc-s1",
    "libstdc++.so.6": "libstdc++6",
    "libz.so.1": "zlib1g",
}
# Bump when a cached step's recipe changes in a way its input files do not show.
RECIPE = "1"
COMPRESSIONS = ("xz", "zstd", "gzip", "none")


@dataclass(frozen=True)
class Arch:
    """A Debian architecture the package is built for."""

    deb: str  # Debian's name (dpkg --print-architecture)
    machine: str  # the kernel's and the wheels' (manylinux_2_17_<machine>)
    triplet: str  # the multiarch triplet: compiler prefix, pyconfig.h directory, extension suffix
    elf_machine: int  # e_machine of its ELF files

    @property
    def cc(self) -> str:
        return f"{self.triplet}-gcc"

    @property
    def strip(self) -> str:
        return f"{self.triplet}-strip"


ARCHES = {
    "amd64": Arch("amd64", "x86_64", "x86_64-linux-gnu", 62),
    "arm64": Arch("arm64", "aarch64", "aarch64-linux-gnu", 183),
}

T0 = time.monotonic()


def say(message: str) -> None:
    print(f"deb: {message} ({time.monotonic() - T0:.1f} s)", file=sys.stderr, flush=True)


class BuildError(Exception):
    """The package cannot be built (or would be wrong): the message says why."""


def run(cmd: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command; its standard output, or BuildError with what it printed."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise BuildError(f"{' '.join(str(c) for c in cmd)} exited {proc.returncode}:\n{output[-6000:]}")
    return proc.stdout


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


def publish(tmp: Path, final: Path, prefix: str) -> Path:
    """Mark a finished cache entry complete, move it in place and remove its outdated siblings (``prefix*``)."""
    (tmp / ".complete").touch()
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in final.parent.glob(f"{prefix}*"):
        if old != final and old.is_dir():
            shutil.rmtree(old)
    return final


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------- 1. host tools


def ensure_host_tools(arch: Arch) -> None:
    """Install the target's compiler (with its libc for a cross compiler) and dpkg-dev from apt when missing."""
    need = []
    native = platform.machine() == arch.machine
    if shutil.which(arch.cc) is None or shutil.which(arch.strip) is None:
        need.append("gcc" if native else f"gcc-{arch.triplet.replace('_', '-')}")
    if not native and not Path(f"/usr/{arch.triplet}/include/stdlib.h").exists():
        need.append(f"libc6-dev-{arch.deb}-cross")  # the cross compiler's libc: bookworm's glibc 2.36
    if shutil.which("dpkg-buildflags") is None:
        need.append("dpkg-dev")
    if not need:
        return
    say(f"installing host packages: {' '.join(need)}")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    run([*sudo, "apt-get", "update", "-qq"])
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600", *need],
        env=env)  # fmt: skip


# ---------------------------------------------------------------- 2. Python headers


def python_headers(arch: Arch, cache: Path) -> Path:
    """Debian's libpython3.11-dev for the target, unpacked: the headers edge._native is compiled against."""
    sources = sorted(
        p for p in Path("/etc/apt").rglob("*") if p.is_file() and p.suffix in (".list", ".sources") and p.stat().st_size
    )
    key = digest(RECIPE, arch.deb, *(p.read_bytes() for p in sources))
    out = cache / f"headers-{arch.deb}-{key}"
    if (out / ".complete").exists():
        return out
    say(f"fetching libpython{PY}-dev:{arch.deb} with a private apt state")
    aptdir = cache / f"apt-{arch.deb}"
    for sub in ("state/lists/partial", "cache/archives/partial"):
        (aptdir / sub).mkdir(parents=True, exist_ok=True)
    (aptdir / "state" / "status").write_text("")  # an empty system: nothing of the machine's dpkg database
    apt = [
        "apt-get", "-q",
        "-o", f"Dir::State={aptdir}/state", "-o", f"Dir::State::status={aptdir}/state/status",
        "-o", f"Dir::Cache={aptdir}/cache",
        "-o", f"APT::Architecture={arch.deb}", "-o", f"APT::Architectures::={arch.deb}",
    ]  # fmt: skip
    run([*apt, "update"])
    tmp = fresh(out.with_name(out.name + ".tmp"))
    download = fresh(aptdir / "download")
    run([*apt, "download", f"libpython{PY}-dev"], cwd=download)
    debs = list(download.glob("*.deb"))
    if len(debs) != 1:
        raise BuildError(f"apt-get download libpython{PY}-dev gave {debs}")
    run(["dpkg-deb", "-x", debs[0], tmp])
    for header in (f"usr/include/python{PY}/Python.h", f"usr/include/{arch.triplet}/python{PY}/pyconfig.h"):
        if not (tmp / header).is_file():
            raise BuildError(f"libpython{PY}-dev:{arch.deb} has no {header}")
    (tmp / ".version").write_text(run(["dpkg-deb", "-f", debs[0], "Version"]).strip())
    # The headers are all that is used (not the static library, not the docs), and apt's lists are fetched anew
    # whenever the sources change.
    for entry in [*tmp.iterdir(), *(tmp / "usr").iterdir()]:
        if entry.name in ("usr", "include", ".version"):
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    shutil.rmtree(aptdir)
    return publish(tmp, out, f"headers-{arch.deb}-")


# ---------------------------------------------------------------- 3. dependencies


def project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]  # type: ignore[no-any-return]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins() -> dict[str, str]:
    pins = {}
    for raw in PINS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if m is None:
            raise BuildError(f"{PINS.relative_to(ROOT)}: not a pin (name==version): {line!r}")
        pins[normalize(m[1])] = m[2]
    return pins


def installed_distributions(site: Path) -> dict[str, tuple[str, Path]]:
    """Distribution name (normalised) -> (version, its .dist-info directory) of what ``site`` holds."""
    found = {}
    for info in sorted(site.glob("*.dist-info")):
        fields = metadata(info)
        found[normalize(fields["Name"][0])] = (fields["Version"][0], info)
    return found


def metadata(info: Path) -> dict[str, list[str]]:
    """The header fields of a .dist-info's METADATA (each may repeat)."""
    fields: dict[str, list[str]] = {}
    for line in (info / "METADATA").read_text(encoding="utf-8").split("\n\n", 1)[0].splitlines():
        if ":" in line and not line.startswith((" ", "\t")):
            name, value = line.split(":", 1)
            fields.setdefault(name, []).append(value.strip())
    return fields


def wheel_tags(arch: Arch) -> list[str]:
    platforms = [f"manylinux2014_{arch.machine}"]
    platforms += [f"manylinux_2_{minor}_{arch.machine}" for minor in range(17, GLIBC[1] + 1)]
    tags = ["--only-binary=:all:", "--implementation", "cp", "--python-version", PY]
    tags += ["--abi", PY_TAG, "--abi", "abi3", "--abi", "none"]
    for p in [*platforms, "any"]:
        tags += ["--platform", p]
    return tags


def dependencies(arch: Arch, host_py: Path, cache: Path) -> Path:
    """pyproject.toml's dependencies and its camera extra for the target, installed as pinned, with bytecode."""
    meta = project()
    requirements = [str(r) for r in [*meta["dependencies"], *meta["optional-dependencies"]["camera"]]]  # type: ignore[index]
    key = digest(RECIPE, arch.deb, PY, repr(GLIBC), "\n".join(requirements), PINS.read_bytes())
    out = cache / f"site-{arch.deb}-{key}"
    if (out / ".complete").exists():
        return out
    pins = read_pins()
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = fresh(out.with_name(out.name + ".tmp"))
    req = tmp.parent / f"requirements-{arch.deb}.txt"
    req.write_text("\n".join(requirements) + "\n")
    pip: list[str | os.PathLike[str]] = [host_py, "-m", "pip", "--disable-pip-version-check"]
    say(f"downloading {arch.machine} wheels into {wheels.relative_to(ROOT) if wheels.is_relative_to(ROOT) else wheels}")
    run([*pip, "download", "-q", "-d", wheels, *wheel_tags(arch), "-r", req, "-c", PINS])
    say("installing them for the target")
    site = tmp / "site"
    run([*pip, "install", "-q", "--no-index", "--find-links", wheels, "--target", site, "--no-compile",
         "--no-warn-script-location", *wheel_tags(arch), "-r", req, "-c", PINS])  # fmt: skip
    req.unlink()
    # Console scripts of the dependencies, with the build machine's interpreter in their #!: the box runs none.
    shutil.rmtree(site / "bin", ignore_errors=True)
    found = installed_distributions(site)
    unpinned = sorted(f"{n} {v}" for n, (v, _) in found.items() if pins.get(n) != v)
    missing = sorted(n for n in pins if n not in found)
    if unpinned or missing:
        raise BuildError(
            f"the installed distributions and {PINS.relative_to(ROOT)} disagree: installed but not pinned so: "
            f"{unpinned or 'none'}; pinned but not installed: {missing or 'none'}"
        )
    say("compiling their bytecode")
    compile_bytecode(host_py, site, site, "/" + SITE)
    normalise_modes(site, no_exec=[site])
    return publish(tmp, out, f"site-{arch.deb}-")


def compile_bytecode(host_py: Path, tree: Path, strip: Path, prepend: str) -> None:
    """Precompile ``tree`` with unchecked-hash pycs that name their installed paths (``prepend`` for ``strip``)."""
    run([host_py, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
         "-s", strip, "-p", prepend, tree])  # fmt: skip


# ---------------------------------------------------------------- 4. the n3-edge wheel


def source_files() -> list[str]:
    """The work tree's files that the wheel is built from, as git sees them (ignored files excluded)."""
    out = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
               "pyproject.toml", "setup.py", "README.md", "LICENSE", "edge", "native"], cwd=ROOT)  # fmt: skip
    return sorted({f for f in out.split("\0") if f and (ROOT / f).is_file()})


def edge_wheel(host_py: Path, cache: Path) -> Path:
    files = source_files()
    version = run([host_py, "-c", "import sys, setuptools; print(sys.version, setuptools.__version__)"])
    key = digest(RECIPE, version, *(f"{f}\0{hashlib.sha256((ROOT / f).read_bytes()).hexdigest()}" for f in files))
    out = cache / f"wheel-{key}"
    if (out / ".complete").exists():
        return next(out.glob("*.whl"))
    say("building the n3-edge wheel")
    tmp = fresh(out.with_name(out.name + ".tmp"))
    src = tmp / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    run([host_py, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
         "-w", tmp, src])  # fmt: skip
    shutil.rmtree(src)
    published = publish(tmp, out, "wheel-")
    return next(published.glob("*.whl"))


# ---------------------------------------------------------------- 5. edge._native


def setup_build() -> tuple[list[str], list[str]]:
    """SOURCES and compile_args of setup.py: the one list of the extension's sources and flags."""
    found: dict[str, list[str]] = {}
    for node in ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.Assign):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id in ("SOURCES", "compile_args"):
            found[target.id] = ast.literal_eval(node.value)
    if set(found) != {"SOURCES", "compile_args"}:
        raise BuildError("cannot read SOURCES and compile_args from setup.py")
    return found["SOURCES"], found["compile_args"]


def hardening_flags(arch: Arch) -> list[str]:
    """The flags Debian builds its own packages with, hardening=+all (dpkg-buildflags for the target)."""
    env = dict(os.environ, DEB_HOST_ARCH=arch.deb, DEB_BUILD_MAINT_OPTIONS="hardening=+all")
    env.pop("DEB_CFLAGS_APPEND", None)
    flags = []
    for var in ("CPPFLAGS", "CFLAGS", "LDFLAGS"):
        flags += run(["dpkg-buildflags", "--get", var], env=env, cwd=ROOT).split()
    # -fPIE/-pie suit executables; the extension is a shared object (-fPIC -shared below).
    return [f for f in flags if f not in ("-fPIE", "-pie") and not f.startswith("-specs=")]


def native_extension(arch: Arch, headers: Path, cache: Path) -> Path:
    sources, compile_args = setup_build()
    # What Debian's python3.11 adds to every extension it builds (sysconfig's CFLAGS: -DNDEBUG -fwrapv), setup.py's
    # flags, and the headers' path mapped to where they are on a box: assert() in Python's inline functions names
    # its header, and the binary must not depend on where the cache is.
    flags = [*hardening_flags(arch), "-DNDEBUG", "-fwrapv", *compile_args, "-Werror", "-fPIC", "-shared"]
    flags.append(f"-ffile-prefix-map={headers}=/")
    includes = [f"-I{headers}/usr/include/python{PY}", f"-I{headers}/usr/include", "-Inative"]
    compiler = run([arch.cc, "--version"])
    inputs = [ROOT / "setup.py", *sorted((ROOT / "native").glob("*.[ch]"))]
    key = digest(RECIPE, arch.deb, " ".join(flags), compiler, headers.name, *(p.read_bytes() for p in inputs))
    out = cache / f"native-{arch.deb}-{key}"
    so = out / f"_native.cpython-{PY_TAG[2:]}-{arch.triplet}.so"
    if (out / ".complete").exists():
        return so
    say(f"compiling edge._native for {arch.machine}")
    tmp = fresh(out.with_name(out.name + ".tmp"))
    built = tmp / so.name
    run([arch.cc, *flags, *includes, *sources, "-o", built], cwd=ROOT)
    run([arch.strip, "--strip-unneeded", "--remove-section=.comment", "--remove-section=.note", built])
    built.chmod(0o644)
    publish(tmp, out, f"native-{arch.deb}-")
    return so


# ---------------------------------------------------------------- 6. the package


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link the files of a cached layer into the stage (a copy where that fails)."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, symlinks=True, copy_function=link, dirs_exist_ok=True)


def install_edge_wheel(wheel: Path, native: Path, site: Path) -> list[str]:
    """Unpack n3-edge into ``site`` without edge/fleet and with the target's extension; RECORD rewritten."""
    written, skipped = [], 0
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            if name.startswith("edge/fleet/"):
                skipped += 1
                continue
            if re.fullmatch(r"edge/_native\.[^/]*\.so", name) or name.endswith(".dist-info/RECORD"):
                continue
            if not name.startswith(("edge/", "n3_edge-")):
                raise BuildError(f"unexpected file in {wheel.name}: {name}")
            target = site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
            written.append(name)
    if not skipped:
        raise BuildError(f"{wheel.name} has no edge/fleet/ to leave out: is this the n3-edge wheel?")
    shutil.copyfile(native, site / "edge" / native.name)
    written.append(f"edge/{native.name}")
    (info_dir,) = {n.split("/", 1)[0] for n in written if n.split("/", 1)[0].endswith(".dist-info")}
    (site / info_dir / "INSTALLER").write_text("dpkg\n")
    written.append(f"{info_dir}/INSTALLER")
    lines = []
    for name in sorted(written):
        data = (site / name).read_bytes()
        b64 = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={b64},{len(data)}")
    lines.append(f"{info_dir}/RECORD,,")
    (site / info_dir / "RECORD").write_text("\n".join(lines) + "\n")
    return written


def install(src: Path, dst: Path, mode: int = 0o644) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


def gzip_file(data: bytes, dst: Path) -> None:
    """gzip -9n: no name, no time stamp (reproducible)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
        gz.write(data)


def license_of(fields: dict[str, list[str]]) -> str:
    if fields.get("License-Expression"):
        return fields["License-Expression"][0]
    short = [v for v in fields.get("License", []) if v and "\n" not in v and len(v) < 80]
    if short:
        return short[0]
    classifiers = [c.rsplit("::", 1)[1].strip() for c in fields.get("Classifier", []) if c.startswith("License ::")]
    return " / ".join(classifiers) or "see its license files"


def copyright_text(site: Path, years: str) -> str:
    bundled = []
    for name, (version, info) in sorted(installed_distributions(site).items()):
        if name == "n3-edge":
            continue
        bundled.append(f" {name} {version}: {license_of(metadata(info))} ({info.name}/)")
    return (
        "edge: the N3 Edge box service, packaged by tools/deb/build.py from the edge repository.\n\n"
        f"Copyright {years} the edge authors\n"
        "License: Apache-2.0\n"
        " On Debian systems the full text of the Apache License, Version 2.0, is in\n"
        " /usr/share/common-licenses/Apache-2.0.\n\n"
        f"The package's private Python environment, /{SITE}, holds these\n"
        "distributions from their upstream wheels, unmodified (their console scripts left out). Each one's\n"
        "copyright notices and license texts are in its .dist-info directory there:\n\n" + "\n".join(bundled) + "\n"
    )


def changelog_text(version: str, epoch: int) -> str:
    when = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(epoch))
    return (
        f"{PACKAGE} ({version}) bookworm; urgency=medium\n\n"
        "  * Built by tools/deb/build.py from the edge repository; its history is the\n"
        "    repository's git log.\n\n"
        f" -- {MAINTAINER}  {when}\n"
    )


def elf_files(tree: Path) -> Iterator[tuple[Path, int]]:
    """(path, e_machine) of every regular ELF file under ``tree``."""
    for p in sorted(tree.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        with p.open("rb") as f:
            head = f.read(20)
        if head[:4] == b"\x7fELF" and len(head) == 20:
            order = "<" if head[5] == 1 else ">"
            yield p, struct.unpack_from(f"{order}H", head, 18)[0]


@dataclass
class ElfFacts:
    needed: dict[str, set[str]]  # soname -> the files that need it
    provided: set[str]  # sonames and file names of the package's own libraries
    versions: dict[str, set[str]]  # GLIBC_2.17, GLIBCXX_3.4.30, ... -> the files that need it


def read_elf(files: Iterable[Path]) -> ElfFacts:
    facts = ElfFacts({}, set(), {})
    for p in files:
        facts.provided.add(p.name)
        out = run(["readelf", "--wide", "--dynamic", "--version-info", p])
        for kind, value in re.findall(r"\((NEEDED|SONAME)\)\s+\S+ \S+: \[([^\]]+)\]", out):
            if kind == "NEEDED":
                facts.needed.setdefault(value, set()).add(str(p))
            else:
                facts.provided.add(value)
        in_needs = False
        for line in out.splitlines():
            if line.startswith("Version needs section"):
                in_needs = True
            elif line.startswith(("Version definition section", "Version symbols section")):
                in_needs = False
            elif in_needs:
                m = re.search(r"Name: (\S+)\s+Flags", line)
                if m:
                    facts.versions.setdefault(m[1], set()).add(str(p))
    return facts


def newest(versions: Iterable[str], prefix: str) -> tuple[int, ...] | None:
    pattern = re.compile(rf"{prefix}([\d.]+)")
    found = [tuple(int(x) for x in m[1].split(".")) for v in versions if (m := pattern.fullmatch(v))]
    return max(found) if found else None


def check_elf(stage: Path, arch: Arch) -> list[str]:
    """The checks on the package's ELF files; returns the Depends they need."""
    files = list(elf_files(stage))
    wrong = [f"{p.relative_to(stage)} (e_machine {m})" for p, m in files if m != arch.elf_machine]
    if wrong:
        raise BuildError(f"ELF files not for {arch.machine} (e_machine {arch.elf_machine}): {wrong[:10]}")
    if not any(p.name.startswith("_native.") for p, _ in files):
        raise BuildError("the package holds no edge._native")
    facts = read_elf(p for p, _ in files)
    depends: dict[str, str] = {}
    for soname, users in sorted(facts.needed.items()):
        if soname in facts.provided:
            continue
        if soname not in SYSTEM_LIBRARIES:
            raise BuildError(f"{soname}, needed by {sorted(users)[:3]}, is neither in the package nor a known one")
        depends[SYSTEM_LIBRARIES[soname]] = ""
    for prefix, limit in (("GLIBC_", GLIBC), ("GLIBCXX_", GLIBCXX), ("CXXABI_", CXXABI)):
        need = newest(facts.versions, prefix)
        if need is not None and need > limit:
            needed = prefix + ".".join(map(str, need))
            raise BuildError(f"{sorted(facts.versions[needed])[:3]} need {needed}; bookworm has {limit}")
    glibc = newest(facts.versions, "GLIBC_")
    if glibc is not None:
        depends["libc6"] = f" (>= {'.'.join(map(str, glibc))})"
    return [f"{name}{version}" for name, version in sorted(depends.items())]


def normalise_modes(tree: Path, *, no_exec: Iterable[Path] = ()) -> None:
    """Directories 0755; files 0755 when anyone may execute them, else 0644. Shared libraries (``*.so``, ``*.so.N``)
    and every file under ``no_exec`` (the site-packages: Python reads, nothing there is run) are 0644."""
    quiet = [str(p) for p in no_exec]
    for dirpath, _dirnames, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        plain = any(dirpath == q or dirpath.startswith(q + os.sep) for q in quiet)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                executable = st.st_mode & 0o111 and not plain and not re.search(r"\.so(\.\d+)*$", name)
                os.chmod(p, 0o755 if executable else 0o644)


def set_mtimes(tree: Path, epoch: int) -> None:
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*filenames, *dirnames]:
            os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
    os.utime(tree, (epoch, epoch))


def installed_size(stage: Path) -> int:
    """In KiB, as dpkg-gencontrol counts: each file rounded up to 1 KiB, each other entry 1 KiB."""
    total = 0
    for p in stage.rglob("*"):
        if p.parts[len(stage.parts)] == "DEBIAN":
            continue
        st = p.lstat()
        total += -(-st.st_size // 1024) if stat.S_ISREG(st.st_mode) else 1
    return total


def control_text(arch: Arch, version: str, size: int, elf_depends: list[str]) -> str:
    depends = [
        f"python3 (>= {PY}~)",
        f"python3 (<< 3.{int(PY.split('.')[1]) + 1})",
        *elf_depends,
        "init-system-helpers (>= 1.65~)",
        "systemd",
    ]
    summary = "N3 Edge box service: sensor inference in C and ONNX, signed telemetry"
    description = (
        "edge reads sensor frames, turns each into the model's input tensor in one\n"
        "pass of C code, runs a quantized ONNX model with onnxruntime and emits one\n"
        "record per inference: JSON lines, or envelopes signed with the box's Ed25519\n"
        "key, kept in a durable SQLite outbox and published over MQTT 5 with mutual\n"
        "TLS.\n.\n"
        "This package is the box of an N3 Edge image for Debian and Raspberry Pi OS:\n"
        "the units edge.service and edge-enroll.service (enabled), the edge user,\n"
        "/data/edge and /etc/edge/edge.toml. It carries its own Python environment\n"
        f"in /{PREFIX}, on the system's Python {PY}."
    )
    long = "\n".join(" " + line for line in description.splitlines())
    return (
        f"Package: {PACKAGE}\n"
        f"Version: {version}\n"
        f"Architecture: {arch.deb}\n"
        f"Maintainer: {MAINTAINER}\n"
        f"Installed-Size: {size}\n"
        f"Depends: {', '.join(depends)}\n"
        f"Section: {SECTION}\n"
        "Priority: optional\n"
        f"Description: {summary}\n{long}\n"
    )


def md5sums(stage: Path, conffiles: Iterable[str]) -> str:
    skip = set(conffiles)
    lines = []
    for p in sorted(stage.rglob("*")):
        rel = p.relative_to(stage).as_posix()
        if rel.startswith("DEBIAN/") or rel in skip or p.is_symlink() or not p.is_file():
            continue
        lines.append(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {rel}\n")  # dpkg's format
    return "".join(lines)


def source_date_epoch() -> int:
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    return int(run(["git", "log", "-1", "--format=%ct"], cwd=ROOT).strip())


def stage_package(stage: Path, site_layer: Path, wheel: Path, native: Path, host_py: Path, epoch: int) -> None:
    site = stage / SITE
    link_tree(site_layer / "site", site)
    written = install_edge_wheel(wheel, native, site)
    if (site / "edge" / "fleet").exists():
        raise BuildError("edge/fleet is in the package")
    # The venv: the system's interpreter, this site-packages alone.
    (stage / PREFIX / "pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {PY}\n"
    )
    (stage / PREFIX / "bin").mkdir()
    (stage / PREFIX / "bin" / "python3").symlink_to(os.path.relpath(f"usr/bin/python{PY}", f"{PREFIX}/bin"))
    install(FILES / "edge", stage / "usr/bin/edge", 0o755)
    # The units from the package's edge/data (the work tree's, through the wheel): unmodified.
    for unit in UNITS:
        if f"edge/data/{unit}" not in written:
            raise BuildError(f"the n3-edge wheel has no edge/data/{unit}")
        install(site / "edge" / "data" / unit, stage / UNIT_DIR / unit)
    install(FILES / "sysusers.conf", stage / "usr/lib/sysusers.d/edge.conf")
    install(YOCTO_FILES / "edge-tmpfiles.conf", stage / "usr/lib/tmpfiles.d/edge.conf")
    install(YOCTO_FILES / "edge.toml", stage / CONFFILE)
    # The factory models read-only in /usr/share/edge/models; the package's own copies become links to them, so the
    # package default and the configured path are one file, stored once (as the Yocto recipe does).
    models = sorted((site / "edge" / "models").glob("*.onnx"))
    if not models:
        raise BuildError("the n3-edge wheel has no factory model (edge/models/*.onnx)")
    for model in models:
        shared = stage / MODELS / model.name
        install(model, shared)
        model.unlink()
        model.symlink_to(os.path.relpath(shared, model.parent))
    say("compiling edge's bytecode")
    compile_bytecode(host_py, site / "edge", stage, "/")
    doc = stage / "usr/share/doc" / PACKAGE
    doc.mkdir(parents=True)
    first = int(run(["git", "log", "--max-parents=0", "--format=%ct", "HEAD"], cwd=ROOT).split()[0])
    years = "-".join(sorted({time.strftime("%Y", time.gmtime(t)) for t in (first, epoch)}))
    (doc / "copyright").write_text(copyright_text(site, years))
    gzip_file(changelog_text(str(project()["version"]), epoch).encode(), doc / "changelog.gz")
    cli_docs(host_py, stage, epoch)
    install(FILES / "lintian-overrides", stage / "usr/share/lintian/overrides" / PACKAGE)


def cli_docs(host_py: Path, stage: Path, epoch: int) -> None:
    """The manual page and the bash and zsh completions, generated from the box's parser (no edge fleet)."""
    out = fresh(stage.with_name(stage.name + "-cli-docs"))
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    run([host_py, ROOT / "tools" / "gen_cli_docs.py", out, "--box", "--date", date])
    gzip_file((out / "edge.1").read_bytes(), stage / MANPAGE)
    install(out / "completions" / "edge.bash", stage / BASH_COMPLETION)
    install(out / "completions" / "_edge", stage / ZSH_COMPLETION)
    shutil.rmtree(out)


def build(arch: Arch, out_dir: Path, cache: Path, compression: str, level: int | None) -> Path:
    host_py = Path(os.environ.get("HOST_PY", ROOT / ".venv" / "bin" / "python"))
    if not host_py.exists():
        raise BuildError(f"{host_py} is missing: run tools/bootstrap.sh (make test does) first")
    host_version = run([host_py, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).strip()
    if host_version != PY:
        raise BuildError(f"{host_py} is Python {host_version}: the bytecode must be {PY}'s, the box's")
    if shutil.which("dpkg-deb") is None:
        raise BuildError("dpkg-deb is missing: this builds on Debian (or a derivative)")
    cache.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per cache at a time; a second waits
        ensure_host_tools(arch)
        headers = python_headers(arch, cache)
        say(f"headers: libpython{PY}-dev {(headers / '.version').read_text()} ({arch.deb})")
        site_layer = dependencies(arch, host_py, cache)
        say("dependencies ready")
        wheel = edge_wheel(host_py, cache)
        native = native_extension(arch, headers, cache)
        say(f"{wheel.name} and {native.name} ready")
        epoch = source_date_epoch()
        stage = fresh(cache / f"stage-{arch.deb}")
        stage_package(stage, site_layer, wheel, native, host_py, epoch)
        elf_depends = check_elf(stage, arch)
        say(f"checks passed; ELF files need {', '.join(elf_depends)}")
        version = str(project()["version"])
        debian = stage / "DEBIAN"
        debian.mkdir()
        for script in ("postinst", "prerm", "postrm"):
            install(FILES / script, debian / script, 0o755)
        (debian / "conffiles").write_text(f"/{CONFFILE}\n")
        (debian / "md5sums").write_text(md5sums(stage, [CONFFILE]))
        normalise_modes(stage, no_exec=[stage / SITE])
        (debian / "control").write_text(control_text(arch, version, installed_size(stage), elf_depends))
        (debian / "control").chmod(0o644)
        set_mtimes(stage, epoch)
        name = f"{PACKAGE}_{version}_{arch.deb}.deb"
        pack = ["dpkg-deb", "--root-owner-group", f"-Z{compression}", *([f"-z{level}"] if level is not None else [])]
        # dpkg-deb's output is a function of the tree, its options, the epoch and its version: a tree packed before
        # is not packed again (xz takes most of a warm build).
        key = digest(RECIPE, " ".join(pack), str(epoch), run(["dpkg-deb", "--version"]), tree_digest(stage))
        packed = cache / f"deb-{arch.deb}-{compression}-{key}" / name
        if compression == "none":  # packing costs a second; keeping 160 MB for it would not pay
            packed = fresh(cache / f"deb-{arch.deb}-none.tmp") / name
            run([*pack, "--build", stage, packed], env=dict(os.environ, SOURCE_DATE_EPOCH=str(epoch)))
        elif not packed.exists():
            say(f"packing {name} ({compression})")
            tmp = fresh(packed.parent.with_name(packed.parent.name + ".tmp"))
            run([*pack, "--build", stage, tmp / name], env=dict(os.environ, SOURCE_DATE_EPOCH=str(epoch)))
            publish(tmp, packed.parent, f"deb-{arch.deb}-{compression}-")
        else:
            say(f"{name}: this tree was packed before ({packed.parent.name})")
        shutil.rmtree(stage)
        deb = out_dir / name
        shutil.copyfile(packed, deb)
        if compression == "none":
            shutil.rmtree(packed.parent)
        say(f"built {deb}: {deb.stat().st_size / 1e6:.1f} MB")
        return deb


def tree_digest(tree: Path) -> str:
    """Every path of ``tree`` with its type, mode and content (or link target)."""
    h = hashlib.sha256()
    for p in sorted(tree.rglob("*")):
        st = p.lstat()
        entry = f"{p.relative_to(tree)}\0{st.st_mode:o}\0"
        if stat.S_ISLNK(st.st_mode):
            entry += os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            with p.open("rb") as f:
                entry += hashlib.file_digest(f, "sha256").hexdigest()
        h.update(entry.encode() + b"\n")
    return h.hexdigest()


def lint(deb: Path) -> None:
    """lintian on the package: any error or warning that the package's overrides do not explain fails."""
    if shutil.which("lintian") is None:
        say("installing lintian")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        run([*sudo, "apt-get", "update", "-qq"])
        run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "lintian"],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))  # fmt: skip
    say(f"lintian {deb.name}")
    proc = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--display-info", str(deb)],
        capture_output=True,
        text=True,
        check=False,
    )
    print(proc.stdout + proc.stderr, end="", file=sys.stderr)
    if proc.returncode != 0:
        raise BuildError(f"lintian exited {proc.returncode}: see its output above")
    say("lintian: no error or warning")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--arch", choices=sorted(ARCHES), required=True, help="the Debian architecture to build for")
    parser.add_argument("--out", type=Path, required=True, help="where to write edge_<version>_<arch>.deb")
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("EDGE_DEB_CACHE", ROOT / ".cache" / "deb")),
        help="the cache of downloads and built layers (default .cache/deb, or EDGE_DEB_CACHE)",
    )  # fmt: skip
    parser.add_argument("--compression", choices=COMPRESSIONS, default="xz", help="of the data member (default xz)")
    parser.add_argument("--level", type=int, help="the compression level (dpkg-deb -z; default dpkg-deb's)")
    parser.add_argument("--lint", action="store_true", help="run lintian on the package (installed when missing)")
    args = parser.parse_args(argv)
    try:
        deb = build(ARCHES[args.arch], args.out.resolve(), args.cache.resolve(), args.compression, args.level)
        if args.lint:
            lint(deb)
    except BuildError as e:
        print(f"deb: FAILED: {e}", file=sys.stderr)
        return 1
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())

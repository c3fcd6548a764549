"""What Yocto 6.0 "wrynose" does, as far as the offline checks need it, each fact with the file it comes from.

Data and small functions, no network and no bitbake. The facts were read in the wrynose branches of
openembedded-core (oe-core below) and bitbake 2.18; when the layer moves to another release, re-read each source
named here and update the fact with it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

RELEASE = "wrynose"

# ------------------------------------------------------------------------------------------------ Python builds


class Tool(NamedTuple):
    """A native build tool as oe-core wrynose ships it: what the check installs, and the sdist its recipe fetches
    (``${PYPI_PACKAGE}-${PV}.tar.gz`` with the recipe's SRC_URI[sha256sum]), which ties the version to the recipe."""

    requirement: str
    pypi_package: str
    sha256: str

    @property
    def version(self) -> str:
        return self.requirement.split("==")[1]

    @property
    def sdist(self) -> str:
        return pypi_archive(self.pypi_package, self.version)


# The native tools of the Python build classes, recipe -> Tool, from meta/recipes-devtools/python/<recipe>_<PV>.bb
# in oe-core wrynose (PV, PYPI_PACKAGE and SRC_URI[sha256sum]). The tool venv is made only if PyPI's sdist of each
# pinned version has that sha256: a pin that is not wrynose's fails. wrynose's python3 is 3.14; the checks run the
# tools on the host's Python.
NATIVE_TOOLS = {
    "python3-build": Tool("build==1.4.0", "build", "f1b91b925aa322be454f8330c6fb48b465da993d1e7e7e6fa35027ec49f3c936"),
    "python3-pyproject-hooks": Tool(
        "pyproject_hooks==1.2.0", "pyproject_hooks", "1e859bd5c40fae9448642dd871adf459e5e2084186e8d2c2a79a824c970da1f8"
    ),
    "python3-packaging": Tool(
        "packaging==26.0", "packaging", "00243ae351a257117b6a241061796684b084ed1c516a08c48a3f7e147a9d80b4"
    ),
    "python3-installer": Tool(
        "installer==0.7.0", "installer", "a26d3e3116289bb08216e0d0f7d925fcef0b0194eedfa0c944bcaaa106c4b631"
    ),
    "python3-setuptools": Tool(
        "setuptools==82.0.1", "setuptools", "7d872682c5d01cfde07da7bccc7b65469d3dca203318515ada1de5eda35efbf9"
    ),
    "python3-wheel": Tool("wheel==0.46.3", "wheel", "e3e79874b07d776c40bd6033f8ddf76a7dad46a7b8aa1b2787a83083519a1803"),
    "python3-hatchling": Tool(
        "hatchling==1.29.0", "hatchling", "793c31816d952cee405b83488ce001c719f325d9cda69f1fc4cd750527640ea6"
    ),
    "python3-pathspec": Tool(
        "pathspec==1.0.4", "pathspec", "0210e2ae8a21a9137c0d470578cb0e595af87edaa6ebf12ff176f14a02e0e645"
    ),
    "python3-pluggy": Tool(
        "pluggy==1.6.0", "pluggy", "7dcc130b76258d33b90f61b658791dede3486c3e6bfb003ee5c9bfb396dd22f3"
    ),
    "python3-trove-classifiers": Tool(
        "trove-classifiers==2026.1.14.14",
        "trove_classifiers",
        "00492545a1402b09d4858605ba190ea33243d361e2b01c9c296ce06b5c3325f3",
    ),
    "python3-editables": Tool(
        "editables==0.5", "editables", "309627d9b5c4adc0e668d8c6fa7bac1ba7c8c5d415c2d27f60f081f8e80d1de2"
    ),
    # The recipe builds flit_core from the flit sdist (PYPI_PACKAGE = "flit").
    "python3-flit-core": Tool(
        "flit_core==3.12.0", "flit", "1c80f34dd96992e7758b40423d2809f48f640ca285d0b7821825e50745ec3740"
    ),
    "python3-poetry-core": Tool(
        "poetry-core==2.3.1", "poetry_core", "96f791d5d7d4e040f3983d76779425cf9532690e2756a24fd5ca0f86af19ef82"
    ),
}
_PEP517 = frozenset({"python3-build", "python3-pyproject-hooks", "python3-packaging", "python3-installer"})
# Build class -> the native recipes in a recipe's sysroot through it: the class's DEPENDS
# (meta/classes-recipe/<class>.bbclass) and those recipes' own dependencies (python3-hatchling_1.29.0.bb: pluggy,
# pathspec, packaging, editables, trove-classifiers; python3-build: pyproject-hooks, packaging).
CLASS_NATIVES = {
    "python_pep517": _PEP517,
    "python_setuptools_build_meta": _PEP517 | {"python3-setuptools", "python3-wheel"},
    "setuptools3": _PEP517 | {"python3-setuptools", "python3-wheel"},
    "python_hatchling": _PEP517
    | {"python3-hatchling", "python3-pluggy", "python3-pathspec", "python3-editables", "python3-trove-classifiers"},
    "python_flit_core": _PEP517 | {"python3-flit-core"},
    "python_poetry_core": _PEP517 | {"python3-poetry-core"},
}
# python_pep517.bbclass: do_compile runs `pyproject-build --no-isolation --wheel --outdir <dir> ${S}
# ${PEP517_BUILD_OPTS}`; setuptools3.bbclass instead runs `setup.py build bdist_wheel --dist-dir <dir>
# ${SETUPTOOLS_BUILD_ARGS}`. do_install runs `python3 -m installer --interpreter "/usr/bin/env python3"
# --prefix=/usr --destdir=${D} <wheel>`.
INSTALL_INTERPRETER = "/usr/bin/env python3"


def recipe_for_requirement(requirement: str) -> str:
    """The native recipe that provides a [build-system] requirement: ``hatchling==1.32.0`` -> python3-hatchling."""
    name = re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]
    return "python3-" + re.sub(r"[-_.]+", "-", name).lower()


def pypi_archive(pypi_package: str, pv: str, ext: str = "tar.gz") -> str:
    """pypi.bbclass: the sdist the recipe fetches is ``${PYPI_PACKAGE}-${PV}.${PYPI_PACKAGE_EXT}``."""
    return f"{pypi_package}-{pv}.{ext}"


def pypi_package_default(bpn: str) -> str:
    """pypi.bbclass: PYPI_PACKAGE defaults to BPN without its python-/python3- prefix."""
    for prefix in ("python-", "python3-"):
        if bpn.startswith(prefix):
            return bpn[len(prefix) :]
    return bpn


# ------------------------------------------------------------------------------------------------ licenses


def license_md5(path: Path, beginline: int = 0, endline: int = 0) -> str:
    """The checksum populate_lic_qa_checksum (meta/classes-global/insane.bbclass) compares with
    LIC_FILES_CHKSUM: the whole file's md5, or of the lines beginline..endline (1-based, with their newlines)."""
    import hashlib  # noqa: PLC0415 -- md5 only here

    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if beginline and number < beginline:
                continue
            if endline and number > endline:
                break
            h.update(line)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ QA of packages

# insane.bbclass (file-rdeps, an ERROR_QA): the file dependencies rpmdeps finds that need no provider in RDEPENDS.
# /usr/bin/sh joins them with usrmerge, which init-manager-systemd.inc adds to DISTRO_FEATURES.
FILE_RDEPS_IGNORED = frozenset({"/bin/sh", "/usr/bin/env", "/usr/bin/sh"})
# Interpreters -> the package that provides them on the target (oe-core's bash, python3, perl recipes).
INTERPRETER_PACKAGES = {
    "/bin/bash": "bash",
    "/usr/bin/bash": "bash",
    "/usr/bin/python3": "python3-core",
    "/usr/bin/perl": "perl",
    "/usr/bin/tclsh": "tcl",
}
# insane.bbclass package_qa_check_shebang_size: a first line of more than 128 bytes after "#!" is an error.
SHEBANG_MAX = 129


def script_interpreter(first_line: bytes) -> str | None:
    """The file dependency rpm's script.req derives from a first line: the path after ``#!``, nothing else."""
    m = re.match(rb"#!\s*(/\S+)", first_line)
    return m.group(1).decode("utf-8", "replace") if m else None


def executable_scripts(root: Path) -> Iterable[tuple[str, bytes]]:
    """Regular files under root that rpmdeps reads as scripts (executable, ``#!`` first): path, first line."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
                continue
            with path.open("rb") as f:
                first = f.readline(SHEBANG_MAX + 1)
            if first.startswith(b"#!"):
                yield str(path.relative_to(root)), first


def unmet_file_rdepends(root: Path, rdepends: set[str]) -> list[str]:
    """The file-rdeps and shebang-size QA errors wrynose raises for what a package installs under root."""
    problems = []
    for rel, first in executable_scripts(root):
        if len(first) > SHEBANG_MAX:
            problems.append(f"/{rel}: shebang longer than 128 bytes (shebang-size)")
            continue
        interpreter = script_interpreter(first)
        if interpreter is None or interpreter in FILE_RDEPS_IGNORED:
            continue
        provider = INTERPRETER_PACKAGES.get(interpreter)
        if provider is None or provider not in rdepends:
            needs = provider or f"a package providing {interpreter}"
            problems.append(f"/{rel} runs {interpreter}, and RDEPENDS lacks {needs} (file-rdeps)")
    return problems


# ------------------------------------------------------------------------------------------------ images


def wks_search_path(recipe_dir: Path, bbpath: Sequence[Path]) -> list[Path]:
    """WKS_SEARCH_PATH of meta/classes-recipe/image_types_wic.bbclass: the image recipe's directory (THISDIR), then
    ``files/wic`` under each BBPATH entry. Up to walnascar it searched ``<entry>/wic`` and oe-core's canned-wks; from
    wrynose on a kickstart file in ``<layer>/wic/`` is not found and do_image_wic stops ("No kickstart files from
    WKS_FILES were found")."""
    return [recipe_dir, *(entry / "files" / "wic" for entry in bbpath)]


def wks_find(wks_files: Sequence[str], search_path: Sequence[Path]) -> Path | None:
    """wks_search of image_types_wic.bbclass: each of WKS_FILES in turn, in the first directory that has it."""
    for name in wks_files:
        if os.path.isabs(name):
            if Path(name).exists():
                return Path(name)
            continue
        for directory in search_path:
            if (directory / name).is_file():
                return directory / name
    return None


def runqemu_kernel_root(qb_kernel_root: str) -> str:
    """scripts/runqemu: the kernel's ``root=`` argument; " rw" is appended unless QB_KERNEL_ROOT names ro or rw."""
    words = qb_kernel_root.split()
    if "ro" not in words and "rw" not in words:
        qb_kernel_root += " rw"
    return f"root={qb_kernel_root}"


# ------------------------------------------------------------------------------------------------ yocto-check-layer

# CHECKLAYER_REQUIRED_TESTS (insane.bbclass): no recipe of a compatible layer may skip them (INSANE_SKIP).
_REQUIRED_TESTS = """\
configure-gettext configure-unsafe debug-files dep-cmp expanded-d files-invalid host-user-contaminated
incompatible-license infodir installed-vs-shipped invalid-chars invalid-packageconfig la license-checksum
license-exception license-exists license-file-missing license-format license-no-generic license-syntax mime
mime-xdg missing-update-alternatives multilib obsolete-license packages-list patch-fuzz patch-status
perllocalpod perm-config perm-line perm-link recipe-naming pkgconfig pkgvarcheck pkgv-undefined pn-overrides
shebang-size src-uri-bad symlink-to-sysroot unhandled-features-check unknown-configure-option unlisted-pkg-lics
uppercase-pn useless-rpaths virtual-slash xorg-driver-abi
"""
CHECKLAYER_REQUIRED_TESTS = frozenset(_REQUIRED_TESTS.split())
# Variables that need `inherit features_check` (its unhandled-features-check QA test).
FEATURES_CHECK_VARS = (
    "ANY_OF_DISTRO_FEATURES",
    "REQUIRED_DISTRO_FEATURES",
    "CONFLICT_DISTRO_FEATURES",
    "ANY_OF_MACHINE_FEATURES",
    "REQUIRED_MACHINE_FEATURES",
    "CONFLICT_MACHINE_FEATURES",
    "ANY_OF_COMBINED_FEATURES",
    "REQUIRED_COMBINED_FEATURES",
    "CONFLICT_COMBINED_FEATURES",
)


def check_layer_readme(layer: Path) -> list[str]:
    """test_readme of scripts/lib/checklayer/cases/common.py: a README in the layer's root, not empty, that names a
    maintainer, says how to send patches and has an e-mail address (unless it points to another README)."""
    readmes = sorted(layer.glob("[Rr][Ee][Aa][Dd][Mm][Ee]*"))
    if not readmes:
        return ["no README in the layer's root"]
    text = readmes[0].read_text(encoding="utf-8")
    if not text:
        return [f"{readmes[0].name} is empty"]
    if re.search("README", text, re.IGNORECASE):
        return []
    problems = []
    if "maintainer" not in text.lower():
        problems.append(f"{readmes[0].name} names no maintainer (the word 'maintainer')")
    if "patch" not in text.lower():
        problems.append(f"{readmes[0].name} says nothing about patches (the word 'patch')")
    if not re.search(r"[^@]+@[^@]+", text):
        problems.append(f"{readmes[0].name} has no e-mail address")
    return problems


def check_layer_security(layer: Path, toplevel: Path) -> list[str]:
    """test_security: SECURITY or SECURITY.* in the layer, else at the top of its git repository, not empty."""
    for directory in (layer, toplevel):
        for pattern in ("SECURITY", "SECURITY.*"):
            found = sorted(directory.glob(pattern))
            if found:
                return [] if found[0].stat().st_size > 0 else [f"{found[0]} is empty"]
    return [f"no SECURITY file in {layer.name} or at the top of its repository"]

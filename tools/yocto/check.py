"""Offline checks of the Yocto layer (yocto/meta-edge) and its kas files: ``make check-yocto``.

A bitbake build needs the network and hours; these checks need neither bitbake nor layers cloned, and catch what
such a build would trip on first, or what it would let through silently (a dependency the image lacks, a model path
nothing installs). What they know of Yocto 6.0 "wrynose" is in wrynose.py, each fact with its source:

- layer.conf: the collection, its dependencies and LAYERSERIES_COMPAT for wrynose; no WORKDIR paths.
- oelint-adv ``--release wrynose`` on every recipe, class and conf file: no finding of any severity. The homepage
  ping needs the network and is suppressed; so is BUGTRACKER, which the project does not have yet.
- The edge recipe against the project it builds: the version, the LICENSE checksum, SRCREV a commit of this
  repository, every pyproject dependency and every standard library module that edge imports mapped to an
  RDEPENDS entry, the unit installed from the package (no copy in the layer), the ptest files present and
  importable on the box.
- The fleet split: edge/fleet/ is the edge-fleet package (PACKAGES, FILES); no image installs it, through its
  IMAGE_INSTALL, packagegroups or any package's RDEPENDS/RRECOMMENDS, nor through a kas configuration's additions;
  the box's modules and its ptest files never import it; the fleet's own imports are in its RDEPENDS.
- Run-time names: every package the layer's recipes and kas files install or depend on is made by a recipe of the
  layer or is one of the names verified in the wrynose branches of the layers it depends on (EXTERNAL_PACKAGES):
  bitbake stops with "Nothing RPROVIDES" otherwise.
- systemd: every recipe that ships a unit, and whatever installs one, requires the systemd distro feature
  (REQUIRED_DISTRO_FEATURES with features_check); every kas configuration selects systemd.
- The image: WKS_FILE resolves on wrynose's kickstart search path (the recipe's directory and files/wic/ of each
  layer); runqemu boots the kickstart's root partition read-only when the image's root is read-only.
- The files the image installs: edge.toml loads with edge's own loader and names the installed factory model and
  the data directory; tmpfiles.d creates that directory with the service's user and mode (systemd-tmpfiles on a
  scratch root); data.mount passes ``systemd-analyze verify`` without a warning; no script of the layer needs an
  interpreter that its recipe's RDEPENDS lack.
- The kas files: yamllint --strict, JSON-schema validation against kas's own schema, includes and lock files that
  resolve, lock files as kas lock writes them, every repository outside git.openembedded.org and
  git.yoctoproject.org pinned by commit, every layer the meta-edge layer depends on provided by a repository.
- yocto-check-layer's tests that need no build: the README's maintainer, patch and e-mail information, a SECURITY
  file, no task with network access, no skipped required QA test, patches with an Upstream-Status.
- The wheel: built from a copy of the tracked files without build isolation by the tools wrynose ships (as
  python_setuptools_build_meta builds it), containing the C extension, the factory model, the unit and edge/fleet
  (for the split), under the distribution name n3-edge; installed with pypa/installer as do_install does, it needs
  no interpreter its RDEPENDS lack. Skipped while the tracked files, the pins and these checks are unchanged since
  the last success.
- The PyPI recipes (python3-tuf, ...): the sdist the recipe names exists on PyPI with the recipe's sha256 and
  license checksums; its [build-system] requirements are in the recipe's native sysroot; it builds by the recipe's
  class with wrynose's tool versions and the recipe's PEP517_BUILD_OPTS (an sdist that pins a newer backend fails
  without --skip-dependency-check, as bitbake's build does); installed, minus what do_install:append removes, no
  script needs an interpreter the recipe's RDEPENDS lack (wrynose's file-rdeps QA error), and every standard
  library module its public modules load is in a python3-* package its RDEPENDS pull in. Each recipe is skipped
  while it, its sdist, the pins and these checks are unchanged since its last success.
- ruff on the layer's Python (the oeqa test and its helper).

Prints every check and its result; exits 1 if any check found something. Nothing is written to the repository
outside .cache/yocto/ (the tool venv, sdists and pip downloads, success stamps). PyPI is the only network use, the
first time each pinned tool or sdist is needed.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

# This directory's modules, importable however the script is run; no __pycache__ written beside them.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kasfiles  # noqa: E402
import pypi  # noqa: E402
import wrynose  # noqa: E402
from recipes import Recipe, bb_vars, dependency_names, layer_recipes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "yocto" / "meta-edge"
KAS = ROOT / "yocto" / "kas"
RECIPE = LAYER / "recipes-edge" / "edge" / "edge_git.bb"
CACHE = ROOT / ".cache" / "yocto"
RELEASE = wrynose.RELEASE
# The checks themselves: a change to any of them invalidates the success stamps.
CHECK_SOURCES = sorted(Path(__file__).resolve().parent.glob("*.py"))
# The distribution's name on PyPI (the import package stays edge): "edge" there is an unrelated, older project.
DIST_NAME = "n3-edge"
# The tool venv: every native Python build tool wrynose ships, at its version (wrynose.NATIVE_TOOLS). The wheel and
# the PyPI recipes build with them the way python_pep517.bbclass does (pyproject-build --no-isolation).
TOOLS = tuple(wrynose.NATIVE_TOOLS.values())
TOOL_PINS = tuple(sorted(t.requirement for t in TOOLS))
OELINT_SUPPRESS = ("oelint.vars.homepageping", "oelint.var.suggestedvar.BUGTRACKER")

# pyproject dependency (distribution name) -> the recipe that provides it on the box.
DIST_RECIPES = {
    "numpy": "python3-numpy",
    "onnxruntime": "onnxruntime",
    "pyserial": "python3-pyserial",
    "cobs": "python3-cobs",
    "cbor2": "python3-cbor2",
    "cryptography": "python3-cryptography",
    "paho-mqtt": "python3-paho-mqtt",
    "base58": "python3-base58",
    "tuf": "python3-tuf",
    # Not direct dependencies: the OTA fetcher and key handling import them beside tuf, which requires both.
    "securesystemslib": "python3-securesystemslib",
    "urllib3": "python3-urllib3",
}
# Third-party import name -> distribution name.
IMPORT_DISTS = {
    "numpy": "numpy",
    "onnxruntime": "onnxruntime",
    "serial": "pyserial",
    "cobs": "cobs",
    "cbor2": "cbor2",
    "cryptography": "cryptography",
    "paho": "paho-mqtt",
    "base58": "base58",
    "tuf": "tuf",
    "securesystemslib": "securesystemslib",
    "urllib3": "urllib3",
}
# Imports the box never makes: the quantizer (``edge model quantize``, a workstation command) imports onnx lazily,
# never in ``edge run``. The fleet (edge/fleet/) is checked apart: it is the edge-fleet package, not the box's.
NOT_ON_THE_BOX = {"onnx"}
# The box's optional imports: the camera extra (pyproject.toml), loaded only when the configuration asks for it (av
# for source.kind = "stream", simplejpeg for an MJPG camera), each failing with a message that says what to install.
# The image has no recipe for them: raw V4L2 capture needs neither.
BOX_OPTIONAL = {"av", "simplejpeg"}
# The fleet's own third-party imports -> the recipe that provides them; None: optional, loaded only when configured
# (psycopg for a postgresql:// store; segno for `claims create --qr`, which says what to install), and documented.
FLEET_RECIPES: dict[str, str | None] = {
    "prometheus_client": "python3-prometheus-client",
    "psycopg": None,
    "segno": None,
}
FLEET_PACKAGE = "${PN}-fleet"
FLEET_FILES = "${PYTHON_SITEPACKAGES_DIR}/edge/fleet"
# Standard library module -> the OE package that ships it (openembedded-core's python3-manifest.json; python3-misc,
# the python3 recipe's catch-all, takes the modules the manifest does not name). A module missing here stops the
# check: look it up in the manifest, add it, and add the package to RDEPENDS.
_PACKAGE_MODULES = {
    "python3-core": "__future__ abc argparse ast atexit binascii bisect builtins codecs collections contextlib copy "
    "copyreg csv dataclasses enum errno fcntl fnmatch functools gc getopt gettext glob grp heapq importlib inspect io "
    "ipaddress itertools keyword linecache locale math operator os pathlib platform posix pwd re reprlib select "
    "selectors shutil signal site stat struct subprocess sys sysconfig textwrap threading time tokenize traceback "
    "types typing warnings weakref zlib",
    "python3-asyncio": "asyncio concurrent",
    "python3-compression": "gzip tarfile zipfile",
    "python3-crypt": "hashlib",
    "python3-ctypes": "ctypes",
    "python3-datetime": "calendar datetime",
    "python3-difflib": "difflib",
    "python3-io": "socket ssl tempfile termios",
    "python3-json": "json",
    "python3-logging": "logging",
    "python3-math": "cmath random",
    "python3-misc": "timeit wsgiref",
    "python3-mmap": "mmap",
    "python3-netclient": "base64 hmac http secrets urllib uuid",
    "python3-netserver": "socketserver",
    "python3-numbers": "contextvars decimal fractions numbers",
    "python3-pprint": "pprint",
    "python3-shell": "shlex",
    "python3-sqlite3": "sqlite3",
    "python3-stringold": "string",
    "python3-threading": "queue",
    "python3-tomllib": "tomllib",
}
STDLIB_PACKAGES = {module: pkg for pkg, modules in _PACKAGE_MODULES.items() for module in modules.split()}
# Built into the interpreter (sys.builtin_module_names): no package to depend on.
BUILTIN_MODULES = frozenset(sys.builtin_module_names)
# What the ptest files may import at module level: the package and its RDEPENDS, pytest, hypothesis, and the test
# helpers the recipe installs beside them.
PTEST_HELPERS = ("conftest.py", "mqtt_broker.py", "preprocess_reference.py")
PTEST_IMPORTS = {"edge", "pytest", "hypothesis", *IMPORT_DISTS, *(h.removesuffix(".py") for h in PTEST_HELPERS)}
# LAYERDEPENDS collection -> (kas repository, layer path inside it) that provides it.
COLLECTIONS = {
    "core": ("openembedded-core", "meta"),
    "openembedded-layer": ("meta-openembedded", "meta-oe"),
    "meta-python": ("meta-openembedded", "meta-python"),
    "meta-onnxruntime": ("meta-onnxruntime", "."),
}
# Run-time names the layer uses that other layers make, as verified in their wrynose branches (openembedded-core,
# meta-openembedded, meta-onnxruntime at the pinned commit); the python3-* splits of the standard library are those
# of STDLIB_PACKAGES (oe-core's python3-manifest.json). A name that is neither this nor a package of the layer's own
# recipes fails the check: verify it in the layer that should provide it, then add it here.
EXTERNAL_PACKAGES = {
    "openembedded-core": "packagegroup-core-boot ptest-runner python3-cryptography python3-hypothesis python3-numpy "
    "python3-pytest python3-unittest-automake-output python3-urllib3",
    "meta-python": "python3-cbor2 python3-paho-mqtt python3-pyserial",
    "meta-onnxruntime": "onnxruntime",
}
EXTERNAL_NAMES = {name for names in EXTERNAL_PACKAGES.values() for name in names.split()} | set(
    STDLIB_PACKAGES.values()
)
# Hosts whose repositories keep a branch per release (kas may follow it); a repository anywhere else is pinned by
# commit, in its kas file or a lock file beside it.
RELEASE_BRANCH_HOSTS = ("https://git.openembedded.org/", "https://git.yoctoproject.org/")
FLEET_PACKAGE_NAME = "edge-fleet"


class CheckFailedError(Exception):
    """A check failed; the message says what and where."""


# ------------------------------------------------------------------------------------------------ helpers


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def tracked_files() -> list[str]:
    proc = run(["git", "ls-files", "-z"], cwd=ROOT)
    if proc.returncode != 0:
        raise CheckFailedError(f"git ls-files failed: {proc.stderr.strip()}")
    return [p for p in proc.stdout.split("\0") if p and (ROOT / p).is_file()]


def imports_of(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes: Iterator[ast.AST] = iter(tree.body) if module_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def tool(name: str, package: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        raise CheckFailedError(f"{name} is not installed: {Path(sys.executable).parent}/pip install {package}")
    return found


# ------------------------------------------------------------------------------------------------ checks


def check_layer() -> str:
    conf = bb_vars(LAYER / "conf" / "layer.conf")
    problems = []
    if conf.get("BBFILE_COLLECTIONS") != "edge":
        problems.append(f"BBFILE_COLLECTIONS is {conf.get('BBFILE_COLLECTIONS')!r}, expected 'edge'")
    if RELEASE not in conf.get("LAYERSERIES_COMPAT_edge", "").split():
        problems.append(f"LAYERSERIES_COMPAT_edge does not name {RELEASE}")
    deps = set(conf.get("LAYERDEPENDS_edge", "").split())
    if deps != set(COLLECTIONS):
        problems.append(f"LAYERDEPENDS_edge is {sorted(deps)}, expected {sorted(COLLECTIONS)}")
    if any(k.startswith("DISTRO_FEATURES") for k in conf):
        problems.append("layer.conf sets DISTRO_FEATURES: a layer must not change the distro")
    # From wrynose on, fetched files unpack into UNPACKDIR, and WORKDIR is no place to look for them (oelint-adv
    # flags only S = "${WORKDIR}/...", not a use in a task).
    for recipe in sorted(LAYER.rglob("*.bb*")):
        for number, line in enumerate(recipe.read_text(encoding="utf-8").splitlines(), start=1):
            if "${WORKDIR}" in line:
                problems.append(
                    f"{recipe.relative_to(ROOT)}:{number}: ${{WORKDIR}} (use ${{UNPACKDIR}}): {line.strip()}"
                )
    if problems:
        raise CheckFailedError("; ".join(problems))
    return f"collection edge, LAYERDEPENDS {' '.join(sorted(deps))}, compatible with {RELEASE}, no WORKDIR paths"


def check_oelint() -> str:
    files = sorted(
        str(p)
        for p in LAYER.rglob("*")
        if p.is_file() and (p.suffix in (".bb", ".bbappend", ".bbclass", ".inc") or p.name.endswith(".conf"))
    )
    cmd = [
        tool("oelint-adv", "oelint-adv"),
        "--release",
        RELEASE,
        "--mode",
        "all",
        "--quiet",
        "--jobs",
        "2",
        f"--constantmods=+{ROOT / 'tools' / 'yocto' / 'oelint-constants.json'}",
        *(f"--suppress={rule}" for rule in OELINT_SUPPRESS),
        *files,
    ]
    proc = run(cmd, cwd=ROOT)
    findings = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or findings:
        raise CheckFailedError(f"oelint-adv (exit {proc.returncode}):\n{findings}")
    return f"{len(files)} files clean (oelint-adv --release {RELEASE} --mode all)"


def check_recipe_against_project() -> str:
    rv = bb_vars(RECIPE)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    problems = []

    pv = rv.get("PV", "")
    if pv.split("+")[0] != project["version"]:
        problems.append(f"PV {pv!r} does not start with pyproject's version {project['version']!r}")

    md5 = hashlib.md5((ROOT / "LICENSE").read_bytes()).hexdigest()
    if rv.get("LIC_FILES_CHKSUM") != f"file://LICENSE;md5={md5}":
        problems.append(f"LIC_FILES_CHKSUM is {rv.get('LIC_FILES_CHKSUM')!r}, LICENSE has md5 {md5}")
    if rv.get("LICENSE") != project.get("license"):
        problems.append(f"LICENSE {rv.get('LICENSE')!r} differs from pyproject's {project.get('license')!r}")

    srcrev = rv.get("SRCREV", "")
    if not re.fullmatch(r"[0-9a-f]{40}", srcrev):
        problems.append(f"SRCREV {srcrev!r} is not a full commit id")
    elif run(["git", "cat-file", "-e", f"{srcrev}^{{commit}}"], cwd=ROOT).returncode != 0:
        problems.append(f"SRCREV {srcrev} is not a commit of this repository")
    else:
        blob = subprocess.run(["git", "show", f"{srcrev}:LICENSE"], cwd=ROOT, capture_output=True, check=False)
        if hashlib.md5(blob.stdout).hexdigest() != md5:
            problems.append(f"LICENSE at SRCREV {srcrev[:12]} has another checksum than LIC_FILES_CHKSUM")

    rdepends = set(rv.get("RDEPENDS:${PN}", "").split())
    for dep in project["dependencies"]:
        dist = re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower()
        recipe = DIST_RECIPES.get(dist)
        if recipe is None:
            problems.append(f"pyproject dependency {dist!r} has no recipe in DIST_RECIPES (tools/yocto/check.py)")
        elif recipe not in rdepends:
            problems.append(f"pyproject dependency {dist!r}: {recipe} is not in RDEPENDS:${{PN}}")

    box_modules = [p for p in (ROOT / "edge").rglob("*.py") if "fleet" not in p.relative_to(ROOT).parts]
    needed: dict[str, set[str]] = {}
    for path in box_modules:
        for name in imports_of(path) - {"edge"}:
            if name in sys.stdlib_module_names:
                pkg = STDLIB_PACKAGES.get(name)
                if pkg is None:
                    problems.append(f"{path.relative_to(ROOT)} imports {name}: add its OE package to STDLIB_PACKAGES")
                    continue
            elif name in NOT_ON_THE_BOX or name in BOX_OPTIONAL:
                continue
            elif name in IMPORT_DISTS:
                pkg = DIST_RECIPES[IMPORT_DISTS[name]]
            else:
                problems.append(f"{path.relative_to(ROOT)} imports {name}, which no recipe provides")
                continue
            needed.setdefault(pkg, set()).add(name)
    for pkg, names in sorted(needed.items()):
        if pkg not in rdepends:
            problems.append(f"edge imports {', '.join(sorted(names))}: {pkg} is not in RDEPENDS:${{PN}}")

    install = RECIPE.read_text(encoding="utf-8")
    if "${S}/edge/data/edge.service" not in install:
        problems.append("the recipe does not install the package's unit ${S}/edge/data/edge.service")
    copies = sorted(str(p.relative_to(ROOT)) for p in LAYER.rglob("edge.service"))
    if copies:
        problems.append(f"a copy of the unit in the layer: {copies} (install the package's)")
    scripts = project.get("scripts", {})
    if scripts.get("edge") != "edge.cli:main":
        problems.append("pyproject has no 'edge' script: the unit's ExecStart=/usr/bin/edge would not exist")

    ptest = rv.get("EDGE_PTEST_FILES", "").split()
    if not ptest:
        problems.append("EDGE_PTEST_FILES is empty")
    for name in [*PTEST_HELPERS, *ptest]:
        path = ROOT / "tests" / name
        if not path.is_file():
            problems.append(f"ptest file tests/{name} does not exist")
            continue
        foreign = {
            n for n in imports_of(path, module_level_only=True) if n not in sys.stdlib_module_names
        } - PTEST_IMPORTS
        if foreign:
            problems.append(f"ptest file tests/{name} imports {sorted(foreign)}, which the box does not have")
    if problems:
        raise CheckFailedError("\n".join(problems))
    return (
        f"PV {pv}, LICENSE md5 {md5[:8]}, SRCREV {srcrev[:12]} in history, RDEPENDS cover the "
        f"{len(project['dependencies'])} dependencies and the {len(needed)} packages edge's imports need, "
        f"{len(ptest)} ptest files"
    )


def full_imports_of(path: Path) -> set[str]:
    """Every module a file imports, by its full dotted name (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _module_level_imports(path: Path, module: str, is_package: bool) -> set[str]:
    """The dotted names a module imports unconditionally when it is imported: statements at its top level (not in a
    function, nor in a try that tolerates their absence), relative imports resolved."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)  # "from pkg import mod" loads pkg.mod
    return names


def stdlib_imports(site_packages: Path) -> dict[str, set[str]]:
    """Standard library modules an installed distribution loads when its public modules are imported (each -> the
    modules that import it). Public: no name part starting with an underscore, not a test; private modules count
    when a public one imports them."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in site_packages.rglob("*.py"):
        parts = path.relative_to(site_packages).with_suffix("").parts
        if any("." in part or "-" in part for part in parts):
            continue  # *.dist-info, *.data: not importable
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    def is_test(name: str) -> bool:
        return any(
            p in ("test", "tests", "testing", "conftest") or p.startswith("test_") or p.endswith("_test")
            for p in name.split(".")
        )

    todo = [m for m in modules if not is_test(m) and not any(p.startswith("_") for p in m.split("."))]
    seen: set[str] = set()
    found: dict[str, set[str]] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in modules)
        path, is_package = modules[name]
        for imported in _module_level_imports(path, name, is_package):
            if imported in modules:
                todo.append(imported)
            elif imported.split(".")[0] in sys.stdlib_module_names:
                found.setdefault(imported.split(".")[0], set()).add(name)
    return found


def check_fleet_split() -> str:
    """The fleet is its own package that no image installs, and the box's files never need it."""
    rv = bb_vars(RECIPE)
    problems = []
    if FLEET_PACKAGE not in rv.get("PACKAGES", "").split():
        problems.append(f"PACKAGES does not name {FLEET_PACKAGE}: the fleet would ship in ${{PN}}, on every box")
    if FLEET_FILES not in rv.get(f"FILES:{FLEET_PACKAGE}", "").split():
        problems.append(f"FILES:{FLEET_PACKAGE} is not {FLEET_FILES!r}")
    fleet_rdepends = set(rv.get(f"RDEPENDS:{FLEET_PACKAGE}", "").split())
    box_rdepends = set(rv.get("RDEPENDS:${PN}", "").split())
    if "${PN}" not in fleet_rdepends:
        problems.append(f"RDEPENDS:{FLEET_PACKAGE} does not name ${{PN}}: the fleet imports the box's base modules")

    fleet_files = sorted((ROOT / "edge" / "fleet").rglob("*.py"))
    if not fleet_files:
        problems.append("edge/fleet/ has no modules: nothing to split")
    for path in fleet_files:
        for name in imports_of(path) - {"edge"}:
            if name in sys.stdlib_module_names:
                pkg = STDLIB_PACKAGES.get(name)
                if pkg is None:
                    problems.append(f"{path.relative_to(ROOT)} imports {name}: add its OE package to STDLIB_PACKAGES")
                elif pkg not in box_rdepends | fleet_rdepends:
                    problems.append(f"{path.relative_to(ROOT)} imports {name}: {pkg} is in no RDEPENDS")
            elif name in IMPORT_DISTS:
                if DIST_RECIPES[IMPORT_DISTS[name]] not in box_rdepends:
                    problems.append(f"{path.relative_to(ROOT)} imports {name}, which RDEPENDS:${{PN}} lacks")
            elif name in FLEET_RECIPES:
                recipe = FLEET_RECIPES[name]
                if recipe is not None and recipe not in fleet_rdepends:
                    problems.append(f"{path.relative_to(ROOT)} imports {name}: RDEPENDS:{FLEET_PACKAGE} lacks {recipe}")
            else:
                problems.append(f"{path.relative_to(ROOT)} imports {name}, which no recipe provides")

    # What the box gets must not need the fleet: its modules, and the ptest files the box runs.
    box_files = [p for p in (ROOT / "edge").rglob("*.py") if "fleet" not in p.relative_to(ROOT / "edge").parts]
    ptest = [ROOT / "tests" / n for n in [*PTEST_HELPERS, *rv.get("EDGE_PTEST_FILES", "").split()]]
    for path in [*box_files, *(p for p in ptest if p.is_file())]:
        if any(n == "edge.fleet" or n.startswith("edge.fleet.") for n in full_imports_of(path)):
            problems.append(f"{path.relative_to(ROOT)} imports edge.fleet, which a box does not have")

    # No image may carry the fleet: what each image installs, through its packagegroups and every package's
    # RDEPENDS and RRECOMMENDS, alone and with each kas configuration's additions.
    closures = image_closures()
    for image, closure in closures.items():
        if FLEET_PACKAGE_NAME in closure:
            problems.append(f"{image} installs {FLEET_PACKAGE_NAME}: {' <- '.join(install_path(image, closure))}")
    if problems:
        raise CheckFailedError("\n".join(problems))
    sizes = ", ".join(f"{image}: {len(closure)}" for image, closure in closures.items())
    return (
        f"{FLEET_PACKAGE} holds edge/fleet ({len(fleet_files)} modules), in no image's install closure ({sizes} "
        f"packages); {len(box_files)} box modules and {len(ptest)} ptest files never import it"
    )


# ------------------------------------------------------------------------------------------------ what images install


def kas_configurations() -> dict[str, dict[str, Any]]:
    """The kas files that are configurations (they name a machine), merged as kas merges them."""
    configs = {}
    for path in sorted(KAS.glob("*.yml")):
        if kasfiles.is_lock_file(path):
            continue
        cfg = kasfiles.load(path, ROOT)
        if "machine" in cfg:
            configs[path.name] = cfg
    return configs


def local_conf(cfg: dict[str, Any]) -> str:
    return "\n".join(str(v) for v in (cfg.get("local_conf_header") or {}).values() if v)


def kas_installs(cfg: dict[str, Any]) -> set[str]:
    """What a kas configuration adds to every image (IMAGE_INSTALL or CORE_IMAGE_EXTRA_INSTALL in local.conf)."""
    names: set[str] = set()
    for m in re.finditer(
        r'^\s*(?:IMAGE_INSTALL|CORE_IMAGE_EXTRA_INSTALL)\S*\s*\S*=\s*"([^"]*)"', local_conf(cfg), re.M
    ):
        names.update(dependency_names(m.group(1)))
    return names


def by_package(recipes: Iterable[Recipe]) -> dict[str, Recipe]:
    return {pkg: recipe for recipe in recipes for pkg in recipe.packages}


def install_closure(roots: Iterable[str], recipes: list[Recipe]) -> dict[str, str]:
    """Every package installed with ``roots``, following the RDEPENDS and RRECOMMENDS of the layer's packages;
    each mapped to the package that pulled it in ("" for a root). Other layers' packages are leaves."""
    makers = by_package(recipes)
    pulled_by: dict[str, str] = {}
    todo = [(name, "") for name in roots]
    while todo:
        name, parent = todo.pop()
        if name in pulled_by:
            continue
        pulled_by[name] = parent
        if name in makers:
            todo.extend((dep, name) for dep in sorted(makers[name].runtime_deps(name)))
    return pulled_by


def builds_layer(cfg: dict[str, Any]) -> bool:
    """Whether a kas configuration has meta-edge in bblayers.conf (check-layer.yml leaves it out)."""
    layers = ((cfg.get("repos") or {}).get("edge") or {}).get("layers") or {}
    return layers.get(str(LAYER.relative_to(ROOT)), "") != "disabled"


def image_closures() -> dict[str, dict[str, str]]:
    """The install closure of each image recipe of the layer, alone and under each kas configuration."""
    recipes = layer_recipes(LAYER)
    closures = {}
    for image in (r for r in recipes if r.is_image):
        closures[image.pn] = install_closure(image.image_install(), recipes)
        for name, cfg in kas_configurations().items():
            if not builds_layer(cfg):
                continue
            closures[f"{image.pn} ({name})"] = install_closure(image.image_install() | kas_installs(cfg), recipes)
    return closures


def install_path(image: str, closure: dict[str, str]) -> list[str]:
    chain = [FLEET_PACKAGE_NAME]
    while closure.get(chain[-1]):
        chain.append(closure[chain[-1]])
    return [*chain, image]


def check_installed_files() -> str:
    sys.path.insert(0, str(ROOT))
    from edge.config import load_config  # noqa: PLC0415 -- the project's own loader, from this checkout

    rv = bb_vars(RECIPE)
    datadir = rv.get("EDGE_DATADIR", "")
    problems = []
    cfg = load_config(LAYER / "recipes-edge" / "edge" / "files" / "edge.toml")  # raises ConfigError on a bad key
    factory = {p.name for p in (ROOT / "edge" / "models").glob("*.onnx")}
    model = cfg.model.path
    if model is None or model.parent != Path("/usr/share/edge/models") or model.name not in factory:
        problems.append(f"edge.toml's model {model} is not a factory model under /usr/share/edge/models")
    if "${datadir}/edge/models" not in RECIPE.read_text(encoding="utf-8"):
        problems.append("the recipe installs no models under ${datadir}/edge/models")
    if str(cfg.device.data_dir) != datadir:
        problems.append(f"edge.toml's data_dir {cfg.device.data_dir} differs from EDGE_DATADIR {datadir!r}")
    unit = (ROOT / "edge" / "data" / "edge.service").read_text(encoding="utf-8")
    if f"ReadWritePaths={datadir}\n" not in unit:
        problems.append(f"the unit's ReadWritePaths is not EDGE_DATADIR {datadir!r}")

    # tmpfiles.d on a scratch root whose passwd and group hold the user the recipe creates.
    tmpfiles = LAYER / "recipes-edge" / "edge" / "files" / "edge-tmpfiles.conf"
    useradd = rv.get("USERADD_PARAM:${PN}", "")
    if "--gid edge" not in useradd or "--groups dialout,video" not in useradd or not useradd.endswith(" edge"):
        problems.append(f"USERADD_PARAM does not create user edge in group edge with dialout and video: {useradd!r}")
    tmpfiles_detail = "tmpfiles.d not applied (needs root)"
    if os.geteuid() == 0:
        with tempfile.TemporaryDirectory() as scratch:
            etc = Path(scratch) / "etc"
            etc.mkdir()
            (etc / "passwd").write_text(f"root:x:0:0::/root:/bin/sh\nedge:x:999:998::{datadir}:/sbin/nologin\n")
            (etc / "group").write_text("root:x:0:\nedge:x:998:\ndialout:x:20:edge\nvideo:x:44:edge\n")
            proc = run(["systemd-tmpfiles", f"--root={scratch}", "--create", str(tmpfiles)])
            made = Path(scratch) / datadir.lstrip("/")
            if proc.returncode != 0 or proc.stderr.strip():
                problems.append(f"systemd-tmpfiles: {proc.stderr.strip()} (exit {proc.returncode})")
            elif not made.is_dir():
                problems.append(f"tmpfiles.d did not create {datadir}")
            else:
                st = made.stat()
                if (st.st_uid, st.st_gid, st.st_mode & 0o7777) != (999, 998, 0o700):
                    problems.append(f"{datadir} is {st.st_uid}:{st.st_gid} {oct(st.st_mode & 0o7777)}, want edge 0700")
                tmpfiles_detail = f"tmpfiles.d makes {datadir} edge:edge 0700"

    # The layer's own unit (the service's unit is verified by tests/test_systemd.py).
    mount = LAYER / "recipes-core" / "edge-data-mount" / "files" / "data.mount"
    proc = run(["systemd-analyze", "verify", str(mount)])
    if proc.returncode != 0 or (proc.stdout + proc.stderr).strip():
        problems.append(f"systemd-analyze verify data.mount: {(proc.stdout + proc.stderr).strip()}")
    if problems:
        raise CheckFailedError("\n".join(problems))
    return f"edge.toml loads (model {model}), {tmpfiles_detail}, data.mount verifies"


def check_kas() -> str:
    import jsonschema  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    files = sorted(KAS.glob("*.yml"))
    if not files:
        raise CheckFailedError(f"no kas files in {KAS}")
    locks = [p for p in files if kasfiles.is_lock_file(p)]
    rules = "{extends: default, rules: {line-length: {max: 120}, truthy: {check-keys: false}}}"
    # kas lock writes no document start marker: lock files are checked in the layout kas gives them.
    lock_rules = rules.replace("truthy:", "document-start: disable, truthy:")
    for group, config in (([p for p in files if p not in locks], rules), (locks, lock_rules)):
        if not group:
            continue
        proc = run([tool("yamllint", "yamllint"), "--strict", "-f", "parsable", "-d", config, *map(str, group)])
        if proc.returncode != 0 or proc.stdout.strip():
            raise CheckFailedError(f"yamllint:\n{(proc.stdout + proc.stderr).strip()}")

    schema = json.loads((importlib.resources.files("kas") / "schema-kas.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for path in files:
        for error in validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8"))):
            where = "/".join(str(p) for p in error.absolute_path) or "<top>"
            problems.append(f"{path.name}: {where}: {error.message}")
    for path in locks:
        problems.extend(kasfiles.lock_format_problems(path))
    if problems:
        raise CheckFailedError("kas schema:\n" + "\n".join(problems))

    needs_systemd = any("systemd" in r.var("REQUIRED_DISTRO_FEATURES").split() for r in layer_recipes(LAYER))
    configs = kas_configurations()
    pinned: set[str] = set()
    for name, cfg in configs.items():
        repos = cfg.get("repos", {})
        for repo_name, entry in repos.items():
            repo = entry or {}
            url = repo.get("url") or ""
            if url and not (repo.get("branch") or repo.get("commit") or repo.get("tag")):
                problems.append(f"{name}: repository {repo_name} has neither branch, tag nor commit")
            if "refspec" in repo:
                problems.append(f"{name}: repository {repo_name} uses the deprecated refspec")
            # Elsewhere than the release-branch hosts, a branch moves and a collection name proves nothing (forks
            # reuse it): a commit says which layer a build used. The branch stays, for kas to check the commit.
            if url and not url.startswith(RELEASE_BRANCH_HOSTS):
                if not re.fullmatch(r"[0-9a-f]{40}", str(repo.get("commit") or "")) or not repo.get("branch"):
                    problems.append(
                        f"{name}: repository {repo_name} ({url}) is not pinned by a full commit on a branch "
                        f"(commit: in the kas file, or kas lock's {kasfiles.LOCKFILE_VERSION}+ lock file beside it)"
                    )
                else:
                    pinned.add(f"{repo_name}@{repo['commit'][:12]}")
            if not url:
                for layer, state in (repo.get("layers") or {}).items():
                    if state != "disabled" and not (ROOT / layer / "conf" / "layer.conf").is_file():
                        problems.append(f"{name}: local layer {layer} has no conf/layer.conf")
        if (repos.get("bitbake") or {}).get("layers", {}).get(".") != "disabled":
            problems.append(f"{name}: the bitbake repository must not be added as a layer (.: disabled)")
        for collection, (repo_name, layer) in COLLECTIONS.items():
            repo = repos.get(repo_name) or {}
            layers = repo.get("layers")
            provided = layers is None if layer == "." else (layers or {}).get(layer, "") != "disabled"
            if not repo.get("url") or not provided:
                problems.append(f"{name}: no repository provides layer collection {collection}")
        # meta-poky's poky.conf keeps SysVinit (POKY_INIT_MANAGER); oe-core's nodistro defaults to systemd.
        distro = cfg.get("distro", "nodistro")
        if (
            needs_systemd
            and distro != "nodistro"
            and not re.search(r'^\s*INIT_MANAGER\s*=\s*"systemd"', local_conf(cfg), re.M)
        ):
            problems.append(f'{name}: distro {distro} without INIT_MANAGER = "systemd", and the layer needs systemd')
        if "target" not in cfg:
            problems.append(f"{name}: no target")
    if problems:
        raise CheckFailedError("\n".join(problems))
    return (
        f"{len(files)} files ({len(locks)} lock): yamllint --strict clean, valid against kas's schema, "
        f"{len(configs)} configurations, pinned: {', '.join(sorted(pinned)) or 'none'}"
    )


def check_runtime_names() -> str:
    """Every run-time name the layer uses exists: a package of its own recipes, or one verified upstream."""
    recipes = layer_recipes(LAYER)
    own = set(by_package(recipes))
    problems = []
    used: dict[str, str] = {}
    for recipe in recipes:
        where = str(recipe.path.relative_to(LAYER))
        for pkg in recipe.packages:
            used.update((name, where) for name in recipe.runtime_deps(pkg))
        used.update((name, where) for name in recipe.image_install())
    for name, cfg in kas_configurations().items():
        used.update((pkg, name) for pkg in kas_installs(cfg))
    for name, where in sorted(used.items()):
        if "${" in name:
            problems.append(f"{where}: {name} is not expanded by the check (name the package)")
        elif name not in own and name not in EXTERNAL_NAMES:
            problems.append(
                f"{where}: nothing in the layers provides {name} (bitbake: Nothing RPROVIDES); if a dependency "
                f"layer has it in {RELEASE}, add it to EXTERNAL_PACKAGES"
            )
    if problems:
        raise CheckFailedError("\n".join(problems))
    return f"{len(used)} names: {len(set(used) & own)} made by the layer, {len(set(used) - own)} verified upstream"


def check_systemd_feature() -> str:
    """What ships a unit, or installs what does, requires the systemd distro feature, through features_check."""
    recipes = layer_recipes(LAYER)
    makers = by_package(recipes)
    problems = []
    for recipe in recipes:
        uses = [v for v in wrynose.FEATURES_CHECK_VARS if any(k.split(":")[0] == v for k in recipe.variables)]
        if uses and "features_check" not in recipe.classes:
            problems.append(f"{recipe.path.name} sets {', '.join(uses)} without inherit features_check")
    needs = {
        r.pn for r in recipes if "systemd" in r.classes or any(k.startswith("SYSTEMD_SERVICE") for k in r.variables)
    }
    changed = True
    while changed:  # whatever installs a package of a recipe that needs systemd needs it too
        changed = False
        for recipe in recipes:
            deps = recipe.image_install() if recipe.is_image else set()
            for pkg in recipe.packages:
                deps |= recipe.runtime_deps(pkg)
            if recipe.pn not in needs and any(d in makers and makers[d].pn in needs for d in deps):
                needs.add(recipe.pn)
                changed = True
    for recipe in recipes:
        if recipe.pn in needs:
            if "systemd" not in recipe.var("REQUIRED_DISTRO_FEATURES").split():
                problems.append(f'{recipe.path.name} needs systemd and lacks REQUIRED_DISTRO_FEATURES = "systemd"')
            elif "features_check" not in recipe.classes:
                problems.append(f"{recipe.path.name} sets REQUIRED_DISTRO_FEATURES without inherit features_check")
    if problems:
        raise CheckFailedError("\n".join(problems))
    return f"{len(needs)} recipes need systemd and require it: {', '.join(sorted(needs))}"


def wks_partitions(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("part ")]


def check_image() -> str:
    """WKS_FILE as wrynose finds it, and runqemu booting the kickstart's root, read-only if the image's root is."""
    bbpath = [
        Path(entry.replace("${LAYERDIR}", str(LAYER)))
        for entry in bb_vars(LAYER / "conf" / "layer.conf").get("BBPATH", "").split(":")
        if entry
    ]
    problems = []
    details = []
    for image in (r for r in layer_recipes(LAYER) if r.is_image):
        fstypes = " ".join(image.values("IMAGE_FSTYPES").values())
        if "wic" not in fstypes.split() and not re.search(r"\bwic\.", fstypes):
            continue
        wks_files = [*image.var("WKS_FILE").split(), f"{image.pn}.wks"]
        search = wrynose.wks_search_path(image.path.parent, bbpath)
        wks = wrynose.wks_find(wks_files, search)
        if wks is None:
            stale = [p for p in (LAYER / "wic" / n for n in wks_files) if p.is_file()]
            hint = f"; {stale[0].relative_to(LAYER)} is where walnascar looked, move it to files/wic/" if stale else ""
            problems.append(f"{image.path.name}: WKS_FILE {wks_files[0]} is not on {RELEASE}'s search path{hint}")
            continue
        parts = wks_partitions(wks)
        roots = [n for n, words in enumerate(parts, start=1) if len(words) > 1 and words[1] == "/"]
        if len(roots) != 1:
            problems.append(f"{wks.name}: {len(roots)} partitions mounted at /, expected one")
            continue
        read_only = "read-only-rootfs" in " ".join(image.values("IMAGE_FEATURES").values()).split()
        for name, value in image.values("QB_KERNEL_ROOT").items():
            cmdline = wrynose.runqemu_kernel_root(value)
            words = cmdline.removeprefix("root=").split()
            if words[0] != f"/dev/vda{roots[0]}":
                problems.append(f"{name} boots {words[0]}; the root partition of {wks.name} is /dev/vda{roots[0]}")
            if read_only and "ro" not in words:
                problems.append(f"{name} = {value!r}: runqemu boots `{cmdline}`, but the image's root is read-only")
            details.append(f"{name.split(':')[-1]} boots `{cmdline}`")
        details.insert(0, f"{image.pn}: {wks.relative_to(LAYER)} (partition {roots[0]} is /)")
    if problems:
        raise CheckFailedError("\n".join(problems))
    return ", ".join(details) or "no image builds wic"


def check_layer_scripts() -> str:
    """The scripts the layer ships itself (file:// sources) need no interpreter their recipe's RDEPENDS lack."""
    problems = []
    scripts = 0
    for recipe in layer_recipes(LAYER):
        rdepends: set[str] = set()
        for pkg in recipe.packages:
            rdepends |= recipe.runtime_deps(pkg)
        names = [
            u.removeprefix("file://").split(";")[0] for u in recipe.var("SRC_URI").split() if u.startswith("file:")
        ]
        with tempfile.TemporaryDirectory() as scratch:
            for name in names:
                for directory in (recipe.pn, f"{recipe.pn}-{recipe.pv}", "files"):
                    src = recipe.path.parent / directory / name
                    if src.is_file():
                        shutil.copy(src, Path(scratch) / Path(name).name)
                        os.chmod(Path(scratch) / Path(name).name, 0o755)  # as if installed executable
                        break
            scripts += sum(1 for _ in wrynose.executable_scripts(Path(scratch)))
            problems += [f"{recipe.path.name}: {p}" for p in wrynose.unmet_file_rdepends(Path(scratch), rdepends)]
    if problems:
        raise CheckFailedError("\n".join(problems))
    return f"{scripts} scripts of the layer, each run by an interpreter its recipe has"


def check_layer_static() -> str:
    """The tests of yocto-check-layer that need no build (scripts/lib/checklayer/cases/common.py and the
    yocto-check-layer class): what the networked job would otherwise be the first to report."""
    problems = [*wrynose.check_layer_readme(LAYER), *wrynose.check_layer_security(LAYER, ROOT)]
    for recipe in layer_recipes(LAYER):
        for name, value in recipe.variables.items():
            if re.fullmatch(r"do_\w+\[network\]", name) and value.strip() not in ("", "0"):
                problems.append(f"{recipe.path.name}: {name} = {value!r}: yocto-check-layer allows no network task")
            if name.split(":")[0] == "INSANE_SKIP":
                skipped = set(value.split()) & wrynose.CHECKLAYER_REQUIRED_TESTS
                if skipped:
                    problems.append(f"{recipe.path.name}: {name} skips required QA tests {sorted(skipped)}")
    patches = sorted(LAYER.rglob("*.patch"))
    for patch in patches:
        status = r"^Upstream-Status: (Pending|Submitted|Accepted|Backport|Denied|Inactive-Upstream|Inappropriate)"
        if not re.search(status, patch.read_text(encoding="utf-8", errors="replace"), re.M):
            problems.append(f"{patch.relative_to(LAYER)} has no valid Upstream-Status")
    if problems:
        raise CheckFailedError("\n".join(problems))
    readme = (LAYER / "README.md").read_text(encoding="utf-8")
    placeholder = [a for a in re.findall(r"[\w.+-]+@[\w.-]+", readme) if a.endswith(".invalid")]
    note = f" (the maintainer address {placeholder[0]} is a placeholder)" if placeholder else ""
    return f"README, SECURITY file, no network task, no skipped required QA test, {len(patches)} patches{note}"


# ------------------------------------------------------------------------------------------------ builds


def sources_digest(*parts: bytes) -> str:
    """A digest of the check's own sources, the tool pins and ``parts``: a success stamp is valid while it holds."""
    h = hashlib.sha256("\n".join(TOOL_PINS).encode())
    for path in CHECK_SOURCES:
        h.update(path.read_bytes())
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


def stamp_ok(name: str, digest: str) -> bool:
    stamp = CACHE / "ok" / name
    return stamp.is_file() and stamp.read_text().strip() == digest


def stamp_write(name: str, digest: str) -> None:
    (CACHE / "ok").mkdir(parents=True, exist_ok=True)
    (CACHE / "ok" / name).write_text(digest)


def check_wheel() -> str:
    files = tracked_files()
    digest = sources_digest(*(rel.encode() + b"\0" + (ROOT / rel).read_bytes() for rel in files))
    if stamp_ok("wheel", digest):
        return f"unchanged since the last successful build (tree {digest[:12]})"

    rv = bb_vars(RECIPE)
    python = pypi.tool_venv(CACHE, TOOLS)
    version = pypi.run([str(python), "-c", "import setuptools; print(setuptools.__version__)"]).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="edge-wheel-") as scratch:
        src = Path(scratch) / "src"
        for rel in files:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
        dist = Path(scratch) / "dist"
        # No isolation, as bitbake builds: [build-system].requires must be met by what is installed (the check fails
        # with "Missing dependencies" otherwise).
        failure = pypi.build_wheel(python, ["python_setuptools_build_meta"], src, dist, rv.get("PEP517_BUILD_OPTS", ""))
        if failure is not None:
            raise CheckFailedError(f"pyproject-build --no-isolation failed:\n{failure}")
        wheels = list(dist.glob("*.whl"))
        if len(wheels) != 1:
            raise CheckFailedError(f"expected one wheel, got {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as whl:
            names = whl.namelist()
            meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
            metadata = whl.read(meta).decode()
            entry_points = whl.read(meta.replace("METADATA", "entry_points.txt")).decode()
        destdir = Path(scratch) / "image"
        pypi.install_wheel(python, wheels[0], destdir)
        scripts = wrynose.unmet_file_rdepends(destdir, set(rv.get("RDEPENDS:${PN}", "").split()))
        command = destdir / "usr" / "bin" / "edge"
    problems = [f"edge: {p}" for p in scripts]
    native = [n for n in names if re.fullmatch(r"edge/_native\..*\.so", n)]
    if not native:
        problems.append("the wheel has no C extension edge/_native*.so")
    for needed in ("edge/models/digits-int8.onnx", "edge/data/edge.service", "edge/py.typed", "edge/fleet/__init__.py"):
        if needed not in names:
            problems.append(f"the wheel lacks {needed}")
    if "edge = edge.cli:main" not in entry_points:
        problems.append("the wheel has no 'edge' console script")
    if f"Name: {DIST_NAME}" not in metadata.splitlines():
        problems.append(f"the wheel's metadata does not name the distribution {DIST_NAME}")
    if "License-Expression: Apache-2.0" not in metadata:
        problems.append("the wheel's metadata has no License-Expression: Apache-2.0")
    if problems:
        raise CheckFailedError("\n".join(problems))
    stamp_write("wheel", digest)
    return (
        f"{wheels[0].name} with {native[0]} (setuptools {version}, no isolation, {len(files)} tracked files); "
        f"installed: /usr/bin/{command.name}, no script needs an interpreter RDEPENDS lacks"
    )


def pypi_recipes() -> list[Recipe]:
    return [r for r in layer_recipes(LAYER) if "pypi" in r.classes]


def check_pypi_recipe(recipe: Recipe, python: Path) -> list[str]:
    """One PyPI recipe as wrynose builds it: fetch, license checksums, sysroot, compile, install, file-rdeps."""
    pypi_package = recipe.var("PYPI_PACKAGE") or wrynose.pypi_package_default(recipe.pn)
    archive = wrynose.pypi_archive(pypi_package, recipe.pv, recipe.var("PYPI_PACKAGE_EXT") or "tar.gz")
    sdist = pypi.fetch_sdist(pypi_package, archive, recipe.var("SRC_URI[sha256sum]"), CACHE)
    problems = []
    with tempfile.TemporaryDirectory(prefix=f"{recipe.pn}-") as scratch:
        with tarfile.open(sdist) as tar:
            tar.extractall(scratch, filter="data")
        src = Path(scratch) / f"{pypi_package}-{recipe.pv}"  # pypi.bbclass: S = ${UNPACKDIR}/${PYPI_PACKAGE}-${PV}
        if not src.is_dir():
            return [f"{archive} does not unpack into S = {src.name}"]

        for url in recipe.var("LIC_FILES_CHKSUM").split():
            name, *params = url.removeprefix("file://").split(";")
            parm = dict(p.split("=", 1) for p in params)
            path = src / name
            if not path.is_file():
                problems.append(f"LIC_FILES_CHKSUM names {name}, which the sdist lacks")
                continue
            md5 = wrynose.license_md5(path, int(parm.get("beginline", 0)), int(parm.get("endline", 0)))
            if md5 != parm.get("md5"):
                problems.append(f"LIC_FILES_CHKSUM of {name}: md5 is {md5}, the recipe says {parm.get('md5')}")

        pyproject = src / "pyproject.toml"
        build_system = (
            tomllib.loads(pyproject.read_text(encoding="utf-8")).get("build-system", {}) if pyproject.is_file() else {}
        )
        natives: set[str] = set()
        for klass in recipe.classes:
            natives |= wrynose.CLASS_NATIVES.get(klass, set())
        natives |= {d.removesuffix("-native") for d in recipe.var("DEPENDS").split() if d.endswith("-native")}
        for requirement in build_system.get("requires", []):
            if wrynose.recipe_for_requirement(requirement) not in natives:
                problems.append(
                    f"[build-system] requires {requirement!r}: {wrynose.recipe_for_requirement(requirement)}-native "
                    "is not in the recipe's sysroot (its class or DEPENDS)"
                )
        if "setuptools3" in recipe.classes and build_system.get("build-backend"):
            problems.append(
                f"setuptools3 with a pyproject build-backend {build_system['build-backend']!r} (pep517-backend)"
            )

        dist = Path(scratch) / "dist"
        options = recipe.var("SETUPTOOLS_BUILD_ARGS" if "setuptools3" in recipe.classes else "PEP517_BUILD_OPTS")
        failure = pypi.build_wheel(python, recipe.classes, src, dist, options)
        if failure is not None:
            hint = ""
            if "Missing dependencies" in failure:
                hint = ' (a pinned backend newer than wrynose\'s: PEP517_BUILD_OPTS = "--skip-dependency-check")'
            return [*problems, f"do_compile fails{hint}:\n{failure}"]
        wheels = sorted(dist.glob("*.whl"))
        if len(wheels) != 1:
            return [*problems, f"do_compile made {len(wheels)} wheels, do_install wants one"]
        destdir = Path(scratch) / "image"
        site_packages = pypi.install_wheel(python, wheels[0], destdir)
        problems += pypi.apply_removals(recipe.shell.get("do_install:append", ""), destdir, site_packages)
        problems += wrynose.unmet_file_rdepends(destdir, recipe.runtime_deps(recipe.pn))
        # What the package imports from the standard library must be installed with it: OE splits the library into
        # packages (python3-shell has shlex), and an image installs only what RDEPENDS pull in.
        # setuptools3-base.bbclass (which python_pep517 inherits) adds python3-core to RDEPENDS of every target recipe.
        closure = {*install_closure([recipe.pn], layer_recipes(LAYER)), "python3-core"}
        for module, importers in sorted(stdlib_imports(site_packages).items()):
            if module in BUILTIN_MODULES:
                continue
            package = STDLIB_PACKAGES.get(module)
            if package is None:
                problems.append(f"imports {module}: add its OE package to STDLIB_PACKAGES (tools/yocto/check.py)")
            elif package not in closure:
                problems.append(
                    f"{sorted(importers)[0]} imports {module}, and {package} is not in RDEPENDS (nor pulled in by them)"
                )
    return problems


def check_pypi() -> str:
    recipes = pypi_recipes()
    if not recipes:
        return "no pypi recipes"
    python: Path | None = None
    problems = []
    done = []
    for recipe in recipes:
        digest = sources_digest(recipe.path.read_bytes())
        if stamp_ok(recipe.pn, digest):
            done.append(f"{recipe.pn} (unchanged)")
            continue
        python = python or pypi.tool_venv(CACHE, TOOLS)
        try:
            found = check_pypi_recipe(recipe, python)
        except pypi.ToolError as e:
            found = [str(e)]
        if found:
            problems += [f"{recipe.path.name}: {p}" for p in found]
        else:
            stamp_write(recipe.pn, digest)
            done.append(recipe.pn)
    if problems:
        raise CheckFailedError("\n".join(problems))
    return f"{len(recipes)} recipes fetch, build with {RELEASE}'s tools and install clean: {', '.join(done)}"


def check_layer_python() -> str:
    ruff = [sys.executable, "-m", "ruff"]
    problems = []
    for cmd in ([*ruff, "check", "yocto"], [*ruff, "format", "--check", "yocto"]):
        proc = run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            problems.append(f"{' '.join(cmd[2:])}:\n{(proc.stdout + proc.stderr).strip()}")
    if problems:
        raise CheckFailedError("\n".join(problems))
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "yocto").rglob("*.py"))
    return f"ruff check and format clean: {', '.join(files)}"


CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("layer conventions", check_layer),
    ("oelint-adv", check_oelint),
    ("recipe vs project", check_recipe_against_project),
    ("fleet package split", check_fleet_split),
    ("run-time names", check_runtime_names),
    ("systemd feature", check_systemd_feature),
    ("image", check_image),
    ("installed files", check_installed_files),
    ("layer scripts", check_layer_scripts),
    ("kas files", check_kas),
    ("yocto-check-layer, static", check_layer_static),
    ("wheel, no isolation", check_wheel),
    ("pypi recipes", check_pypi),
    ("layer python", check_layer_python),
]


def main() -> int:
    failed = 0
    start = time.monotonic()
    for name, check in CHECKS:
        t0 = time.monotonic()
        try:
            detail = check()
        except Exception as e:  # a check that crashes has failed too: report it with the others, keep going
            failed += 1
            print(f"FAIL {name} ({time.monotonic() - t0:.1f} s):")
            message = str(e) if isinstance(e, CheckFailedError) else f"{type(e).__name__}: {e}"
            for line in message.splitlines():
                print(f"     {line}")
        else:
            print(f"ok   {name} ({time.monotonic() - t0:.1f} s): {detail}")
    verdict = "all passed" if not failed else f"{failed} failed"
    print(f"check-yocto: {len(CHECKS)} checks, {verdict} in {time.monotonic() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

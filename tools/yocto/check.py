"""Offline checks of the Yocto layer (yocto/meta-edge) and its kas files: ``make check-yocto``.

A bitbake build needs the network and hours; these checks need neither and catch what such a build would trip on
first, or what it would let through silently (a dependency the image lacks, a model path nothing installs):

- layer.conf: the collection, its dependencies and LAYERSERIES_COMPAT for wrynose.
- oelint-adv ``--release wrynose`` on every recipe, class and conf file: no finding of any severity. The homepage
  ping needs the network and is suppressed; so is BUGTRACKER, which the project does not have yet.
- The edge recipe against the project it builds: the version, the LICENSE checksum, SRCREV a commit of this
  repository, every pyproject dependency and every standard library module that edge imports mapped to an
  RDEPENDS entry, the unit installed from the package (no copy in the layer), the ptest files present and
  importable on the box.
- The fleet split: edge/fleet/ is the edge-fleet package (PACKAGES, FILES), which no image or packagegroup of the
  layer installs; the box's modules and its ptest files never import it; the fleet's own imports are in its RDEPENDS.
- The files the image installs: edge.toml loads with edge's own loader and names the installed factory model and
  the data directory; tmpfiles.d creates that directory with the service's user and mode (systemd-tmpfiles on a
  scratch root); data.mount passes ``systemd-analyze verify`` without a warning.
- The kas files: yamllint --strict, JSON-schema validation against kas's own schema, includes that resolve, every
  remote repository on a branch, every layer the meta-edge layer depends on provided by a repository.
- The wheel: built without build isolation with the setuptools wrynose ships (82.0.1), from a copy of the tracked
  files, and it contains the C extension, the factory model, the unit and edge/fleet (for the split), under the
  distribution name n3-edge. The tool venv is cached in .cache/yocto/
  and the wheel check is skipped while the tracked files and the pins are unchanged since the last success.
- ruff on the layer's Python (the oeqa test and its helper).

Prints every check and its result; exits 1 if any check found something. Nothing is written to the repository
outside .cache/yocto/.
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
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "yocto" / "meta-edge"
KAS = ROOT / "yocto" / "kas"
RECIPE = LAYER / "recipes-edge" / "edge" / "edge_git.bb"
CACHE = ROOT / ".cache" / "yocto"
RELEASE = "wrynose"
# The distribution's name on PyPI (the import package stays edge): "edge" there is an unrelated, older project.
DIST_NAME = "n3-edge"
# The tool versions the wheel check uses: setuptools as python3-setuptools in openembedded-core wrynose, build to run
# the PEP 517 backend the way python_pep517.bbclass does (python -m build --no-isolation).
WHEEL_PINS = ("setuptools==82.0.1", "build==1.6.1")
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
# The fleet's own third-party imports -> the recipe that provides them; None: optional, loaded only when configured
# (psycopg for a postgresql:// store; segno for `claims create --qr`, which says what to install), and documented.
FLEET_RECIPES: dict[str, str | None] = {
    "prometheus_client": "python3-prometheus-client",
    "psycopg": None,
    "segno": None,
}
FLEET_PACKAGE = "${PN}-fleet"
FLEET_FILES = "${PYTHON_SITEPACKAGES_DIR}/edge/fleet"
# Standard library module -> the OE package that ships it (openembedded-core's python3-manifest.json). A module
# missing here stops the check: look it up in the manifest, add it, and add the package to RDEPENDS.
_PACKAGE_MODULES = {
    "python3-core": "__future__ abc argparse ast atexit binascii bisect builtins codecs collections contextlib copy "
    "copyreg csv dataclasses enum errno fcntl fnmatch functools gc getopt gettext glob grp heapq importlib inspect io "
    "ipaddress itertools keyword linecache locale math operator os pathlib platform posix pwd re reprlib select "
    "selectors shutil signal site stat struct subprocess sys sysconfig textwrap threading time tokenize traceback "
    "types typing warnings weakref zlib",
    "python3-asyncio": "asyncio concurrent",
    "python3-compression": "gzip tarfile zipfile",
    "python3-crypt": "hashlib",
    "python3-datetime": "calendar datetime",
    "python3-difflib": "difflib",
    "python3-io": "socket ssl tempfile termios",
    "python3-json": "json",
    "python3-logging": "logging",
    "python3-math": "cmath random",
    "python3-netclient": "base64 hmac http secrets uuid",
    "python3-numbers": "contextvars decimal fractions numbers",
    "python3-pprint": "pprint",
    "python3-shell": "shlex",
    "python3-sqlite3": "sqlite3",
    "python3-stringold": "string",
    "python3-threading": "queue",
    "python3-tomllib": "tomllib",
}
STDLIB_PACKAGES = {module: pkg for pkg, modules in _PACKAGE_MODULES.items() for module in modules.split()}
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


class CheckFailedError(Exception):
    """A check failed; the message says what and where."""


# ------------------------------------------------------------------------------------------------ helpers


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def bb_vars(path: Path) -> dict[str, str]:
    """Assignments of a recipe or conf file (continuation lines joined), name -> value; ``+=`` appends."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r'^([A-Za-z0-9_:${}./-]+)\s*(\?\?=|\?=|:=|\+=|\.=|=\+|=\.|=)\s*"(.*)"\s*$', line)
        if m:
            name, op, value = m.groups()
            value = " ".join(value.split())
            if op in ("+=", ".="):
                out[name] = f"{out.get(name, '')} {value}".strip()
            elif op in ("=+", "=."):
                out[name] = f"{value} {out.get(name, '')}".strip()
            else:
                out[name] = value
    return out


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
            elif name in NOT_ON_THE_BOX:
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

    # No recipe of the layer but edge's own may pull the fleet package into an image.
    installers = 0
    for recipe in sorted(LAYER.rglob("*.bb")):
        if recipe == RECIPE:
            continue
        for name, value in bb_vars(recipe).items():
            if name.startswith(("IMAGE_INSTALL", "RDEPENDS", "RRECOMMENDS", "CORE_IMAGE_EXTRA_INSTALL")):
                installers += 1
                if "edge-fleet" in value.split():
                    problems.append(f"{recipe.relative_to(LAYER)}: {name} installs edge-fleet on a box")
    if problems:
        raise CheckFailedError("\n".join(problems))
    return (
        f"{FLEET_PACKAGE} holds edge/fleet ({len(fleet_files)} modules), which none of the layer's {installers} "
        f"install lists names; {len(box_files)} box modules and {len(ptest)} ptest files never import it"
    )


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
    if "--gid edge" not in useradd or "--groups dialout" not in useradd or not useradd.endswith(" edge"):
        problems.append(f"USERADD_PARAM does not create user edge in group edge with dialout: {useradd!r}")
    tmpfiles_detail = "tmpfiles.d not applied (needs root)"
    if os.geteuid() == 0:
        with tempfile.TemporaryDirectory() as scratch:
            etc = Path(scratch) / "etc"
            etc.mkdir()
            (etc / "passwd").write_text(f"root:x:0:0::/root:/bin/sh\nedge:x:999:998::{datadir}:/sbin/nologin\n")
            (etc / "group").write_text("root:x:0:\nedge:x:998:\ndialout:x:20:edge\n")
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


def kas_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """kas's include semantics: mappings merge recursively, the including file wins."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = kas_merge(out[key], value)
        else:
            out[key] = value
    return out


def kas_load(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    import yaml  # noqa: PLC0415 -- a dev dependency of this check only

    if path in seen:
        raise CheckFailedError(f"include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    merged: dict[str, Any] = {}
    for inc in data.get("header", {}).get("includes", []):
        if not isinstance(inc, str):
            raise CheckFailedError(f"{path.name}: includes from other repositories are not checked offline: {inc}")
        target = ROOT / inc  # relative to the repository root, as kas resolves it
        if not target.is_file():
            raise CheckFailedError(f"{path.name} includes {inc}, which does not exist")
        merged = kas_merge(merged, kas_load(target, (*seen, path)))
    return kas_merge(merged, data)


def check_kas() -> str:
    import jsonschema  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    files = sorted(KAS.glob("*.yml"))
    if not files:
        raise CheckFailedError(f"no kas files in {KAS}")
    rules = "{extends: default, rules: {line-length: {max: 120}, truthy: {check-keys: false}}}"
    proc = run([tool("yamllint", "yamllint"), "--strict", "-f", "parsable", "-d", rules, *map(str, files)])
    if proc.returncode != 0 or proc.stdout.strip():
        raise CheckFailedError(f"yamllint:\n{(proc.stdout + proc.stderr).strip()}")

    schema = json.loads((importlib.resources.files("kas") / "schema-kas.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for path in files:
        for error in validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8"))):
            where = "/".join(str(p) for p in error.absolute_path) or "<top>"
            problems.append(f"{path.name}: {where}: {error.message}")
    if problems:
        raise CheckFailedError("kas schema:\n" + "\n".join(problems))

    configs = 0
    for path in files:
        cfg = kas_load(path)
        if "machine" not in cfg:
            continue  # an include, not a configuration
        configs += 1
        repos = cfg.get("repos", {})
        for name, entry in repos.items():
            repo = entry or {}
            if repo.get("url") and not (repo.get("branch") or repo.get("commit") or repo.get("tag")):
                problems.append(f"{path.name}: repository {name} has neither branch, tag nor commit")
            if "refspec" in repo:
                problems.append(f"{path.name}: repository {name} uses the deprecated refspec")
            if not repo.get("url"):
                for layer in repo.get("layers") or {}:
                    if not (ROOT / layer / "conf" / "layer.conf").is_file():
                        problems.append(f"{path.name}: local layer {layer} has no conf/layer.conf")
        if (repos.get("bitbake") or {}).get("layers", {}).get(".") != "disabled":
            problems.append(f"{path.name}: the bitbake repository must not be added as a layer (.: disabled)")
        for collection, (repo_name, layer) in COLLECTIONS.items():
            repo = repos.get(repo_name) or {}
            layers = repo.get("layers")
            provided = layers is None if layer == "." else layer in (layers or {})
            if not repo.get("url") or not provided:
                problems.append(f"{path.name}: no repository provides layer collection {collection}")
        if "target" not in cfg:
            problems.append(f"{path.name}: no target")
    if problems:
        raise CheckFailedError("\n".join(problems))
    return f"{len(files)} files: yamllint --strict clean, valid against kas's schema, {configs} configurations"


def tree_digest(files: list[str]) -> str:
    h = hashlib.sha256("\n".join(WHEEL_PINS).encode())
    for rel in files:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()


def check_wheel() -> str:
    files = tracked_files()
    digest = tree_digest(files)
    stamp = CACHE / "wheel-ok"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return f"unchanged since the last successful build (tree {digest[:12]}, {', '.join(WHEEL_PINS)})"

    venv = CACHE / "venv-wrynose"
    python = venv / "bin" / "python"
    pins_file = venv / "pins"
    if not python.exists() or not pins_file.is_file() or pins_file.read_text() != "\n".join(WHEEL_PINS):
        shutil.rmtree(venv, ignore_errors=True)
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *WHEEL_PINS],
        ):
            proc = run(cmd)
            if proc.returncode != 0:
                raise CheckFailedError(f"{' '.join(cmd)}:\n{proc.stdout}{proc.stderr}")
        pins_file.write_text("\n".join(WHEEL_PINS))
    version = run([str(python), "-c", "import setuptools; print(setuptools.__version__)"]).stdout.strip()
    if f"setuptools=={version}" not in WHEEL_PINS:
        raise CheckFailedError(f"the wheel venv has setuptools {version}, not the pinned one")

    with tempfile.TemporaryDirectory(prefix="edge-wheel-") as scratch:
        src = Path(scratch) / "src"
        for rel in files:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
        dist = Path(scratch) / "dist"
        # No isolation, as bitbake builds: [build-system].requires must be met by what is installed (the check fails
        # with "Missing dependencies" otherwise). No compiler cache, no user site.
        env = {**os.environ, "PYTHONNOUSERSITE": "1", "PIP_NO_INDEX": "1"}
        proc = run([str(python), "-m", "build", "--no-isolation", "--wheel", "--outdir", str(dist), str(src)], env=env)
        if proc.returncode != 0:
            raise CheckFailedError(
                f"python -m build --no-isolation failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        wheels = list(dist.glob("*.whl"))
        if len(wheels) != 1:
            raise CheckFailedError(f"expected one wheel, got {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as whl:
            names = whl.namelist()
            meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
            metadata = whl.read(meta).decode()
            entry_points = whl.read(meta.replace("METADATA", "entry_points.txt")).decode()
    problems = []
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
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest)
    return f"{wheels[0].name} with {native[0]} (setuptools {version}, no isolation, {len(files)} tracked files)"


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
    ("installed files", check_installed_files),
    ("kas files", check_kas),
    ("wheel, no isolation", check_wheel),
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

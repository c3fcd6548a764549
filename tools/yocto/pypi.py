"""The I/O of the Python build checks: sdists from PyPI, the venv with wrynose's tools, a build and an install.

Each step does what the wrynose class does in its task (wrynose.py names the source), on the host:

- the sdist a pypi recipe fetches, looked up by its exact file name in PyPI's simple index and checked against the
  recipe's sha256 (do_fetch);
- a wheel built without isolation by the class's command with the recipe's options (do_compile);
- that wheel installed with pypa/installer into a scratch ${D} (do_install).

Cache under .cache/yocto/: ``sdists/`` (checked against the recipe's sha256 on every use), ``pip/`` (pip's
downloads for the tool venv), ``venv-wrynose/`` (the tool venv; its ``pins`` file records what it holds).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import wrynose

SIMPLE_INDEX = "https://pypi.org/simple/{}/"
TIMEOUT_S = 60
# What the build sees of the host: no user site, no index (without isolation nothing may be fetched; bitbake's
# builds have no network in do_compile).
BUILD_ENV = {"PYTHONNOUSERSITE": "1", "PIP_NO_INDEX": "1", "SOURCE_DATE_EPOCH": "1700000000"}


class ToolError(Exception):
    """Fetching an sdist or preparing the tool venv failed: what, and the command's output."""


def run(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sdist_index(project: str) -> dict[str, dict[str, Any]]:
    """PyPI's files of ``project`` by file name (the simple index, JSON form): url and hashes of each."""
    normalized = re.sub(r"[-_.]+", "-", project).lower()
    request = urllib.request.Request(
        SIMPLE_INDEX.format(normalized), headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            index = json.load(response)
    except OSError as e:
        raise ToolError(f"PyPI's index of {normalized}: {e}") from e
    return {f["filename"]: f for f in index.get("files", [])}


def fetch_sdist(project: str, archive: str, sha256: str, cache: Path) -> Path:
    """The sdist ``archive`` of ``project`` from the cache, else from PyPI; its sha256 must be the recipe's."""
    target = cache / "sdists" / archive
    if target.is_file() and _sha256(target) == sha256:
        return target
    files = sdist_index(project)
    if archive not in files:
        sdists = sorted(n for n in files if n.endswith(".tar.gz"))[-5:]
        raise ToolError(f"PyPI has no {archive} (do_fetch would fail); some of its sdists: {sdists}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        try:
            with urllib.request.urlopen(files[archive]["url"], timeout=TIMEOUT_S) as response:
                shutil.copyfileobj(response, tmp)
        except OSError as e:
            os.unlink(tmp.name)
            raise ToolError(f"downloading {archive}: {e}") from e
    got = _sha256(Path(tmp.name))
    if got != sha256:
        os.unlink(tmp.name)
        raise ToolError(f"{archive} has sha256 {got}, the recipe's SRC_URI[sha256sum] is {sha256}")
    os.replace(tmp.name, target)
    return target


def verify_tools(tools: Iterable[wrynose.Tool]) -> None:
    """Each pinned tool is the version its wrynose recipe fetches: PyPI's sdist of it has the recipe's sha256."""
    wrong = []
    for tool in tools:
        listed = sdist_index(tool.pypi_package).get(tool.sdist, {}).get("hashes", {}).get("sha256")
        if listed != tool.sha256:
            wrong.append(f"{tool.requirement}: PyPI's {tool.sdist} has sha256 {listed}, wrynose's recipe {tool.sha256}")
    if wrong:
        raise ToolError("pins that are not what wrynose ships:\n" + "\n".join(wrong))


def tool_venv(cache: Path, tools: Sequence[wrynose.Tool]) -> Path:
    """The venv with exactly ``tools`` (no other distributions but pip), made once they are verified to be
    wrynose's; returns its python."""
    venv = cache / "venv-wrynose"
    python = venv / "bin" / "python"
    pins_file = venv / "pins"
    pins = sorted(t.requirement for t in tools)
    wanted = "\n".join(pins)
    if python.exists() and pins_file.is_file() and pins_file.read_text() == wanted:
        return python
    verify_tools(tools)
    shutil.rmtree(venv, ignore_errors=True)
    env = {**os.environ, "PIP_CACHE_DIR": str(cache / "pip"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for cmd in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--only-binary", ":all:", *pins],
        [str(python), "-m", "pip", "check"],
    ):
        proc = run(cmd, env=env)
        if proc.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise ToolError(f"{' '.join(cmd)}:\n{proc.stdout}{proc.stderr}")
    pins_file.write_text(wanted)
    return python


def build_wheel(python: Path, classes: Sequence[str], src: Path, outdir: Path, options: str) -> str | None:
    """do_compile of the recipe's class: None when a wheel was built, else the failure's output (its tail)."""
    env = {**os.environ, **BUILD_ENV}
    if "setuptools3" in classes:
        cmd = [str(python), "setup.py", "--verbose", "build", "bdist_wheel", "--dist-dir", str(outdir)]
    else:
        cmd = [str(python.parent / "pyproject-build"), "--no-isolation", "--wheel", "--outdir", str(outdir), str(src)]
    proc = run([*cmd, *shlex.split(options)], cwd=src, env=env)
    if proc.returncode != 0:
        return (proc.stdout[-2000:] + proc.stderr[-2000:]).strip()
    return None


# pypa/installer 0.7.0 as wrynose patches it (python3-installer/interpreter.patch): an --interpreter option, and
# the shebang of a generated script is "#!" + that interpreter, as given (upstream would wrap "/usr/bin/env python3",
# which has a space, in a /bin/sh trampoline).
_PATCHED_INSTALLER = """
import sys
import installer.__main__
import installer.scripts

installer.scripts._build_shebang = lambda executable, forlauncher: b"#!" + executable.encode("utf-8")
sys.executable = sys.argv[1]
installer.__main__._main(sys.argv[2:], "python -m installer")
"""


def install_wheel(python: Path, wheel: Path, destdir: Path) -> Path:
    """do_install of python_pep517.bbclass into ``destdir``; returns ${D}${PYTHON_SITEPACKAGES_DIR}."""
    args = ["--no-compile-bytecode", "--prefix=/usr", f"--destdir={destdir}", str(wheel)]
    proc = run([str(python), "-c", _PATCHED_INSTALLER, wrynose.INSTALL_INTERPRETER, *args])
    if proc.returncode != 0:
        raise ToolError(f"installer: {proc.stdout}{proc.stderr}")
    found = sorted(destdir.glob("usr/lib*/python3*/site-packages"))
    if len(found) != 1:
        raise ToolError(f"installer put no single site-packages under {destdir}: {found}")
    return found[0]


def apply_removals(body: str, destdir: Path, site_packages: Path) -> list[str]:
    """The ``rm`` commands of a do_install:append on the scratch ${D}, as the task would run them. Any other
    command is reported, not guessed at; so is an ``rm`` without -f of a path that does not exist (the task fails)."""
    variables = {
        "D": str(destdir),
        "PYTHON_SITEPACKAGES_DIR": "/" + str(site_packages.relative_to(destdir)),
        "prefix": "/usr",
        "bindir": "/usr/bin",
        "datadir": "/usr/share",
        "libdir": "/usr/lib",
    }
    problems = []
    for raw in body.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        if words[0] != "rm":
            problems.append(f"do_install:append: {line!r} is not modelled by the check (only rm is)")
            continue
        flags = "".join(w.lstrip("-") for w in words[1:] if w.startswith("-"))
        for word in (w for w in words[1:] if not w.startswith("-")):
            unknown = [v for v in re.findall(r"\$\{([^}]+)\}", word) if v not in variables]
            if unknown:
                problems.append(f"do_install:append: {line!r}: ${{{unknown[0]}}} is not modelled")
                continue
            path = Path(re.sub(r"\$\{([^}]+)\}", lambda m: variables[m.group(1)], word))
            if destdir.resolve() not in path.resolve().parents:
                problems.append(f"do_install:append: {line!r} removes outside ${{D}}")
            elif path.is_dir() and not path.is_symlink():
                if "r" not in flags:
                    problems.append(f"do_install:append: {line!r}: a directory, and rm has no -r (the task fails)")
                else:
                    shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            elif "f" not in flags:
                problems.append(f"do_install:append: {line!r}: no such file in the installed wheel (the task fails)")
    return problems

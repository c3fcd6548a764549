"""The import rules of the three rooms: the box, the contract (``edge.wire``) and the fleet (``edge.fleet``).

An AST walk over every module of ``edge/`` (imports inside functions count: a lazy import is still a dependency)
builds the import graph and checks it:

- ``edge.wire`` imports only the standard library, cbor2, cryptography, numpy and the base modules named below;
- nothing outside ``edge.fleet`` imports ``edge.fleet`` (``edge.cli`` loads it by name where it is installed);
- ``edge.fleet`` never imports the box's uplink or updater (``edge.telemetry``, ``edge.ota``), its service or CLI;
- exactly one module imports paho (``edge.mqtt``);
- there is no import cycle anywhere in ``edge/``.

The rules are tested on purpose-made violations too, so a broken walker cannot pass an empty graph.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "edge"

# What the contract may build on: the base modules every side shares.
WIRE_MAY_IMPORT = ("edge.wire", "edge.errors", "edge.identity", "edge.arrays")
WIRE_THIRD_PARTY = {"cbor2", "cryptography", "numpy"}
# Sans-IO: the contract takes bytes and a time and returns values; files, sockets, processes, threads and clocks
# belong to the sides that use it.
WIRE_NO_IO = {
    "os",
    "pathlib",
    "shutil",
    "tempfile",
    "socket",
    "ssl",
    "select",
    "selectors",
    "subprocess",
    "sqlite3",
    "threading",
    "asyncio",
    "urllib",
    "http",
    "time",
    "signal",
    "mmap",
}
# What the fleet may not touch: the box's own rooms.
FLEET_MAY_NOT_IMPORT = ("edge.telemetry", "edge.ota", "edge.service", "edge.pipeline", "edge.commands", "edge.sinks")
PAHO_MODULE = "edge.mqtt"


def module_name(path: Path, root: Path) -> str:
    """The dotted module name of a file under ``root`` (whose own name is the top package)."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, known: Iterable[str]) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from pkg import mod`` counts ``pkg.mod`` where it exists)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known)
    found.discard(name)  # a package's `from pkg import submodule` names the package itself
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules it imports, for every ``*.py`` under ``root``."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {name: imports_of(path, name, files) for name, path in files.items()}


def within(module: str, packages: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``packages`` or inside one."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Every broken import rule, one line each."""
    found: list[str] = []
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            top = dep.partition(".")[0]
            if within(mod, ["edge.wire"]):
                if top == "edge" and not within(dep, WIRE_MAY_IMPORT):
                    found.append(f"{mod} -> {dep}: the contract imports neither side")
                elif top != "edge" and top not in stdlib and top not in WIRE_THIRD_PARTY:
                    found.append(f"{mod} -> {dep}: the contract is sans-IO ({top} is not allowed)")
                elif top in WIRE_NO_IO:
                    found.append(f"{mod} -> {dep}: the contract is sans-IO ({top} does I/O)")
            if within(dep, ["edge.fleet"]) and not within(mod, ["edge.fleet"]):
                found.append(f"{mod} -> {dep}: the box never imports the fleet")
            if within(mod, ["edge.fleet"]) and within(dep, FLEET_MAY_NOT_IMPORT):
                found.append(f"{mod} -> {dep}: the fleet uses edge.wire and edge.mqtt, not the box's modules")
            if top == "paho" and mod != PAHO_MODULE:
                found.append(f"{mod} -> {dep}: only {PAHO_MODULE} imports paho")
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import cycles among the graph's own modules (strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_the_walk_sees_the_tree(graph) -> None:
    assert {"edge.cli", "edge.mqtt", "edge.wire.envelope", "edge.fleet.gateway", "edge.fleet.store"} <= set(graph)
    assert "edge.wire.cose" in graph["edge.wire.envelope"]
    assert "edge.fleet.store.types" in graph["edge.fleet.store"]


def test_import_rules_hold(graph) -> None:
    assert violations(graph) == []


def test_no_import_cycles(graph) -> None:
    assert cycles(graph) == []


def test_exactly_one_module_imports_paho(graph) -> None:
    assert [m for m, deps in graph.items() if any(d.partition(".")[0] == "paho" for d in deps)] == [PAHO_MODULE]


def test_cli_loads_the_fleet_only_by_name(graph) -> None:
    # edge.cli may name edge.fleet.cli in a string for importlib, never import it: a box without the fleet must run.
    assert not any(within(d, ["edge.fleet"]) for d in graph["edge.cli"])
    assert '"edge.fleet.cli"' in (ROOT / "cli.py").read_text()


# -- the checker catches what it must --------------------------------------------------------------------------------


def write_tree(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / "edge"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({"telemetry/x.py": "from edge.fleet.store import open_store\n", "fleet/store.py": ""}, "never imports"),
        ({"wire/x.py": "import edge.telemetry.outbox\n", "telemetry/outbox.py": ""}, "imports neither side"),
        ({"wire/x.py": "def f():\n    import sqlite3, requests\n"}, "requests is not allowed"),
        ({"wire/x.py": "from pathlib import Path\n"}, "pathlib does I/O"),
        ({"fleet/x.py": "from edge.ota.clock import base_time\n"}, "not the box's modules"),
        ({"telemetry/x.py": "import paho.mqtt.client as mqtt\n"}, "only edge.mqtt imports paho"),
        ({"fleet/cli/x.py": "from ...telemetry import outbox\n", "telemetry/outbox.py": ""}, "not the box's modules"),
    ],
)
def test_violations_are_found(tmp_path, files, needle) -> None:
    found = violations(import_graph(write_tree(tmp_path, files)))
    assert any(needle in line for line in found), found


def test_cycles_are_found(tmp_path) -> None:
    root = write_tree(
        tmp_path,
        {"a.py": "from edge import b\n", "b.py": "def f():\n    from edge.c import x\n", "c.py": "import edge.a\n"},
    )
    assert cycles(import_graph(root)) == [["edge.a", "edge.b", "edge.c"]]


# -- the box without the fleet, as an image installs it -------------------------------------------------------------


def box_only_copy(tmp_path: Path) -> Path:
    """The package as the box image installs it: everything but edge/fleet (C extension and models included)."""
    import shutil  # noqa: PLC0415

    site = tmp_path / "site"
    shutil.copytree(ROOT, site / "edge", ignore=shutil.ignore_patterns("fleet", "__pycache__"))
    assert not (site / "edge" / "fleet").exists()
    return site


# The test venv installs the checkout in editable mode, whose import hook would find edge.fleet in the checkout
# whatever PYTHONPATH says: the launcher drops that hook, so only the copy on PYTHONPATH is importable, as on a box.
_BOX_LAUNCHER = (
    "import runpy, sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n"
)


def run_python(site: Path, module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` against the box-only copy."""
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", _BOX_LAUNCHER, module, *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_box_runs_without_the_fleet(tmp_path) -> None:
    site = box_only_copy(tmp_path)
    (tmp_path / "probe.py").write_text("import edge, edge.cli\nprint(edge.__file__, edge.cli.fleet_installed())\n")
    probe = run_python(site, "probe", cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(site / "edge" / "__init__.py"), "False"]

    helped = run_python(site, "edge", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "run" in helped.stdout and "ota" in helped.stdout
    assert "fleet" not in helped.stdout and "gateway" not in helped.stdout
    refused = run_python(site, "edge", "fleet", "status", cwd=tmp_path)
    assert refused.returncode == 2 and "invalid choice: 'fleet'" in refused.stderr

    cfg = tmp_path / "edge.toml"
    cfg.write_text(
        f'[device]\ndata_dir = "{tmp_path / "data"}"\n[source]\nkind = "synthetic"\ncount = 3\n'
        f'[sink]\nkind = "jsonl"\npath = "{tmp_path / "records.jsonl"}"\n[log]\nlevel = "warning"\n'
    )
    ran = run_python(site, "edge", "run", "--config", str(cfg), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 3


def loaded_after(statements: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter holds after running ``statements`` (output and exit swallowed)."""
    code = (
        "import contextlib, io, sys\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        f"    exec({statements!r})\n"
        f"print(','.join(m for m in {modules!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_help_loads_neither_numpy_nor_onnxruntime() -> None:
    assert loaded_after("import edge.cli; edge.cli.main(['--help'])", ("numpy", "onnxruntime")) == []


def test_the_records_module_loads_no_crypto() -> None:
    # Every box imports edge.wire.records on its hot path; a box writing JSON lines must not pay for COSE and
    # cryptography (16 MB of RSS when the package's __init__ imported its modules eagerly).
    heavy = ("cryptography", "cbor2", "edge.wire.envelope", "edge.wire.chain")
    assert loaded_after("import edge.wire.records, edge.sinks", heavy) == []


def test_a_box_verb_does_not_load_the_fleet_cli() -> None:
    # `edge run` starts the service on every boot: the fleet's parsers are not its business, even where installed.
    assert loaded_after("import edge.cli; edge.cli.main(['run', '--frames', '-1'])", ("edge.fleet.cli",)) == []

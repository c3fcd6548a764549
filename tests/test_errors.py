"""The fault tree: every error class of edge has exactly one root, so a handler knows whose fault it is.

Roots (edge/errors.py): ``InputError`` (outside input), ``TransportError`` (a device, connection or database),
``ConfigError`` (the local configuration), ``ResourceError`` (a full disk or store, a held lock). A bug is a plain
``RuntimeError`` with no root. Grouping classes are caught, never raised.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import edge
from edge.errors import ConfigError, EdgeError, InputError, ResourceError, TransportError
from edge.fleet.errors import GatewayError
from edge.ota.errors import OtaError
from edge.telemetry.outbox import OutboxError

ROOTS = (InputError, TransportError, ConfigError, ResourceError)
GROUPS = (EdgeError, OtaError, GatewayError, OutboxError)
# Exceptions used as control flow inside one module, never seen outside it.
CONTROL_FLOW = {"edge.ota.updater._Rollback"}
ROOT_DIR = Path(edge.__file__).parent


def error_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in edge/, by its qualified name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(edge.__path__, "edge."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def fault(cls: type[BaseException]) -> str | None:
    """What is wrong with a class's place in the tree, or None."""
    if cls in GROUPS or cls in ROOTS:
        return None
    roots = [r.__name__ for r in ROOTS if issubclass(cls, r)]
    if len(roots) > 1:
        return f"has {len(roots)} roots: {', '.join(roots)}"
    if not roots and not issubclass(cls, RuntimeError):
        return "has no root (InputError, TransportError, ConfigError, ResourceError) and is not a bug (RuntimeError)"
    if roots and issubclass(cls, RuntimeError):
        return f"is a bug (RuntimeError) and also {roots[0]}"
    return None


def test_the_walk_finds_the_errors() -> None:
    classes = error_classes()
    assert len(classes) > 40
    assert {"edge.fleet.errors.StoreError", "edge.wire.errors.ManifestError", "edge.ota.errors.TrialFailed"} <= set(
        classes
    )


def test_every_error_has_exactly_one_root() -> None:
    problems = {
        name: f for name, cls in error_classes().items() if name not in CONTROL_FLOW and (f := fault(cls)) is not None
    }
    assert problems == {}


def test_grouping_classes_are_never_raised() -> None:
    groups = {g.__name__ for g in GROUPS}
    raised = []
    for path in ROOT_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in groups:
                    raised.append(f"{path.relative_to(ROOT_DIR)}:{node.lineno} raises {name}")
    assert raised == []


@pytest.mark.parametrize(
    ("bases", "needle"),
    [
        ((InputError, TransportError), "2 roots"),
        ((EdgeError,), "no root"),
        ((ValueError,), "no root"),
        ((ConfigError, RuntimeError), "also ConfigError"),
    ],
)
def test_misplaced_classes_are_found(bases, needle) -> None:
    cls = type("Misplaced", bases, {"__init__": Exception.__init__})
    assert needle in (fault(cls) or "")


@pytest.mark.parametrize(
    ("bases",), [((InputError,),), ((ResourceError,),), ((RuntimeError,),), ((OtaError, InputError),)]
)
def test_well_placed_classes_pass(bases) -> None:
    assert fault(type("Placed", bases, {})) is None

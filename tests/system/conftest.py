"""Fixtures of the system tests (docs/system.md): the image, a loader for tools/qemu/system/run.py, the figures.

These tests boot an emulated arm64 box, minutes each, so the default ``pytest`` run (``make test``) never collects
them: a file here is collected only when a path inside ``tests/system`` is named on the command line, which
``make test-system`` does.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUN_PY = ROOT / "tools" / "qemu" / "system" / "run.py"
FIGURES_FILE = ROOT / ".cache" / "system" / "figures.json"
FIGURES: dict[str, Any] = {}


def _named_explicitly(config: pytest.Config) -> bool:
    for arg in map(str, config.invocation_params.args):
        if arg.startswith("-"):
            continue
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip collecting this directory's tests unless it was named on the command line."""
    if collection_path != Path(__file__) and not _named_explicitly(config):
        return True
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "system: boots the emulated arm64 box (make test-system)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("system figures")
    for key, value in FIGURES.items():
        terminalreporter.write_line(f"{key}: {value}")
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    FIGURES_FILE.write_text(json.dumps(FIGURES, indent=2) + "\n")
    terminalreporter.write_line(f"(also in {FIGURES_FILE.relative_to(ROOT)})")


@pytest.fixture(scope="session")
def system() -> ModuleType:
    """tools/qemu/system/run.py as a module (Box, Sensor, GuestError)."""
    spec = importlib.util.spec_from_file_location("edge_system_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def figures() -> dict[str, Any]:
    """Measured figures, printed at the end of the run and written to .cache/system/figures.json."""
    return FIGURES


@pytest.fixture(scope="session")
def image(system: ModuleType, figures: dict[str, Any]) -> Any:
    """The system image, built or found in .cache/system/ (the build time is a figure: cold or warm)."""
    t0 = time.monotonic()
    built = system.build_image()
    figures["image build (s)"] = round(time.monotonic() - t0, 1)
    return built

"""Shared fixtures: the bundled models, config files written per test, and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mqtt_broker import Broker, TestPKI

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "edge" / "models"


@pytest.fixture(scope="session")
def digits_int8() -> Path:
    return MODELS / "digits-int8.onnx"


@pytest.fixture(scope="session")
def digits_fp32() -> Path:
    return MODELS / "digits-fp32.onnx"


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write a TOML config into the test's directory and return its path."""

    def write(text: str, name: str = "edge.toml") -> Path:
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        return p

    return write


@pytest.fixture
def edge_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m edge ARGS`` in a subprocess (the real command line, as systemd would start it)."""

    def run(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )

    return run


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory):
    """The test fleet's PKI (an Ed25519 CA; client certificates issued on demand)."""
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki):
    """A real mosquitto on a free loopback port with TLS, client certificates and per-device ACLs."""
    b = Broker(tmp_path / "broker", pki)
    b.start()
    yield b
    b.stop()

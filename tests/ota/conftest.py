"""Fixtures of the OTA tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ota_env import OtaEnv
from repo_helpers import ready_repository
from static_server import StaticServer


@pytest.fixture
def ota_env(tmp_path: Path) -> Iterator[OtaEnv]:
    """A fleet repository with digits 1.0.0 (publisher acme, golden samples), served on loopback, and a box dir."""
    repo, key = ready_repository(tmp_path / "fleet")
    with StaticServer(repo.repository_dir) as server:
        box = tmp_path / "box"
        box.mkdir()
        yield OtaEnv(repo=repo, publisher_key=key, server=server, box=box)

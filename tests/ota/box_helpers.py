"""A box for the installer tests: its data directory, a real TUF client against a served repository, an updater,
and the check every crash test ends with (the active model is valid and loads).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.inference.model import Model
from edge.ota.clock import TimeFloor
from edge.ota.slots import ActiveModel, Slots, file_sha256
from edge.ota.trust import TrustClient
from edge.ota.updater import Updater

ROOT = Path(__file__).resolve().parents[2]
FACTORY = ROOT / "edge" / "models" / "digits-int8.onnx"


def utc_now() -> datetime.datetime:
    """The wall clock as a UTC datetime (repositories signed at this time are fresh for the subprocess boxes)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def trust_client(data_dir: Path, url: str, root: bytes, *, clock: Callable[[], float] = time.time) -> TrustClient:
    """The box's TUF client with the layout of ``edge.ota.agent.ota_paths`` (what ``edge ota`` and the service use)."""
    (data_dir / "ota").mkdir(parents=True, exist_ok=True)
    return TrustClient(
        repo_url=url,
        metadata_dir=data_dir / "tuf",
        downloads_dir=data_dir / "ota" / "downloads",
        trusted_root=root,
        time_floor=TimeFloor(data_dir / "ota" / "time-floor.json"),
        clock=clock,
    )


class Recorder:
    """Collects the updater's events: ``events`` is a list of (kind, data)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, data: Any) -> None:
        self.events.append((kind, dict(data)))

    @property
    def kinds(self) -> list[str]:
        """The event kinds in order."""
        return [k for k, _ in self.events]


def make_updater(
    data_dir: Path, url: str, root: bytes, *, clock: Callable[[], float] = time.time, **kwargs: Any
) -> tuple[Updater, Recorder]:
    """An updater over a fresh TUF client, recording its events."""
    rec = Recorder()
    up = Updater(
        data_dir=data_dir, factory=FACTORY, trust=trust_client(data_dir, url, root, clock=clock), emit=rec, **kwargs
    )
    return up, rec


def assert_valid_active(data_dir: Path) -> ActiveModel:
    """The active model of the box: it must load and its bytes must be what its manifest (or the factory) says."""
    active = Slots(data_dir / "models", FACTORY).active()
    model = Model(active.path, warmup=1)
    if active.slot == "factory":
        assert active.path == FACTORY
        assert model.sha256 == file_sha256(FACTORY)
    else:
        assert active.manifest is not None
        assert model.sha256 == active.sha256
        assert model.model_id == active.manifest.model_id
    return active

"""What ``edge run`` would refuse at start beyond the file's own rules: ``edge config check`` (like ``nginx -t``).

``load_config`` already checks every key alone and the keys that depend on each other. What it cannot see is the
box: whether the files the keys name exist, whether the model loads, whether the box is enrolled. ``preflight``
looks at those, without starting anything and without writing anything, and returns every finding at once.

Invariants:
- Read only: nothing is created, opened for writing or locked, so a check is safe while the service runs.
- An error is what stops ``edge run`` at start; a warning is what the service logs and runs on with (a missing
  receipt key, a missing TUF root, a camera not plugged in yet).
- Every finding is a ``ConfigError`` naming the dotted key, the path and what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edge.config import Config, data_path, resolve_device_id
from edge.errors import ConfigError, ModelError

__all__ = ["Findings", "preflight"]


@dataclass
class Findings:
    """What ``preflight`` found: errors stop the service at start, warnings do not."""

    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[ConfigError] = field(default_factory=list)


def preflight(cfg: Config, *, load_model: bool = True) -> Findings:
    """Check what the service needs from the box at start, as ``edge run`` would meet it.

    Args:
        cfg: the configuration ``load_config`` returned (paths resolved).
        load_model: load the model with onnxruntime (no warm-up), not only check that its file exists.

    Returns:
        Every error and warning, in the order of the keys.
    """
    found = Findings()
    try:
        resolve_device_id(cfg)  # enrolled, and its certificate names the configured id
    except ConfigError as e:
        found.errors.append(e)
    _model(cfg, found, load_model=load_model)
    _source(cfg, found)
    _sink(cfg, found)
    if cfg.sink.kind == "telemetry":
        _telemetry(cfg, found)
    if cfg.ota.repository:
        _ota(cfg, found)
    return found


def _model(cfg: Config, found: Findings, *, load_model: bool) -> None:
    from edge.service import factory_model_path  # noqa: PLC0415 -- numpy, onnxruntime: only for a check

    path = cfg.model.path or factory_model_path()
    if not _file(found.errors, "model.path", path, "an ONNX model file"):
        return
    if not load_model:
        return
    from edge.inference.model import Model  # noqa: PLC0415

    try:
        Model(path, threads=cfg.model.threads, spinning=False, warmup=0)
    except ModelError as e:
        found.errors.append(ConfigError("model.path", str(path), f"a model this box can run ({e})"))


def _source(cfg: Config, found: Findings) -> None:
    s = cfg.source
    if s.kind == "npz" and s.path is not None:
        _file(found.errors, "source.path", s.path, "an .npz file of frames")
    elif s.kind == "directory" and s.path is not None and not s.path.is_dir():
        why = "it is a file" if s.path.exists() else _why(s.path)
        found.errors.append(ConfigError("source.path", str(s.path), f"a directory of .npy frames ({why})"))
    elif s.kind == "stream" and s.path is not None:
        _file(found.errors, "source.path", s.path, "a video file")
    elif s.kind == "serial" and not os.path.exists(s.port):
        found.errors.append(ConfigError("source.port", s.port, "a serial device that exists (is the board plugged?)"))
    elif s.kind == "v4l2" and not os.path.exists(s.device):
        # The service waits for a camera that is not there yet: not an error, but worth saying.
        found.warnings.append(
            ConfigError("source.device", s.device, "a camera that is plugged in (the service waits for it)")
        )


def _sink(cfg: Config, found: Findings) -> None:
    if cfg.sink.kind != "jsonl" or cfg.sink.path == "-":
        return
    path = Path(cfg.sink.path)
    parent = path.parent
    if path.is_dir():
        found.errors.append(ConfigError("sink.path", cfg.sink.path, "a file for the JSON lines (it is a directory)"))
    elif not parent.is_dir():
        found.errors.append(
            ConfigError("sink.path", cfg.sink.path, f"a file in an existing directory ({parent}: {_why(parent)})")
        )
    elif not os.access(parent, os.W_OK | os.X_OK):
        found.errors.append(
            ConfigError("sink.path", cfg.sink.path, f"a file in a directory this user can write ({parent})")
        )


def _telemetry(cfg: Config, found: Findings) -> None:
    t = cfg.telemetry
    _data_dir(cfg, found, "telemetry needs its outbox there")
    # The certificate is resolve_device_id's (it says "not enrolled yet" when it is missing).
    _file(found.errors, "telemetry.ca", data_path(cfg, t.ca), "the fleet CA certificate from enrollment")
    _file(found.errors, "telemetry.key", data_path(cfg, t.key), "this box's key (`edge keys generate`)")
    if t.fleet_key is not None:
        _file(
            found.warnings,
            "telemetry.fleet_key",
            data_path(cfg, t.fleet_key),
            'the fleet command key from enrollment; without it every command is rejected ("" to turn them off)',
        )
    if t.receipt_key is not None:
        _file(
            found.warnings,
            "telemetry.receipt_key",
            data_path(cfg, t.receipt_key),
            'the fleet receipt key from enrollment; without it envelopes leave on PUBACK ("" to choose that)',
        )


def _ota(cfg: Config, found: Findings) -> None:
    _data_dir(cfg, found, "over-the-air updates keep their slots there")
    tuf_cache = cfg.device.data_dir / "tuf"
    if not tuf_cache.is_dir():  # the root is read once, to start the metadata cache
        _file(
            found.warnings,
            "ota.root",
            data_path(cfg, cfg.ota.root),
            "the trusted TUF root from enrollment; without it the service runs with updates off",
        )


def _data_dir(cfg: Config, found: Findings, why: str) -> None:
    d = cfg.device.data_dir
    if not d.is_dir():
        found.errors.append(ConfigError("device.data_dir", str(d), f"an existing directory ({why}; {_why(d)})"))
    elif not os.access(d, os.W_OK | os.X_OK):
        found.errors.append(ConfigError("device.data_dir", str(d), f"a directory this user can write ({why})"))


def _file(into: list[ConfigError], key: str, path: Path, what: str) -> bool:
    """Whether ``path`` is a readable regular file; if not, an error naming ``key`` goes ``into`` the list."""
    if path.is_file() and os.access(path, os.R_OK):
        return True
    into.append(ConfigError(key, str(path), f"{what} ({_why(path)})"))
    return False


def _why(path: Path) -> str:
    """Why ``path`` cannot be used, in a few words."""
    if not path.exists():
        return "it does not exist" if path.parent.is_dir() else f"{path.parent} does not exist"
    if path.is_dir():
        return "it is a directory"
    if not path.is_file():
        return "it is not a regular file"
    return "this user cannot read it"

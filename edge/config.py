"""The service configuration: a TOML file validated into frozen dataclasses.

Every key is checked when the file is loaded, before anything starts: an unknown key (a typo), a value of the wrong
type or out of range raises ``ConfigError`` naming the dotted key, the value and what was expected. Nothing reads
the raw TOML after ``load_config`` returns.

The keys are declared in the section dataclasses below (``edge.toml_config``: each field's default and converter).
The default path is ``/etc/edge/edge.toml`` (read-only rootfs friendly); ``edge run --config FILE`` overrides it.
See docs/configuration.md for every key.

Two files make one configuration. The main file is the same on every box built from one image (a read-only root);
what differs per box (the broker it was enrolled with, its update repository) lives in the optional drop-in
``<device.data_dir>/edge.toml`` on the data partition (``DROPIN_NAME``, ``dropin_path``, ``write_dropin``).
Invariants of the merge:
- The drop-in overrides key by key: a section in it replaces only the keys it names.
- The drop-in is found through ``device.data_dir``, so it may not set that key.
- Each file is validated on its own first: an error in the drop-in names the drop-in's path and the dotted key.
- Relative paths resolve against the directory of the file that sets them (``device.data_dir``, ``model.path``,
  ``source.path``, a ``sink.path`` file), so the service reads the same files whatever its working directory. State
  paths (``telemetry.*``, ``ota.root``) stay relative: they live in ``device.data_dir`` (``data_path``).
- Every error of a file is reported at once (``edge.toml_config.ConfigErrors``).
- A main file that is itself ``<data_dir>/edge.toml`` is read once (it is its own drop-in).

Who the box is (``resolve_device_id``) comes from its certificate, not a setting: see docs/configuration.md.
"""

from __future__ import annotations

import math
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from edge._fs import atomic_write
from edge._paths import DEFAULT_CONFIG_PATH
from edge.errors import ConfigError
from edge.inference.limits import MAX_MODEL_BYTES
from edge.sensing.pixels import PixelFormat
from edge.toml_config import (
    TCP_PORTS,
    Converter,
    boolean,
    dump_toml,
    float_between,
    fs_path,
    host_name,
    in_file,
    int_between,
    number_text,
    one_of,
    parse_document,
    path_or_disabled,
    read_optional_toml,
    read_toml,
    section_types,
    settings,
    shown,
    string,
    tcp_port,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DROPIN_NAME",
    "FALLBACK_DEVICE_ID",
    "LIVE_SETTINGS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_BATCH_RECORDS",
    "MAX_MODEL_MB",
    "MAX_TOP_K",
    "RANGES",
    "Config",
    "DeviceConfig",
    "LogConfig",
    "ModelConfig",
    "OtaConfig",
    "PipelineConfig",
    "PreprocessConfig",
    "SinkConfig",
    "SourceConfig",
    "TelemetryConfig",
    "config_keys",
    "data_path",
    "dropin_path",
    "load_config",
    "parse_config",
    "resolve_device_id",
    "write_dropin",
]

DROPIN_NAME = "edge.toml"  # the per-box drop-in, in device.data_dir (dropin_path)

SOURCE_KINDS = ("synthetic", "npz", "directory", "serial", "v4l2", "stream")
# What a V4L2 capture may negotiate (docs/configuration.md, "Cameras"): "auto" picks from what the device offers.
CAPTURE_FORMATS = ("auto", "YUYV", "NV12", "GREY", "RGB3", "MJPG")
RTSP_TRANSPORTS = ("tcp", "udp")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
SINK_KINDS = ("jsonl", "telemetry")
ON_FULL = ("block", "drop_oldest")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")

# The range of every numeric key, both ends inclusive: what a real box can use, so an absurd value (a typo, a unit
# mix-up) stops the service at start-up naming the key instead of failing later, deep inside a library.
# Why each bound:
MAX_TOP_K = 64  # the telemetry schema carries at most 64 top-k pairs (edge.wire.schema), or the gateway rejects
MAX_BATCH_RECORDS = 1000  # the contract's records per envelope (edge.wire._bounds.MAX_RECORDS_PER_ENVELOPE)
MQTT_MAX_U16 = 65535  # MQTT 5 keepalive and Receive Maximum (the most in-flight messages) are 16-bit fields
MQTT_MAX_U32 = 2**32 - 1  # MQTT 5 Session Expiry Interval is a 32-bit field (the maximum means "never expires")
MAX_MODEL_MB = MAX_MODEL_BYTES // 2**20  # a larger download could never be loaded
RANGES: Mapping[str, tuple[float, float]] = {
    "model.threads": (1, 64),  # onnxruntime intra-op threads; more than any box has cores
    "model.warmup": (0, 1000),
    "model.top_k": (1, MAX_TOP_K),
    "source.count": (0, 10**12),  # 0 = unlimited; 10**12 frames is 30 years at 1000 fps
    "source.fps": (0.0001, 1000.0),  # or 0 = unpaced; 0.0001 fps is one frame every 2.8 hours
    "source.baudrate": (300, 12_000_000),  # the fastest USB UARTs (FT232H) run 12 Mbaud
    "source.width": (16, 16384),  # or 0 = chosen from the model and the device; V4L2's own limits
    "source.height": (16, 16384),
    "source.buffers": (2, 32),  # the V4L2 ring: 2 is the least that streams, 32 is VIDEO_MAX_FRAME
    "source.reconnect_max_s": (0.1, 3600.0),  # backoff ceiling after an unplug or a broken stream
    "preprocess.crop": (0, 65535),  # x, y, width, height in pixels (width and height >= 1)
    "preprocess.letterbox": (0.0, 255.0),  # a fill value in pixel units
    "preprocess.mean": (-255.0, 255.0),  # pixel units
    "preprocess.std": (0.001, 10_000.0),  # pixel units; smaller would overflow float32 coefficients
    "pipeline.queue_size": (1, 1024),  # frames held per queue, each up to a full camera frame
    "telemetry.port": TCP_PORTS,
    "telemetry.batch_records": (1, MAX_BATCH_RECORDS),
    "telemetry.batch_age_s": (0.001, 3600.0),
    "telemetry.outbox_max_mb": (0.01, 65536.0),  # up to 64 GiB of a box's data partition
    "telemetry.outbox_max_envelopes": (2, 10_000_000),
    "telemetry.window": (0, MQTT_MAX_U16),  # 0 = the transport's measured default
    "telemetry.keepalive_s": (5, MQTT_MAX_U16),
    "telemetry.session_expiry_s": (0, MQTT_MAX_U32),
    "telemetry.drain_timeout_s": (0.0, 600.0),
    "telemetry.receipt_timeout_s": (0.1, 86400.0),  # resends double the wait, up to 10 minutes or this
    "telemetry.max_unreceipted": (1, 10_000_000),  # at most outbox_max_envelopes matter
    "ota.check_interval_s": (1.0, 30 * 86400.0),  # up to 30 days
    "ota.max_model_mb": (0.01, float(MAX_MODEL_MB)),
    "ota.trial_runs": (1, 1000),
}


def _ranged_int(key: str, v: Any) -> int:
    """An integer within ``RANGES[key]``."""
    low, high = RANGES[key]
    return int_between(int(low), int(high))(key, v)


def _ranged_float(key: str, v: Any) -> float:
    """A finite number within ``RANGES[key]``."""
    low, high = RANGES[key]
    return float_between(low, high)(key, v)


def _zero_or_ranged_float(key: str, v: Any) -> float:
    """0 (the feature's "off") or a finite number within ``RANGES[key]``."""
    if not isinstance(v, bool) and isinstance(v, int | float) and v == 0:
        return 0.0
    low, high = RANGES[key]
    ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and low <= v <= high
    if not ok:
        raise ConfigError(key, v, f"0 (off) or a finite number >= {number_text(low)} and <= {number_text(high)}")
    return float(v)


def _device_id(key: str, v: Any) -> str:
    """A device id, or ``""``: take it from the certificate (``resolve_device_id``)."""
    if v == "":
        return ""
    # Imported here: edge.identity loads cryptography, which a configuration that sets no id never needs.
    from edge.identity.errors import InvalidDeviceIdError  # noqa: PLC0415
    from edge.identity.keys import validate_device_id  # noqa: PLC0415

    try:
        return validate_device_id(v)
    except InvalidDeviceIdError:
        raise ConfigError(
            key, v, '"" (the CN of the certificate) or a device id: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}'
        ) from None


def _repository_url(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, v, "a URL string")
    url = v
    # The value may carry credentials: an error shows it redacted, never verbatim.
    if url and not (url.startswith(("http://", "https://")) and len(url) > len("https://")):
        raise ConfigError(key, shown(v), "an http:// or https:// URL, or empty to turn updates off")
    if "?" in url or "#" in url:
        # The client appends metadata/ and targets/ to the base: a query or fragment would swallow those paths.
        raise ConfigError(key, shown(v), "a base URL without a query (?) or fragment (#)")
    return url if not url or url.endswith("/") else url + "/"


def _zero_or_ranged_int(key: str, v: Any) -> int:
    """0 (chosen automatically) or an integer within ``RANGES[key]``."""
    if not isinstance(v, bool) and isinstance(v, int) and v == 0:
        return 0
    return _ranged_int(key, v)


def _stream_url(key: str, v: Any) -> str:
    """A network stream's URL, or ``""``; an error never shows the credentials a URL may carry."""
    if not isinstance(v, str):
        raise ConfigError(key, v, "a URL string")
    if v and not (v.startswith(STREAM_SCHEMES) and len(v.split("://", 1)[1]) > 0):
        raise ConfigError(key, shown(v), "an rtsp://, rtsps://, http:// or https:// URL (a file goes in source.path)")
    return v


def _pixel_format(key: str, v: Any) -> PixelFormat:
    try:
        return PixelFormat(v)
    except ValueError:
        raise ConfigError(key, v, "one of " + ", ".join(f.value for f in PixelFormat)) from None


def _crop(key: str, v: Any) -> tuple[int, int, int, int] | None:
    _, high = RANGES["preprocess.crop"]
    ok = isinstance(v, list) and len(v) == 4 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    if not ok or v[0] < 0 or v[1] < 0 or v[2] < 1 or v[3] < 1 or max(v) > high:
        raise ConfigError(
            key, v, f"[x, y, width, height] with x, y >= 0 and width, height >= 1, each <= {number_text(high)}"
        )
    return (v[0], v[1], v[2], v[3])


def _ranged_channels(key: str, v: Any) -> tuple[float, ...] | None:
    """A number or a list of 1 or 3 numbers, each within ``RANGES[key]``."""
    low, high = RANGES[key]
    if isinstance(v, int | float) and not isinstance(v, bool):
        v = [v]
    ok = isinstance(v, list) and len(v) in (1, 3)
    ok = ok and all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and low <= x <= high for x in v
    )
    if not ok:
        raise ConfigError(
            key, v, f"a number or a list of 1 or 3 finite numbers >= {number_text(low)} and <= {number_text(high)}"
        )
    return tuple(float(x) for x in v)


# Each section's keys: the dataclass fields, each with its type, the converter of a value from the file (the
# Annotated metadata, edge.toml_config) and its default. Every numeric key's range is in RANGES.


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Who this box is and where it keeps its state."""

    # "": the CN of the box's certificate (resolve_device_id); set, it must equal that CN when telemetry is on
    id: Annotated[str, _device_id] = ""
    data_dir: Annotated[Path, fs_path] = Path("/data/edge")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The model to run and how onnxruntime runs it."""

    path: Annotated[Path | None, fs_path] = None  # None: the factory model shipped in the package
    threads: Annotated[int, _ranged_int] = 1
    spinning: Annotated[bool, boolean] = False
    warmup: Annotated[int, _ranged_int] = 3
    top_k: Annotated[int, _ranged_int] = 3


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """Where frames come from."""

    kind: Annotated[str, one_of(SOURCE_KINDS)] = "synthetic"
    pixel_format: Annotated[PixelFormat, _pixel_format] = PixelFormat.YUYV
    path: Annotated[Path | None, fs_path] = None
    loop: Annotated[bool, boolean] = False
    # frames to produce; 0 = unlimited (synthetic) or the whole file (npz, directory)
    count: Annotated[int, _ranged_int] = 0
    fps: Annotated[float, _zero_or_ranged_float] = 0.0  # 0 = as fast as the pipeline takes them
    port: Annotated[str, string] = ""
    baudrate: Annotated[int, _ranged_int] = 921600
    # v4l2: the device node or a stable /dev/v4l/by-id/ path; the format, size and rate to negotiate (0 and "auto":
    # chosen from the model's input and what the device offers); the mmap ring's buffers
    device: Annotated[str, string] = "/dev/video0"
    capture_format: Annotated[str, one_of(CAPTURE_FORMATS)] = "auto"
    width: Annotated[int, _zero_or_ranged_int] = 0
    height: Annotated[int, _zero_or_ranged_int] = 0
    buffers: Annotated[int, _ranged_int] = 4
    # stream: a network URL (or a video file in path); RTSP's transport; a file at its own frame rate or as fast as
    # the model allows
    url: Annotated[str, _stream_url] = ""
    rtsp_transport: Annotated[str, one_of(RTSP_TRANSPORTS)] = "tcp"
    realtime: Annotated[bool, boolean] = False
    # v4l2 and stream: reopen after an unplug or a broken stream, backing off from 0.5 s up to this
    reconnect_max_s: Annotated[float, _ranged_float] = 30.0


@dataclass(frozen=True, slots=True)
class PreprocessConfig:
    """Overrides of the preprocessing the model's metadata asks for."""

    crop: Annotated[tuple[int, int, int, int] | None, _crop] = None
    letterbox: Annotated[float | None, _ranged_float] = None
    mean: Annotated[tuple[float, ...] | None, _ranged_channels] = None
    std: Annotated[tuple[float, ...] | None, _ranged_channels] = None


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """Queues between the stages: bounded, so a slow stage pushes back instead of growing memory."""

    queue_size: Annotated[int, _ranged_int] = 8
    # or "drop_oldest": a live camera would rather lose old frames than lag
    on_full: Annotated[str, one_of(ON_FULL)] = "block"


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """Where records go: JSON lines (a file or stdout), or signed telemetry to the fleet (``[telemetry]``)."""

    kind: Annotated[str, one_of(SINK_KINDS)] = "jsonl"
    path: Annotated[str, string] = "-"  # jsonl: "-" is standard output


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """Signed telemetry to the fleet broker (used when ``sink.kind = "telemetry"``).

    Relative paths are inside ``device.data_dir``.
    """

    host: Annotated[str, host_name] = "127.0.0.1"
    port: Annotated[int, tcp_port] = 8883
    ca: Annotated[Path, fs_path] = Path("keys/fleet-ca.pem")
    cert: Annotated[Path, fs_path] = Path("keys/device.pem")
    key: Annotated[Path, fs_path] = Path("keys/device.key")
    outbox: Annotated[Path, fs_path] = Path("outbox.sqlite")
    batch_records: Annotated[int, _ranged_int] = 100
    batch_age_s: Annotated[float, _ranged_float] = 1.0
    outbox_max_mb: Annotated[float, _ranged_float] = 64.0
    outbox_max_envelopes: Annotated[int, _ranged_int] = 100_000
    window: Annotated[int, _ranged_int] = 0  # in-flight envelopes; 0 = the transport's measured default
    keepalive_s: Annotated[int, _ranged_int] = 30
    session_expiry_s: Annotated[int, _ranged_int] = 3600
    drain_timeout_s: Annotated[float, _ranged_float] = 5.0
    # None: commands disabled (every one rejected)
    fleet_key: Annotated[Path | None, path_or_disabled] = Path("keys/fleet-commands.pub")
    # The fleet receipt key: an envelope leaves the outbox only when a receipt signed with it covers it.
    # None: deleted on the broker's PUBACK (a broker or gateway failure can then lose envelopes).
    receipt_key: Annotated[Path | None, path_or_disabled] = Path("keys/fleet-receipts.pub")
    receipt_timeout_s: Annotated[float, _ranged_float] = 30.0  # no receipt within this: published again
    max_unreceipted: Annotated[int, _ranged_int] = 10_000  # envelopes published and not receipted at once


@dataclass(frozen=True, slots=True)
class OtaConfig:
    """Over-the-air model updates (docs/ota.md); off while ``repository`` is empty.

    The updater keeps its files at fixed places in ``device.data_dir``: ``models/`` (the A/B slots and the
    ``active`` link), ``ota/`` (its state and partial downloads) and ``tuf/`` (the TUF metadata cache).
    Relative paths are inside ``device.data_dir``.
    """

    # the TUF repository's base URL (it serves metadata/ and targets/ below it)
    repository: Annotated[str, _repository_url] = ""
    root: Annotated[Path, fs_path] = Path("keys/tuf-root.json")  # the trusted root provisioned at enrollment
    check_interval_s: Annotated[float, _ranged_float] = 3600.0
    max_model_mb: Annotated[float, _ranged_float] = 256.0
    trial_runs: Annotated[int, _ranged_int] = 20


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Log verbosity and format (the box's and the gateway's)."""

    level: Annotated[str, one_of(LOG_LEVELS)] = "info"
    format: Annotated[str, one_of(LOG_FORMATS)] = "json"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration: each field is a section (``edge.toml_config.parse_document``)."""

    device: DeviceConfig = field(default_factory=DeviceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _converter(dotted: str) -> Converter[Any]:
    """The converter the file uses for a dotted key."""
    section, key = dotted.split(".")
    return next(s.convert for s in settings(section_types(Config)[section]) if s.key == key)


# Settings a running service can change (the fleet's ``set`` command, edge.telemetry.control): the dotted key and
# the converter that validates it, the file's own, so a live value obeys exactly the file's rules.
LIVE_SETTINGS: Mapping[str, Converter[Any]] = {
    key: _converter(key) for key in ("telemetry.batch_records", "telemetry.batch_age_s", "log.level")
}


def config_keys() -> frozenset[str]:
    """Every dotted key the configuration file accepts (each section's dataclass fields are its keys).

    Returns:
        Keys such as ``"telemetry.batch_records"``.
    """
    return frozenset(f"{name}.{s.key}" for name, section in section_types(Config).items() for s in settings(section))


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document into a ``Config``.

    Args:
        data: the document as ``tomllib`` returns it.

    Returns:
        The frozen configuration, defaults filled in.

    Raises:
        ConfigError: keys are unknown (all named in one error) or a value is invalid; the message names the key.
    """
    return _checked(parse_document(Config, data))


def _checked(cfg: Config) -> Config:
    """``cfg`` if the keys that depend on each other agree; each key alone is already valid."""
    source = cfg.source
    if source.kind in ("npz", "directory") and source.path is None:
        raise ConfigError("source.path", None, f"a path (source.kind is {source.kind!r})")
    if source.kind == "serial" and not source.port:
        raise ConfigError("source.port", "", "a serial device path (source.kind is 'serial')")
    if source.kind == "v4l2" and not source.device:
        raise ConfigError("source.device", "", "a V4L2 device path such as /dev/video0 (source.kind is 'v4l2')")
    if source.kind == "stream" and (source.url == "") == (source.path is None):
        raise ConfigError(
            "source.url",
            shown(source.url),
            "a stream URL in source.url or a video file in source.path, exactly one (source.kind is 'stream')",
        )
    return cfg


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate the TOML configuration at ``path``, with the box's drop-in merged over it.

    The drop-in, ``<device.data_dir>/edge.toml`` (``dropin_path``, ``device.data_dir`` as the main file sets it), is
    optional: without it the configuration is the main file's. It overrides the main file key by key.

    Relative paths inside a file (``device.data_dir``, ``model.path``, ``source.path``, a ``sink.path`` file) are
    resolved against that file's directory, so a config and its data can travel together and the working directory
    does not matter. State paths (``telemetry.*``, ``ota.root``) stay relative to ``device.data_dir`` (``data_path``).

    Raises:
        ConfigError: a file is not valid TOML, a value is invalid, the main file is missing, or the drop-in sets
            ``device.data_dir``; an error in the drop-in names its path. All the errors of a file at once: several
            are one ``edge.toml_config.ConfigErrors``.
    """
    p = Path(path)
    cfg = _rebased(parse_config(read_toml(p)), p)
    dropin = dropin_path(cfg)
    if _same_file(p, dropin):
        return cfg  # the main file lives in data_dir: it is its own drop-in
    doc = read_optional_toml(dropin)  # errors reading it name its path ("<file>")
    if doc is None:
        return cfg
    over = _parse_dropin(dropin, doc)
    try:
        return _checked(_overlay(cfg, over, doc))
    except ConfigError as e:
        raise in_file(e, f"in {p} with the drop-in {dropin}") from e


def dropin_path(where: Config | str | os.PathLike[str]) -> Path:
    """The per-box drop-in: ``DROPIN_NAME`` in ``device.data_dir``.

    Args:
        where: a configuration (its ``device.data_dir``), or the data directory itself.
    """
    data_dir = where.device.data_dir if isinstance(where, Config) else Path(where)
    return data_dir / DROPIN_NAME


def write_dropin(data_dir: Path, updates: Mapping[str, Mapping[str, Any]]) -> Path:
    """Merge ``updates`` into the drop-in of ``data_dir`` and write it atomically (``edge._fs.atomic_write``).

    Keys the drop-in already has and ``updates`` does not name are kept; a key in both takes the new value. The
    result is validated as ``load_config`` will read it before anything is written, so a bad value never reaches the
    next start. Comments of an existing drop-in are not kept (it is a file edge writes, not one an operator edits).
    Not for concurrent writers: the read and the write are not one transaction.

    Args:
        data_dir: ``device.data_dir``; created if missing.
        updates: section -> key -> value, e.g. ``{"telemetry": {"host": "broker.example.net", "port": 8883}}``.
            Values are strings, integers, floats, booleans or flat lists of them, as the file writes them.

    Returns:
        The drop-in's path.

    Raises:
        ConfigError: the existing drop-in is unreadable or invalid, or the result would be (an unknown key, a bad
            value, ``device.data_dir``); the message names the drop-in and the key.
        OSError: the directory or the file cannot be written.
    """
    path = dropin_path(data_dir)
    doc = read_optional_toml(path) or {}
    for section, values in updates.items():
        table = doc.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(section, table, f"a table (in the drop-in {path})")
        table.update(values)
    _parse_dropin(path, doc)
    try:
        # An existing drop-in keeps its permission bits: an operator who restricted it (it may hold a repository URL
        # with credentials) does not find it world-readable after the next enrollment.
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o644  # as /etc/edge/edge.toml: the service's user must read it whoever wrote it
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, dump_toml(doc).encode("utf-8"), mode=mode)
    return path


def _parse_dropin(path: Path, doc: Mapping[str, Any]) -> Config:
    """The drop-in's own keys, validated alone (each key's value; the keys that depend on each other are checked
    after the merge) and rebased on its directory; every error names ``path``."""
    device = doc.get("device")
    if isinstance(device, Mapping) and "data_dir" in device:
        raise ConfigError(
            "device.data_dir",
            shown(device["data_dir"]),
            f"no device.data_dir in the drop-in {path} (the drop-in is found through it: set it in the main file)",
        )
    try:
        return _rebased(parse_document(Config, doc), path)
    except ConfigError as e:
        raise in_file(e, f"in the drop-in {path}") from e


def _overlay(cfg: Config, over: Config, named: Mapping[str, Any]) -> Config:
    """``cfg`` with the keys ``named`` (the drop-in's document: section -> its keys) taken from ``over``."""
    sections = {
        name: replace(getattr(cfg, name), **{key: getattr(getattr(over, name), key) for key in table})
        for name, table in named.items()
    }
    return replace(cfg, **sections)


def _rebased(cfg: Config, file: Path) -> Config:
    """``cfg`` with its relative file paths resolved against the directory of ``file`` (not the working directory:
    a service, a test and an operator's shell start in different ones). State paths stay relative to data_dir."""
    base = file.resolve().parent

    def rebase(q: Path | None) -> Path | None:
        return q if q is None or q.is_absolute() else base / q

    sink = cfg.sink.path
    if sink != "-" and not Path(sink).is_absolute():
        sink = str(base / sink)
    return replace(
        cfg,
        device=replace(cfg.device, data_dir=base / cfg.device.data_dir),
        model=replace(cfg.model, path=rebase(cfg.model.path)),
        source=replace(cfg.source, path=rebase(cfg.source.path)),
        sink=replace(cfg.sink, path=sink),
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:  # b does not exist (the usual case: no drop-in) or cannot be looked at: not the same file
        return False


def data_path(cfg: Config, p: Path) -> Path:
    """A state path from the configuration: relative ones live in ``device.data_dir``."""
    return p if p.is_absolute() else cfg.device.data_dir / p


# When neither the configuration nor a certificate names the box (a jsonl box never enrolled) and the host name has
# nothing usable in it.
FALLBACK_DEVICE_ID = "edge-0"


def resolve_device_id(cfg: Config) -> str:
    """Who this box is: the CN of its certificate (``telemetry.cert``), which is what the broker knows it by.

    - ``sink.kind = "telemetry"``: the certificate's CN. A ``device.id`` that is set must equal it.
    - Any other sink: ``device.id`` if set; else the certificate's CN if the certificate exists; else the host name,
      made a valid device id (characters outside ``[A-Za-z0-9_.-]`` become ``-``, leading ``-._`` go, at most 64
      characters; ``FALLBACK_DEVICE_ID`` if nothing is left).

    Args:
        cfg: the validated configuration.

    Returns:
        A valid device id.

    Raises:
        ConfigError: telemetry is on and the certificate is missing (the box is not enrolled yet) or names another
            id than ``device.id``; or the certificate exists but is unreadable or names no valid device id.
    """
    # Imported here: cryptography is needed only to read a certificate.
    from edge.identity.certificate import device_id_from_certificate  # noqa: PLC0415
    from edge.identity.errors import CertificateMissingError  # noqa: PLC0415

    configured = cfg.device.id
    cert = data_path(cfg, cfg.telemetry.cert)
    if cfg.sink.kind != "telemetry":
        if configured:
            return configured
        try:
            return device_id_from_certificate(cert)
        except CertificateMissingError:
            return _host_device_id()
    try:
        certified = device_id_from_certificate(cert)
    except CertificateMissingError:
        raise ConfigError(
            "telemetry.cert",
            str(cert),
            "an existing certificate: this box is not enrolled yet: run `edge enroll --claim CODE`",
        ) from None
    if configured and configured != certified:
        raise ConfigError(
            "device.id",
            configured,
            f"{certified!r}, the CN of the certificate {cert} (the broker knows this box as {certified!r}): "
            f"remove device.id from the configuration to use {certified!r}, "
            f"or re-enroll the box as {configured!r} (`edge enroll --claim CODE`)",
        )
    return certified


def _host_device_id() -> str:
    """The host name as a device id (``resolve_device_id``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).lstrip("-._")[:64]
    return name or FALLBACK_DEVICE_ID

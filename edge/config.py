"""The service configuration: a TOML file validated into frozen dataclasses.

Every key is checked when the file is loaded, before anything starts: an unknown key (a typo), a value of the wrong
type or out of range raises ``ConfigError`` naming the dotted key, the value and what was expected. Nothing reads
the raw TOML after ``load_config`` returns.

The keys are declared in the section dataclasses below (``edge.toml_config``: each field's default and converter).
The default path is ``/etc/edge/edge.toml`` (read-only rootfs friendly); ``edge run --config FILE`` overrides it.
See docs/configuration.md for every key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from edge.errors import ConfigError
from edge.inference.limits import MAX_MODEL_BYTES
from edge.sensing.pixels import PixelFormat
from edge.toml_config import (
    TCP_PORTS,
    Converter,
    boolean,
    float_between,
    fs_path,
    host_name,
    int_between,
    number_text,
    one_of,
    parse_document,
    path_or_disabled,
    read_toml,
    section_types,
    settings,
    shown,
    string,
    tcp_port,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
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
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/edge/edge.toml")

SOURCE_KINDS = ("synthetic", "npz", "directory", "serial")
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

    id: Annotated[str, string] = "edge-0"
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
    cfg = parse_document(Config, data)
    source = cfg.source
    if source.kind in ("npz", "directory") and source.path is None:
        raise ConfigError("source.path", None, f"a path (source.kind is {source.kind!r})")
    if source.kind == "serial" and not source.port:
        raise ConfigError("source.port", "", "a serial device path (source.kind is 'serial')")
    return cfg


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate the TOML configuration at ``path``.

    Relative paths inside the file (model, source) are resolved against the file's directory, so a config and its
    data can travel together.

    Raises:
        ConfigError: the file is missing, is not valid TOML, or a value is invalid.
    """
    p = Path(path)
    cfg = parse_config(read_toml(p))
    base = p.resolve().parent

    def rebase(q: Path | None) -> Path | None:
        return q if q is None or q.is_absolute() else base / q

    return replace(
        cfg,
        model=replace(cfg.model, path=rebase(cfg.model.path)),
        source=replace(cfg.source, path=rebase(cfg.source.path)),
    )


def data_path(cfg: Config, p: Path) -> Path:
    """A state path from the configuration: relative ones live in ``device.data_dir``."""
    return p if p.is_absolute() else cfg.device.data_dir / p

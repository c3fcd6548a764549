"""The service configuration: a TOML file validated into frozen dataclasses.

Every key is checked when the file is loaded, before anything starts: an unknown key (a typo), a value of the wrong
type or out of range raises ``ConfigError`` naming the dotted key, the value and what was expected. Nothing reads
the raw TOML after ``load_config`` returns.

The default path is ``/etc/edge/edge.toml`` (read-only rootfs friendly); ``edge run --config FILE`` overrides it.
See docs/configuration.md for every key.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from edge.errors import ConfigError
from edge.inference.model import MAX_MODEL_BYTES
from edge.log import REDACTED, redact
from edge.sensing.frames import PixelFormat

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "LIVE_SETTINGS",
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
    "load_config",
    "data_path",
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
TCP_PORTS = (1, 65535)
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
    "ota.check_interval_s": (1.0, 30 * 86400.0),  # up to 30 days
    "ota.max_model_mb": (0.01, float(MAX_MODEL_MB)),
    "ota.trial_runs": (1, 1000),
}


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Who this box is and where it keeps its state."""

    id: str = "edge-0"
    data_dir: Path = Path("/data/edge")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The model to run and how onnxruntime runs it."""

    path: Path | None = None  # None: the factory model shipped in the package
    threads: int = 1
    spinning: bool = False
    warmup: int = 3
    top_k: int = 3


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """Where frames come from."""

    kind: str = "synthetic"
    pixel_format: PixelFormat = PixelFormat.YUYV
    path: Path | None = None
    loop: bool = False
    count: int = 0  # frames to produce; 0 = unlimited (synthetic) or the whole file (npz, directory)
    fps: float = 0.0  # 0 = as fast as the pipeline takes them
    port: str = ""
    baudrate: int = 921600


@dataclass(frozen=True, slots=True)
class PreprocessConfig:
    """Overrides of the preprocessing the model's metadata asks for."""

    crop: tuple[int, int, int, int] | None = None
    letterbox: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """Queues between the stages: bounded, so a slow stage pushes back instead of growing memory."""

    queue_size: int = 8
    on_full: str = "block"  # or "drop_oldest": a live camera would rather lose old frames than lag


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """Where records go: JSON lines (a file or stdout), or signed telemetry to the fleet (``[telemetry]``)."""

    kind: str = "jsonl"
    path: str = "-"  # jsonl: "-" is standard output


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """Signed telemetry to the fleet broker (used when ``sink.kind = "telemetry"``).

    Relative paths are inside ``device.data_dir``.
    """

    host: str = "127.0.0.1"
    port: int = 8883
    ca: Path = Path("keys/fleet-ca.pem")
    cert: Path = Path("keys/device.pem")
    key: Path = Path("keys/device.key")
    outbox: Path = Path("outbox.sqlite")
    batch_records: int = 100
    batch_age_s: float = 1.0
    outbox_max_mb: float = 64.0
    outbox_max_envelopes: int = 100_000
    window: int = 0  # in-flight envelopes; 0 = the transport's measured default
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    drain_timeout_s: float = 5.0
    fleet_key: Path | None = Path("keys/fleet-commands.pub")  # None: commands disabled (every one rejected)


@dataclass(frozen=True, slots=True)
class OtaConfig:
    """Over-the-air model updates (docs/ota.md); off while ``repository`` is empty.

    The updater keeps its files at fixed places in ``device.data_dir``: ``models/`` (the A/B slots and the
    ``active`` link), ``ota/`` (its state and partial downloads) and ``tuf/`` (the TUF metadata cache).
    Relative paths are inside ``device.data_dir``.
    """

    repository: str = ""  # the TUF repository's base URL (it serves metadata/ and targets/ below it)
    root: Path = Path("keys/tuf-root.json")  # the trusted root provisioned at enrollment
    check_interval_s: float = 3600.0
    max_model_mb: float = 256.0
    trial_runs: int = 20


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Log verbosity and format."""

    level: str = "info"
    format: str = "json"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    device: DeviceConfig = field(default_factory=DeviceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    log: LogConfig = field(default_factory=LogConfig)


T = TypeVar("T")


class _Section:
    """Reads one TOML table, remembering which keys were used so leftovers (typos) can be reported."""

    def __init__(self, name: str, table: object) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(name, table, "a table")
        self.name = name
        self.table: Mapping[str, Any] = table
        self.used: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def get(self, key: str, default: T, convert: Callable[[str, Any], T]) -> T:
        self.used.add(key)
        if key not in self.table:
            return default
        return convert(self.key(key), self.table[key])

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(self.key(unknown[0]), self.table[unknown[0]], "no such key (check the spelling)")


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(key, v, "a non-empty string")
    return v


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, v, "true or false")
    return v


def _int_at_least(low: int) -> Callable[[str, Any], int]:
    def convert(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(key, v, f"an integer >= {low}")
        return v

    return convert


def _float_at_least(low: float) -> Callable[[str, Any], float]:
    def convert(key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < low:
            raise ConfigError(key, v, f"a finite number >= {low}")
        return float(v)

    return convert


def _num(x: float) -> str:
    """A bound as the docs write it: ``64``, ``0.001``, ``2592000`` (no ``.0``, no exponent)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _int_between(low: int, high: int) -> Callable[[str, Any], int]:
    def convert(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ConfigError(key, v, f"an integer >= {_num(low)} and <= {_num(high)}")
        return v

    return convert


def _float_between(low: float, high: float) -> Callable[[str, Any], float]:
    def convert(key: str, v: Any) -> float:
        ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and low <= v <= high
        if not ok:
            raise ConfigError(key, v, f"a finite number >= {_num(low)} and <= {_num(high)}")
        return float(v)

    return convert


def _ranged_int(key: str, v: Any) -> int:
    """An integer within ``RANGES[key]``."""
    low, high = RANGES[key]
    return _int_between(int(low), int(high))(key, v)


def _ranged_float(key: str, v: Any) -> float:
    """A finite number within ``RANGES[key]``."""
    low, high = RANGES[key]
    return _float_between(low, high)(key, v)


def _zero_or_ranged_float(key: str, v: Any) -> float:
    """0 (the feature's "off") or a finite number within ``RANGES[key]``."""
    if not isinstance(v, bool) and isinstance(v, int | float) and v == 0:
        return 0.0
    low, high = RANGES[key]
    ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and low <= v <= high
    if not ok:
        raise ConfigError(key, v, f"0 (off) or a finite number >= {_num(low)} and <= {_num(high)}")
    return float(v)


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def convert(key: str, v: Any) -> str:
        if v not in options:
            raise ConfigError(key, v, "one of " + ", ".join(repr(o) for o in options))
        return str(v)

    return convert


def _port(key: str, v: Any) -> int:
    low, high = TCP_PORTS
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ConfigError(key, v, f"a TCP port number {low}..{high}")
    return v


def _shown(v: Any) -> Any:
    """A value fit for an error message: credentials masked (``edge.log.redact``), also those of a scheme-less
    ``user:password@host``, which redact() cannot tell from an e-mail address."""
    if not isinstance(v, str):
        return v
    if "://" not in v and "@" in v:
        v = f"{REDACTED}@{v.rpartition('@')[2]}"
    return redact(v)


def _host(key: str, v: Any) -> str:
    # A URL or user:password@host here would end up in logs and errors verbatim: only a host name or address.
    if not isinstance(v, str) or not v or any(c in v for c in "/@?# \t"):
        raise ConfigError(key, _shown(v), "a host name or IP address (not a URL)")
    return v


def _path(key: str, v: Any) -> Path:
    return Path(_str(key, v))


def _optional_path(key: str, v: Any) -> Path | None:
    return _path(key, v)


def _path_or_disabled(key: str, v: Any) -> Path | None:
    # TOML has no null: the empty string switches the feature off.
    if v == "":
        return None
    return _path(key, v)


def _repository_url(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, v, "a URL string")
    url = v
    # The value may carry credentials: an error shows it redacted, never verbatim.
    if url and not (url.startswith(("http://", "https://")) and len(url) > len("https://")):
        raise ConfigError(key, _shown(v), "an http:// or https:// URL, or empty to turn updates off")
    if "?" in url or "#" in url:
        # The client appends metadata/ and targets/ to the base: a query or fragment would swallow those paths.
        raise ConfigError(key, _shown(v), "a base URL without a query (?) or fragment (#)")
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
        raise ConfigError(key, v, f"[x, y, width, height] with x, y >= 0 and width, height >= 1, each <= {_num(high)}")
    return (v[0], v[1], v[2], v[3])


def _optional_float(key: str, v: Any) -> float | None:
    return _float_at_least(-math.inf)(key, v)


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
        raise ConfigError(key, v, f"a number or a list of 1 or 3 finite numbers >= {_num(low)} and <= {_num(high)}")
    return tuple(float(x) for x in v)


def _channels(nonzero: bool) -> Callable[[str, Any], tuple[float, ...] | None]:
    def convert(key: str, v: Any) -> tuple[float, ...] | None:
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = [v]
        ok = isinstance(v, list) and len(v) in (1, 3)
        ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        if not ok or (nonzero and any(x == 0 for x in v)):
            what = "nonzero numbers" if nonzero else "numbers"
            raise ConfigError(key, v, f"a number or a list of 1 or 3 finite {what}")
        return tuple(float(x) for x in v)

    return convert


# Settings a running service can change (the fleet's ``set`` command, edge.telemetry.control): the dotted key and
# the converter that validates it, shared with ``parse_config`` so a live value obeys exactly the file's rules.
LIVE_SETTINGS: Mapping[str, Callable[[str, Any], Any]] = {
    "telemetry.batch_records": _ranged_int,
    "telemetry.batch_age_s": _ranged_float,
    "log.level": _choice(LOG_LEVELS),
}


def config_keys() -> frozenset[str]:
    """Every dotted key the configuration file accepts (each section's dataclass fields are its keys).

    Returns:
        Keys such as ``"telemetry.batch_records"``.
    """
    defaults = Config()
    return frozenset(
        f"{section}.{key}"
        for section in Config.__dataclass_fields__
        for key in type(getattr(defaults, section)).__dataclass_fields__
    )


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document into a ``Config``.

    Args:
        data: the document as ``tomllib`` returns it.

    Returns:
        The frozen configuration, defaults filled in.

    Raises:
        ConfigError: a key is unknown or a value is invalid; the message names the key.
    """
    # Defaults come from instances: on slotted dataclasses the class attributes are descriptors.
    dd, dm, ds, dp, dk, dl = DeviceConfig(), ModelConfig(), SourceConfig(), PipelineConfig(), SinkConfig(), LogConfig()
    top = _Section("", data)
    tables = {name: _Section(name, top.get(name, {}, lambda _k, v: v)) for name in Config.__dataclass_fields__}
    top.finish()

    s = tables["device"]
    device = DeviceConfig(id=s.get("id", dd.id, _str), data_dir=s.get("data_dir", dd.data_dir, _path))

    s = tables["model"]
    model = ModelConfig(
        path=s.get("path", None, _optional_path),
        threads=s.get("threads", dm.threads, _ranged_int),
        spinning=s.get("spinning", dm.spinning, _bool),
        warmup=s.get("warmup", dm.warmup, _ranged_int),
        top_k=s.get("top_k", dm.top_k, _ranged_int),
    )

    s = tables["source"]
    source = SourceConfig(
        kind=s.get("kind", ds.kind, _choice(SOURCE_KINDS)),
        pixel_format=s.get("pixel_format", ds.pixel_format, _pixel_format),
        path=s.get("path", None, _optional_path),
        loop=s.get("loop", ds.loop, _bool),
        count=s.get("count", ds.count, _ranged_int),
        fps=s.get("fps", ds.fps, _zero_or_ranged_float),
        port=s.get("port", ds.port, _str),
        baudrate=s.get("baudrate", ds.baudrate, _ranged_int),
    )
    if source.kind in ("npz", "directory") and source.path is None:
        raise ConfigError("source.path", None, f"a path (source.kind is {source.kind!r})")
    if source.kind == "serial" and not source.port:
        raise ConfigError("source.port", "", "a serial device path (source.kind is 'serial')")

    s = tables["preprocess"]
    preprocess = PreprocessConfig(
        crop=s.get("crop", None, _crop),
        letterbox=s.get("letterbox", None, _ranged_float),
        mean=s.get("mean", None, _ranged_channels),
        std=s.get("std", None, _ranged_channels),
    )

    s = tables["pipeline"]
    pipeline = PipelineConfig(
        queue_size=s.get("queue_size", dp.queue_size, _ranged_int),
        on_full=s.get("on_full", dp.on_full, _choice(ON_FULL)),
    )

    s = tables["sink"]
    sink = SinkConfig(kind=s.get("kind", dk.kind, _choice(SINK_KINDS)), path=s.get("path", "-", _str))

    s = tables["telemetry"]
    dt = TelemetryConfig()
    telemetry = TelemetryConfig(
        host=s.get("host", dt.host, _host),
        port=s.get("port", dt.port, _port),
        ca=s.get("ca", dt.ca, _path),
        cert=s.get("cert", dt.cert, _path),
        key=s.get("key", dt.key, _path),
        outbox=s.get("outbox", dt.outbox, _path),
        batch_records=s.get("batch_records", dt.batch_records, LIVE_SETTINGS["telemetry.batch_records"]),
        batch_age_s=s.get("batch_age_s", dt.batch_age_s, LIVE_SETTINGS["telemetry.batch_age_s"]),
        outbox_max_mb=s.get("outbox_max_mb", dt.outbox_max_mb, _ranged_float),
        outbox_max_envelopes=s.get("outbox_max_envelopes", dt.outbox_max_envelopes, _ranged_int),
        window=s.get("window", dt.window, _ranged_int),
        keepalive_s=s.get("keepalive_s", dt.keepalive_s, _ranged_int),
        session_expiry_s=s.get("session_expiry_s", dt.session_expiry_s, _ranged_int),
        drain_timeout_s=s.get("drain_timeout_s", dt.drain_timeout_s, _ranged_float),
        fleet_key=s.get("fleet_key", dt.fleet_key, _path_or_disabled),
    )

    s = tables["ota"]
    do = OtaConfig()
    ota = OtaConfig(
        repository=s.get("repository", do.repository, _repository_url),
        root=s.get("root", do.root, _path),
        check_interval_s=s.get("check_interval_s", do.check_interval_s, _ranged_float),
        max_model_mb=s.get("max_model_mb", do.max_model_mb, _ranged_float),
        trial_runs=s.get("trial_runs", do.trial_runs, _ranged_int),
    )

    s = tables["log"]
    log = LogConfig(
        level=s.get("level", dl.level, LIVE_SETTINGS["log.level"]),
        format=s.get("format", dl.format, _choice(LOG_FORMATS)),
    )
    for section in tables.values():
        section.finish()
    return Config(
        device=device,
        model=model,
        source=source,
        preprocess=preprocess,
        pipeline=pipeline,
        sink=sink,
        telemetry=telemetry,
        ota=ota,
        log=log,
    )


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file (the box's or the gateway's configuration).

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8 or not valid TOML (key ``<file>``).
    """
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("<file>", str(path), "an existing configuration file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("<file>", str(path), f"a readable UTF-8 file ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("<file>", str(path), f"valid TOML ({e})") from e


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

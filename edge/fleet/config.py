"""The gateway's configuration: a TOML file validated into frozen dataclasses, like the box's (``edge.config``).

Every key is checked when the file is loaded: an unknown key, a wrong type or an out-of-range value raises
``ConfigError`` naming the dotted key; every error of the file is reported at once. Relative paths (``broker.*``
and a SQLite ``gateway.store``) are resolved against the fleet directory, which itself is resolved against the
file's directory, so a fleet directory and its config can travel together and the working directory does not matter.
See docs/gateway.md and docs/gateway.example.toml for every key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from edge.config import LogConfig
from edge.errors import ConfigError
from edge.fleet.credit import CreditRules
from edge.toml_config import (
    boolean,
    float_at_least,
    float_between,
    fs_path,
    int_between,
    parse_document,
    read_toml,
    string,
    tcp_port,
)

__all__ = [
    "BrokerConfig",
    "GatewayConfig",
    "IngestConfig",
    "LedgerConfig",
    "MetricsConfig",
    "RolloutConfig",
    "certificate_cn",
    "default_store_url",
    "load_gateway_config",
    "parse_gateway_config",
]


def _share_group(key: str, v: Any) -> str:
    s = string(key, v)
    if any(c in s for c in "/+#") or len(s) > 64:
        raise ConfigError(key, v, "a name of at most 64 characters without '/', '+' or '#'")
    return s


def _gateway_id(key: str, v: Any) -> str:
    """``""`` (the CN of ``broker.cert``, as ``load_gateway_config`` resolves it) or a client id."""
    return "" if v == "" else string(key, v)


def _store(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, v, "a store URL (sqlite:///path or postgresql://...) or a path")
    return v


def _ceiling(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1e9:  # NaN fails the range too
        raise ConfigError(key, v, "inferences per second: a number above 0 and at most 1e9")
    return float(v)


def _ceilings(key: str, v: Any) -> dict[str, float]:
    if not isinstance(v, Mapping):
        raise ConfigError(key, v, "a table of model name or id = inferences per second, e.g. {digits = 5000}")
    return {str(name): _ceiling(f"{key}.{name}", per_s) for name, per_s in v.items()}


def _command_ttl(key: str, v: Any) -> float:
    ttl = float_at_least(1.0)(key, v)
    # Boxes refuse commands that live longer than their max TTL (edge.wire.commands.DEFAULT_MAX_TTL_S).
    if ttl > 3600.0:
        raise ConfigError(key, v, "at most 3600 seconds (boxes refuse longer-lived commands)")
    return ttl


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """Who this gateway process is and how it ingests.

    Attributes:
        id: the MQTT client id, which names the persistent session. The broker binds it to the certificate
            (client id = the CN of ``broker.cert``), so every gateway process needs a certificate of its own; empty
            in the file: ``load_gateway_config`` takes the CN.
        fleet_dir: the fleet directory (CA, command key, device bundles, default store).
        store: the store URL (``sqlite:///path``, a path, or ``postgresql://...``); empty: ``<fleet_dir>/fleet.db``.
        share_group: the MQTT 5 shared-subscription group; processes in one group split the telemetry.
        batch_max: the most messages stored in one transaction.
        batch_wait_ms: how long a batch waits to fill before it is stored anyway.
        receive_maximum: the most unacknowledged messages the broker sends at once (bounds memory and latency).
        store_timeout_s: how long the store may stay unavailable (database down, locked, disk full) before the
            process gives up and exits non-zero, so that its supervisor restarts it.
        reject_burst: quarantined messages a box may have at once before it is suspended (``edge.fleet.suspend``;
            needs ``broker.dynamic_security``); 0: never suspend.
        reject_per_s: how fast a box's reject budget refills (rejects per second).
        suspend_s: the first suspension's length; each repeat within a day doubles it, at most 64 times.
        receipt_interval_s: the least time between two signed receipts to one box (``edge.fleet.receipts``); a
            box's outbox holds its stored envelopes about this much longer, and the gateway signs fewer receipts.
    """

    id: Annotated[str, _gateway_id] = ""
    fleet_dir: Annotated[Path, fs_path] = Path("fleet")
    store: Annotated[str, _store] = ""
    share_group: Annotated[str, _share_group] = "ingest"
    batch_max: Annotated[int, int_between(1, 5000)] = 200
    batch_wait_ms: Annotated[int, int_between(0, 10_000)] = 20
    receive_maximum: Annotated[int, int_between(1, 65535)] = 2000
    store_timeout_s: Annotated[float, float_between(1.0, 86_400.0)] = 300.0
    reject_burst: Annotated[int, int_between(0, 1_000_000)] = 100
    reject_per_s: Annotated[float, float_between(0.001, 1_000_000.0)] = 1.0
    suspend_s: Annotated[float, float_between(1.0, 86_400.0)] = 60.0
    receipt_interval_s: Annotated[float, float_between(0.0, 3600.0)] = 0.5


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The broker and the gateway's client credentials (relative paths live in the fleet directory)."""

    host: Annotated[str, string] = "127.0.0.1"
    port: Annotated[int, tcp_port] = 8883
    ca: Annotated[Path, fs_path] = Path("ca.pem")
    cert: Annotated[Path, fs_path] = Path("gateway/gateway.pem")
    key: Annotated[Path, fs_path] = Path("gateway/gateway.key")
    keepalive_s: Annotated[int, int_between(5, 65535)] = 30
    session_expiry_s: Annotated[int, int_between(0, 0xFFFFFFFF)] = 86400
    # Apply the registry to the broker through mosquitto's dynamic-security plugin (edge.fleet.broker_sync):
    # what the fragment `edge fleet broker-config` writes. Off for a broker that enforces access some other way.
    dynamic_security: Annotated[bool, boolean] = True


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint (``/metrics``); loopback by default: put a proxy in front to expose it."""

    enabled: Annotated[bool, boolean] = True
    host: Annotated[str, string] = "127.0.0.1"
    port: Annotated[int, tcp_port] = 9108


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    """The rollout driver (``edge.fleet.rollout.driver``) inside ``edge gateway run``.

    Attributes:
        enabled: drive the fleet's current rollout (one process per fleet directory is enough; more are safe).
        interval_s: seconds between planning rounds.
        device_timeout_s: how long a commanded device may take to report an outcome before it counts as failed.
        command_ttl_s: the lifetime of the signed update and rollback commands.
    """

    enabled: Annotated[bool, boolean] = True
    interval_s: Annotated[float, float_at_least(0.1)] = 2.0
    device_timeout_s: Annotated[float, float_at_least(1.0)] = 900.0
    command_ttl_s: Annotated[float, _command_ttl] = 900.0


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """How the ledger credits work (``edge.fleet.credit``).

    Attributes:
        ceiling_per_s: the inferences per second a box can do with a model ``ceilings`` does not name; claims beyond
            ``ceiling x 3600`` in one hour of a box's timeline are flagged ``over_ceiling``, not credited.
        ceilings: per model, by name (every version) or id (``name@version``): inferences per second.
    """

    ceiling_per_s: Annotated[float, _ceiling] = 1000.0
    ceilings: Annotated[Mapping[str, float], _ceilings] = field(default_factory=dict)

    def rules(self) -> CreditRules:
        """The crediting rules these settings make."""
        return CreditRules(ceiling_per_s=self.ceiling_per_s, ceilings=dict(self.ceilings))


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole gateway configuration."""

    gateway: IngestConfig = field(default_factory=IngestConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def fleet_path(self, p: Path) -> Path:
        """A path from the configuration: relative ones live in the fleet directory."""
        return p if p.is_absolute() else self.gateway.fleet_dir / p

    @property
    def store_url(self) -> str:
        """The store URL, the default filled in."""
        return self.gateway.store or default_store_url(self.gateway.fleet_dir)


def default_store_url(fleet_dir: Path) -> str:
    """The default store of a fleet directory: SQLite at ``<fleet_dir>/fleet.db``."""
    return f"sqlite:///{(fleet_dir / 'fleet.db').resolve()}"


def parse_gateway_config(data: Mapping[str, Any]) -> GatewayConfig:
    """Validate a parsed TOML document into a ``GatewayConfig``.

    Args:
        data: the document as ``tomllib`` returns it.

    Returns:
        The frozen configuration, defaults filled in.

    Raises:
        ConfigError: a key is unknown or a value is invalid; the message names the key.
    """
    return parse_document(GatewayConfig, data)


def _store_in(fleet: Path, url: str) -> str:
    """``gateway.store`` with a relative SQLite path (``sqlite:fleet.db``, ``fleet.db``) made one in ``fleet``."""
    if not url or url.startswith(("postgresql://", "postgres://")):
        return url
    scheme, sep, _ = url.partition("://")
    if sep and scheme != "sqlite":
        return url  # open_store refuses it, naming the scheme
    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url.removeprefix("sqlite:")
    if path == ":memory:" or Path(path).is_absolute():
        return url
    return f"sqlite:///{fleet / path}"


def load_gateway_config(path: str | os.PathLike[str], *, resolve_id: bool = True) -> GatewayConfig:
    """Read and validate the gateway's TOML configuration; a relative ``fleet_dir`` is taken from the file's directory.

    Relative paths in the file do not depend on the working directory: ``gateway.fleet_dir`` is resolved against the
    file's directory, and ``broker.ca``, ``cert``, ``key`` (``fleet_path``) and a relative SQLite ``gateway.store``
    against the fleet directory.

    Args:
        path: the TOML file.
        resolve_id: check ``gateway.id`` against the CN of ``broker.cert`` and take the CN when it is empty (reads
            the certificate). ``edge fleet command``, which connects with an identity of its own, passes False.

    Raises:
        ConfigError: the file is missing, is not valid TOML, or a value is invalid; the gateway's certificate is
            unreadable, or its CN is not ``gateway.id``.
    """
    p = Path(path)
    cfg = parse_gateway_config(read_toml(p))
    fleet = cfg.gateway.fleet_dir
    if not fleet.is_absolute():
        fleet = p.resolve().parent / fleet
    cfg = replace(cfg, gateway=replace(cfg.gateway, fleet_dir=fleet, store=_store_in(fleet, cfg.gateway.store)))
    if not resolve_id:
        return cfg
    cert = cfg.fleet_path(cfg.broker.cert)
    cn = certificate_cn(cert)
    if cfg.gateway.id and cfg.gateway.id != cn:
        raise ConfigError(
            "gateway.id",
            cfg.gateway.id,
            f"the CN of broker.cert ({cert}), {cn!r}: the broker makes the certificate's CN the client id, so each "
            f"gateway process needs a certificate of its own. Remove gateway.id to run as {cn!r}, or issue one with "
            f"`edge fleet ca issue-client {cfg.gateway.id}` and point broker.cert and broker.key at it",
        )
    return replace(cfg, gateway=replace(cfg.gateway, id=cn))


_MAX_CERT_BYTES = 64 * 1024


def certificate_cn(path: Path) -> str:
    """The subject CN of the gateway's certificate (``broker.cert``): its identity.

    Args:
        path: the certificate.

    Returns:
        The CN.

    Raises:
        ConfigError: the file is unreadable, not a PEM certificate, or has no single CN; the message names the path
            and how to issue one.
    """
    from cryptography import x509  # noqa: PLC0415 -- loaded only when a certificate is read
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    fix = "a client certificate from `edge fleet ca issue-client NAME` (its CN is the identity)"
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_CERT_BYTES + 1)
        if len(data) > _MAX_CERT_BYTES:
            raise ValueError(f"larger than {_MAX_CERT_BYTES} bytes")
        names = x509.load_pem_x509_certificate(data).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except OSError as e:
        raise ConfigError("broker.cert", str(path), f"{fix}; it cannot be read ({e.strerror})") from e
    except ValueError as e:
        raise ConfigError("broker.cert", str(path), f"{fix}; it is not a PEM certificate ({e})") from e
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        raise ConfigError("broker.cert", str(path), f"{fix}; it has no single CN")
    return names[0].value

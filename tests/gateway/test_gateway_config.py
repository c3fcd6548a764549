"""The gateway configuration: defaults, every key validated by name, paths relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.gateway.config import load_gateway_config, parse_gateway_config
from edge.gateway.service import subscriptions


def test_defaults_and_store_url_in_the_fleet_dir(tmp_path: Path) -> None:
    p = tmp_path / "gateway.toml"
    p.write_text('[gateway]\nfleet_dir = "fleet"\n')
    cfg = load_gateway_config(p)
    assert cfg.gateway.fleet_dir == tmp_path / "fleet"
    assert cfg.store_url == f"sqlite:///{tmp_path / 'fleet' / 'fleet.db'}"
    assert cfg.fleet_path(cfg.broker.cert) == tmp_path / "fleet" / "gateway" / "gateway.pem"
    assert cfg.metrics.host == "127.0.0.1"  # metrics stay on loopback unless the operator says otherwise


def test_explicit_store_url_and_absolute_paths_are_kept(tmp_path: Path) -> None:
    cfg = parse_gateway_config(
        {"gateway": {"store": "postgresql://edge@db/fleet"}, "broker": {"ca": "/etc/edge-fleet/ca.pem"}}
    )
    assert cfg.store_url == "postgresql://edge@db/fleet"
    assert cfg.fleet_path(cfg.broker.ca) == Path("/etc/edge-fleet/ca.pem")


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"gateway": {"batch_max": 0}}, "gateway.batch_max"),
        ({"gateway": {"batch_max": 10_000}}, "gateway.batch_max"),
        ({"gateway": {"share_group": "a/b"}}, "gateway.share_group"),
        ({"gateway": {"receive_maximum": 70_000}}, "gateway.receive_maximum"),
        ({"gateway": {"store": 5}}, "gateway.store"),
        ({"broker": {"port": 0}}, "broker.port"),
        ({"broker": {"prot": 8883}}, "broker.prot"),
        ({"metrics": {"enabled": "yes"}}, "metrics.enabled"),
        ({"log": {"level": "loud"}}, "log.level"),
        ({"gatway": {}}, "gatway"),
    ],
)
def test_bad_values_name_the_key(doc: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_gateway_config(doc)
    assert e.value.key == key


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="existing configuration file"):
        load_gateway_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_gateway_config(bad)


def test_telemetry_is_shared_and_status_is_not() -> None:
    subs = subscriptions("ingest")
    assert subs == ["$share/ingest/devices/+/telemetry", "devices/+/status"]

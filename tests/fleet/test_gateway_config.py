"""The gateway configuration: defaults, every key validated by name, paths relative to the file."""

from __future__ import annotations

import datetime
import re
import tomllib
from pathlib import Path

import pytest

from edge._fs import atomic_write
from edge.errors import ConfigError
from edge.fleet.config import GatewayConfig, load_gateway_config, parse_gateway_config
from edge.fleet.gateway import subscriptions
from edge.fleet.pki.ca import FleetCA
from edge.toml_config import section_types, settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def issue_gateway_cert(fleet: Path, name: str, file: str = "gateway") -> Path:
    """A gateway certificate with CN ``name`` at ``<fleet>/gateway/<file>.pem`` (as `edge fleet ca issue-client`)."""
    now = datetime.datetime.now(datetime.UTC)
    ca = FleetCA.load(fleet) if (fleet / "ca.pem").exists() else FleetCA.init(fleet, now=now)
    cert, key = ca.issue_client(name, now=now, days=1)
    (fleet / "gateway").mkdir(exist_ok=True)
    atomic_write(fleet / "gateway" / f"{file}.pem", cert)
    atomic_write(fleet / "gateway" / f"{file}.key", key, mode=0o600)
    return fleet / "gateway" / f"{file}.pem"


def test_defaults_and_store_url_in_the_fleet_dir(tmp_path: Path) -> None:
    issue_gateway_cert(tmp_path / "fleet", "gateway")
    p = tmp_path / "gateway.toml"
    p.write_text('[gateway]\nfleet_dir = "fleet"\n')
    cfg = load_gateway_config(p)
    assert cfg.gateway.id == "gateway"  # the CN of broker.cert
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


def test_gateway_id_is_the_certificates_cn(tmp_path: Path) -> None:
    issue_gateway_cert(tmp_path / "fleet", "gateway-2", file="gateway-2")
    p = tmp_path / "gateway.toml"
    p.write_text(
        '[gateway]\nfleet_dir = "fleet"\n[broker]\ncert = "gateway/gateway-2.pem"\nkey = "gateway/gateway-2.key"\n'
    )
    assert load_gateway_config(p).gateway.id == "gateway-2"
    p.write_text(p.read_text().replace("[gateway]\n", '[gateway]\nid = "gateway-2"\n'))
    assert load_gateway_config(p).gateway.id == "gateway-2"


def test_gateway_id_other_than_the_certificates_cn_refused(tmp_path: Path) -> None:
    # The broker makes the CN the client id: a second process with the same certificate would take over the first's
    # session, so an id that is not the CN is a configuration error, not something to discover at run time.
    issue_gateway_cert(tmp_path / "fleet", "gateway")
    p = tmp_path / "gateway.toml"
    p.write_text('[gateway]\nid = "gateway-2"\nfleet_dir = "fleet"\n')
    with pytest.raises(ConfigError) as e:
        load_gateway_config(p)
    assert e.value.key == "gateway.id"
    assert "'gateway'" in str(e.value) and "edge fleet ca issue-client gateway-2" in str(e.value)
    assert load_gateway_config(p, resolve_id=False).gateway.id == "gateway-2"  # edge fleet command needs no CN


def test_missing_gateway_certificate_names_the_path_and_the_fix(tmp_path: Path) -> None:
    p = tmp_path / "gateway.toml"
    p.write_text('[gateway]\nfleet_dir = "fleet"\n')
    with pytest.raises(ConfigError) as e:
        load_gateway_config(p)
    assert e.value.key == "broker.cert" and e.value.value == str(tmp_path / "fleet" / "gateway" / "gateway.pem")
    assert "edge fleet ca issue-client" in str(e.value)
    (tmp_path / "fleet" / "gateway").mkdir(parents=True)
    (tmp_path / "fleet" / "gateway" / "gateway.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        load_gateway_config(p)


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


# The example in docs/gateway.md shows every key at its default, except these, which show a typical value.
EXAMPLE_VALUES = {"gateway.id", "gateway.fleet_dir", "broker.cert", "broker.key", "ledger.ceilings"}


def _documented_example() -> dict[str, dict[str, object]]:
    text = (DOCS / "gateway.md").read_text(encoding="utf-8")
    m = re.search(r"## Running the gateway\n.*?```toml\n(.*?)```", text, re.S)
    assert m, "docs/gateway.md has an example configuration under 'Running the gateway'"
    return tomllib.loads(m.group(1))


def test_the_documented_example_states_every_key_at_its_default() -> None:
    doc = _documented_example()
    parse_gateway_config(doc)  # valid as documented
    spec = {f"{name}.{s.key}": s for name, section in section_types(GatewayConfig).items() for s in settings(section)}
    shown = {f"{name}.{key}": v for name, table in doc.items() for key, v in table.items()}
    assert shown.keys() == spec.keys(), {
        "undocumented": sorted(spec.keys() - shown.keys()),
        "not in the spec": sorted(shown.keys() - spec.keys()),
    }
    for key, value in shown.items():
        converted = spec[key].convert(key, value)
        if key in EXAMPLE_VALUES:
            assert converted != spec[key].default, f"{key} is at its default: drop it from EXAMPLE_VALUES"
        else:
            assert converted == spec[key].default, (key, value, spec[key].default)


def test_every_unknown_key_is_named_at_once_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as e:
        parse_gateway_config({"broker": {"prot": 8883, "hots": "h", "port": 0}, "rollout": {"interval": 2}})
    assert e.value.key == "broker.hots"
    text = str(e.value)
    assert "no such key (did you mean 'broker.host'?)" in text
    assert "'broker.prot': got 8883, expected no such key (did you mean 'broker.port'?)" in text
    assert "'rollout.interval': got 2, expected no such key (did you mean 'rollout.interval_s'?)" in text
    assert "'broker.port': got 0, expected a TCP port" in text  # the bad values too, after the unknown keys

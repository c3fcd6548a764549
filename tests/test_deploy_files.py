"""What operators deploy beside the gateway (deploy/): the systemd unit and user, the Prometheus alert rules and the
Grafana dashboard. Each is checked by the tool that will read it (systemd-analyze, promtool) or as Grafana loads it,
and every metric they use must be one the gateway defines (tests/fleet/test_gateway_ops.py checks a live scrape)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from deploy_metrics import (
    DASHBOARD,
    PROMETHEUS_SERIES,
    ROOT,
    RULES,
    RULES_TEST,
    dashboard,
    dashboard_exprs,
    promtool,
    rule_exprs,
    used_metrics,
)

from edge.fleet.device_gauges import DEVICE_METRICS
from edge.fleet.metrics import GatewayMetrics

UNIT = ROOT / "deploy" / "systemd" / "edge-gateway.service"
SYSUSERS = ROOT / "deploy" / "systemd" / "edge-gateway.sysusers.conf"


def unit_sections(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def defined_metrics() -> set[str]:
    """Every sample name the gateway's registry and its per-box collector can expose (also of a labelled metric
    that has no sample yet), by the exposition's suffixes per type."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    families = [(f.name, f.type) for f in GatewayMetrics().registry.collect()]
    families += [(name, kind) for name, (_doc, kind) in DEVICE_METRICS.items()]
    return {name + suffix for name, kind in families for suffix in suffixes[kind]}


def test_gateway_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: run tools/bootstrap.sh (it installs systemd)"
    text = UNIT.read_text()
    assert "ExecStart=/opt/edge/bin/edge gateway run --config /etc/edge/gateway.toml" in text.splitlines()
    # verify insists that ExecStart exists: the documented /opt/edge/bin/edge is this interpreter's `-m edge` here.
    unit = tmp_path / "edge-gateway.service"
    unit.write_text(text.replace("/opt/edge/bin/edge gateway", f"{sys.executable} -m edge gateway"))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no warnings either


def test_a_broken_unit_fails_the_same_verify(tmp_path: Path) -> None:
    # The check above can fail: a misspelt directive is reported.
    unit = tmp_path / "edge-gateway.service"
    text = UNIT.read_text().replace("/opt/edge/bin/edge gateway", f"{sys.executable} -m edge gateway")
    unit.write_text(text.replace("Restart=on-failure", "Restart=on-failur"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert "on-failur" in proc.stderr


def test_gateway_unit_notifies_restarts_owns_its_state_and_is_hardened() -> None:
    u = unit_sections(UNIT.read_text())
    unit, svc = u["Unit"], u["Service"]
    assert "StartLimitIntervalSec" in unit and "StartLimitBurst" in unit  # they belong in [Unit]
    assert "network-online.target" in unit["After"] and "mosquitto.service" in unit["After"]
    # edge gateway run sends READY=1 once connected and feeds the watchdog while ingest turns (edge/fleet/gateway.py).
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main" and int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure"
    assert svc["User"] == svc["Group"] == "edge-gateway"
    assert svc["StateDirectory"] == "edge-fleet" and svc["StateDirectoryMode"] == "0700" and svc["UMask"] == "0077"
    assert svc["ProtectSystem"] == "strict" and svc["ProtectHome"] == "yes"
    for flag in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "RestrictSUIDSGID", "LockPersonality"):
        assert svc[flag] == "yes", flag
    assert svc["CapabilityBoundingSet"] == "" and svc["AmbientCapabilities"] == ""
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_sysusers_makes_the_units_user_with_the_fleet_directory_as_home() -> None:
    svc = unit_sections(UNIT.read_text())["Service"]
    (line,) = [x for x in SYSUSERS.read_text().splitlines() if x and not x.startswith("#")]
    kind, name, uid, *_gecos, home = line.split()
    assert (kind, name, uid) == ("u", svc["User"], "-")
    assert home == f"/var/lib/{svc['StateDirectory']}"


def test_alert_rules_pass_promtool_check() -> None:
    proc = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_rules_unit_tests_pass() -> None:
    proc = subprocess.run(
        [promtool(), "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_catches_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "rules.yml"
    broken.write_text(RULES.read_text().replace("edge_gateway_connected == 0", "edge_gateway_connected =="))
    proc = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0


def test_alerts_cover_what_operators_are_paged_for() -> None:
    doc = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    wanted = {
        "EdgeGatewayDown": "up{",
        "EdgeGatewayBrokerDisconnected": "edge_gateway_connected",
        "EdgeGatewayRejectsRising": "edge_gateway_rejects_total",
        "EdgeBoxGapsRising": "edge_gateway_device_gaps",
        "EdgeBoxOffline": "edge_gateway_device_online",
        "EdgeRolloutAborted": 'state="aborted"',
        "EdgeTufTimestampExpiring": "edge_gateway_tuf_timestamp_expiry_timestamp_seconds",
    }
    for name, needle in wanted.items():
        assert name in alerts and needle in alerts[name]["expr"], name
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_metric_the_rules_and_dashboard_use_is_one_the_gateway_defines() -> None:
    defined = defined_metrics()
    for where, exprs in (("edge-rules.yml", rule_exprs()), ("edge-gateway.json", dashboard_exprs())):
        used = used_metrics(exprs) - PROMETHEUS_SERIES
        assert used, where
        assert used <= defined, f"{where} uses metrics the gateway does not export: {sorted(used - defined)}"


def test_dashboard_loads_with_the_fields_grafana_requires() -> None:
    d = dashboard()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["title"] and d["uid"] and isinstance(d["panels"], list) and d["panels"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["title"] and p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"] for t in p["targets"]), p["title"]
    # No two panels overlap on the grid (Grafana would push one down: a layout that is not the one checked in).
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine
    assert DASHBOARD.read_text().endswith("\n")


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses every expression of a rule file: the dashboard's queries become recording rules.
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(dashboard_exprs())]}
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr

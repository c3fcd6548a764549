"""What the deploy files (deploy/prometheus, deploy/grafana) ask of the gateway's metrics, for the tests that check
them: the PromQL expressions they hold, the metric names those use, the names an exposition offers, and promtool."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "edge-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "edge-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "edge-gateway.json"
# Series Prometheus makes itself, not the gateway.
PROMETHEUS_SERIES = {"up"}
_METRIC = re.compile(r"\b(edge_[a-z0-9_]+|up)\b(?!\s*\()")


def promtool() -> str:
    """The promtool on PATH, or the one tools/bootstrap.sh unpacks into .cache/promtool; fails the test if neither."""
    found = shutil.which("promtool") or str(ROOT / ".cache" / "promtool" / "usr" / "bin" / "promtool")
    assert Path(found).is_file(), "promtool is missing: run tools/bootstrap.sh (it unpacks it into .cache/promtool)"
    return found


def rule_exprs() -> list[str]:
    """The expression of every alerting or recording rule in edge-rules.yml."""
    doc = yaml.safe_load(RULES.read_text())
    return [str(r["expr"]) for g in doc["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    """Every panel target's PromQL, with Grafana's variables replaced by what they stand for."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append(target["expr"].replace("$__rate_interval", "5m").replace("$instance", ".*"))
    return out


def used_metrics(exprs: list[str]) -> set[str]:
    """The metric names the expressions select (label values and function names left out)."""
    names = set()
    for expr in exprs:
        without_strings = re.sub(r'"[^"]*"', '""', expr)
        names.update(_METRIC.findall(without_strings))
    return names


def exposed_metrics(exposition: str) -> set[str]:
    """The sample names of a Prometheus text exposition (``/metrics``)."""
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0] for line in exposition.splitlines() if line and not line.startswith("#")
    }

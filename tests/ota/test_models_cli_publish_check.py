"""``edge fleet models publish`` runs the release's golden samples and latency budget before it signs.

Real processes, a real repository, the real models: a release whose outputs are wrong (scrambled weights, golden
samples of the good model) or whose budget this machine misses is refused with exit 3 and nothing is signed or
copied; ``--force`` signs it anyway with a warning; ``--requires`` sets the runtime minimums in the signed manifest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from repo_helpers import PUBLISHER, digits_release_files, make_golden, make_publisher_key

from edge.fleet.models.repository import FleetRepository

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "models"))

import ota_models  # noqa: E402


def _edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )


class Publisher:
    def __init__(self, tmp: Path) -> None:
        self.fleet = tmp / "fleet"
        self.work = tmp / "work"
        assert _edge("fleet", "--dir", str(self.fleet), "models", "init").returncode == 0
        _key, pub = make_publisher_key(self.work, PUBLISHER)
        added = _edge("fleet", "--dir", str(self.fleet), "publishers", "add", PUBLISHER, str(pub), "--models", "digits")
        assert added.returncode == 0, added.stderr
        self.good = digits_release_files(self.work, "2.0.0")
        self.golden = make_golden(self.good, self.work / "golden.npz", n=4)

    def publish(self, model: Path, version: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return _edge(
            "fleet", "--dir", str(self.fleet), "models", "publish", str(model), "--name", "digits",
            "--version", version, "--publisher", PUBLISHER, "--key", str(self.work / f"{PUBLISHER}.pem"), *extra,
        )  # fmt: skip

    def releases(self) -> list[str]:
        return [m.model_id for m in FleetRepository.load(self.fleet).releases()]


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    return Publisher(tmp_path)


def _error_line(run: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("edge: ")]
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_wrong_outputs_are_refused_before_signing(publisher: Publisher) -> None:
    bad = ota_models.broken(publisher.good, publisher.work / "bad.onnx", "3.0.0")
    run = publisher.publish(bad, "3.0.0", "--golden", str(publisher.golden))
    assert run.returncode == 3, run.stderr
    line = _error_line(run)
    assert "digits@3.0.0" in line and "wrong_outputs" in line and "nothing was signed" in line, line
    assert "sample " in line and "--force" in line, line  # names the sample that failed, and the way past
    assert publisher.releases() == []
    assert not (publisher.fleet / "repository" / "targets" / "digits" / "3.0.0").exists()  # nothing copied either

    forced = publisher.publish(bad, "3.0.0", "--golden", str(publisher.golden), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "--force" in forced.stderr and "warning" in forced.stderr
    assert publisher.releases() == ["digits@3.0.0"]


def test_a_missed_latency_budget_names_measured_and_budget(publisher: Publisher) -> None:
    run = publisher.publish(publisher.good, "2.0.0", "--golden", str(publisher.golden), "--latency-budget-ms", "1e-6")
    assert run.returncode == 3, run.stderr
    line = _error_line(run)
    assert "too_slow" in line and "p50" in line and "exceeds the budget of 1e-06 ms" in line, line
    assert publisher.releases() == []


def test_a_good_release_is_checked_then_signed_with_its_requirements(publisher: Publisher) -> None:
    run = publisher.publish(
        publisher.good, "2.0.0", "--golden", str(publisher.golden), "--latency-budget-ms", "5000",
        "--requires", "onnxruntime=1.10",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "checked here: golden max error" in run.stdout and "p50" in run.stdout, run.stdout
    assert "warning" not in run.stderr
    listed = json.loads(_edge("fleet", "--dir", str(publisher.fleet), "models", "list", "--json").stdout)
    assert listed[0]["requires"]["onnxruntime"] == "1.10"  # the publisher's minimum, not this machine's version

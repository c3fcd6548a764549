"""`edge ota` beside a running `edge run`: real processes, a real served repository, a real data directory.

- update and revert refuse while the service runs (it would keep serving the old model), naming the pid and the lock;
- once the service stops, the same update commits;
- a blank ``[ota] repository`` keeps the committed model running (updates off, the slot still used);
- a model of another name needs ``--replace``; ``edge ota status`` without a configuration says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from box_helpers import utc_now
from repo_helpers import ready_repository
from static_server import StaticServer

from edge.ota.owner import owner_lock_path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Served:
    url: str
    root: Path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """digits 1.0.0 and 2.0.0 (golden samples), signed now, served on loopback; the trusted root in a file."""
    repo, _key = ready_repository(tmp_path / "fleet", now=utc_now(), versions=("1.0.0", "2.0.0"))
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes())
    with StaticServer(repo.repository_dir) as server:
        yield Served(server.url, root)


def _config(tmp_path: Path, data_dir: Path, repository: str, name: str = "edge.toml") -> Path:
    cfg = tmp_path / name
    cfg.write_text(
        f'[device]\ndata_dir = "{data_dir}"\n'
        f'[source]\nkind = "synthetic"\nfps = 50\n'
        f'[sink]\npath = "{tmp_path / "records.jsonl"}"\n'
        f'[ota]\nrepository = "{repository}"\ncheck_interval_s = 3600\n'
        '[log]\nformat = "json"\n',
        encoding="utf-8",
    )
    return cfg


def _edge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Service:
    proc: subprocess.Popen[str]
    records: Path

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _, stderr = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, stderr
        return stderr


def _start(cfg: Path, records: Path) -> Service:
    """``edge run`` in the background, once it has written its first record (the lock is held by then)."""
    records.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--config", str(cfg)], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (records.exists() and records.stat().st_size > 0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"edge run wrote no record; exit {proc.poll()}:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    return Service(proc, records)


def _models(records: Path) -> set[str]:
    return {json.loads(line)["model"] for line in records.read_text().splitlines() if line.strip()}


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("edge: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_update_and_revert_refuse_while_the_service_runs_then_update_after_it_stops(
    tmp_path: Path, served: Served
) -> None:
    data_dir = tmp_path / "box"
    cfg = _config(tmp_path, data_dir, served.url)
    ota = ["--config", str(cfg), "--root", str(served.root)]
    service = _start(cfg, tmp_path / "records.jsonl")
    try:
        lock = owner_lock_path(data_dir)
        for action in (["update", "digits", "2.0.0"], ["revert"], ["check"]):
            run = _edge("ota", *action, *ota)
            assert run.returncode == 1, (action, run.stdout, run.stderr)
            line = _one_error_line(run)
            assert f"the edge service is running (pid {service.proc.pid} holds {lock})" in line, line
            assert "systemctl stop edge" in line and "edge fleet rollout start" in line, line
        # Nothing changed on disk: no update was started, the service still runs the factory model.
        assert not (data_dir / "models").exists()
        assert not (data_dir / "ota" / "state.json").exists()
    finally:
        service.stop()
    assert _models(service.records) == {"digits@1.0.0"}

    # The service is gone, and so is its lock: the same command now installs the release.
    run = _edge("ota", "update", "digits", "2.0.0", *ota, "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["state"] == "committed"


def test_the_service_refuses_to_start_while_edge_ota_holds_the_slots(tmp_path: Path) -> None:
    data_dir = tmp_path / "box"
    cfg = _config(tmp_path, data_dir, "")
    # A real process holding the lock as `edge ota update` does while it installs.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from edge.ota.owner import acquire; "
            "lock = acquire(Path(sys.argv[1]), 'edge-ota'); print('held', flush=True); time.sleep(60)",
            str(data_dir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        run = _edge("run", "--config", str(cfg), "--frames", "5")
        assert run.returncode == 1, run.stderr
        line = _one_error_line(run)
        assert f"pid {holder.pid} holds {owner_lock_path(data_dir)}" in line and "edge ota" in line, line
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # A killed holder leaves its file behind but not its lock: the service starts.
    assert owner_lock_path(data_dir).exists()
    run = _edge("run", "--config", str(cfg), "--frames", "5")
    assert run.returncode == 0, run.stderr


def test_blank_repository_keeps_serving_the_committed_model(tmp_path: Path, served: Served) -> None:
    data_dir = tmp_path / "box"
    run = _edge(
        "ota", "update", "digits", "2.0.0", "--data-dir", str(data_dir), "--repo-url", served.url,
        "--root", str(served.root), "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    # Updates off: the operator blanked the repository. The committed 2.0.0 must still be what runs.
    cfg = _config(tmp_path, data_dir, "", name="blank.toml")
    records = tmp_path / "records.jsonl"
    run = _edge("run", "--config", str(cfg), "--frames", "10")
    assert run.returncode == 0, run.stderr
    assert _models(records) == {"digits@2.0.0"}
    assert "running the committed model" in run.stderr
    # And `edge ota status` of that configuration describes the committed slot, not a factory box.
    st = _edge("ota", "status", "--config", str(cfg), "--json")
    assert st.returncode == 0, st.stderr
    body = json.loads(st.stdout)
    assert (body["active"]["slot"], body["active"]["model"]) == ("a", "digits@2.0.0")


def test_update_of_another_model_needs_replace(tmp_path: Path, served: Served) -> None:
    data_dir = tmp_path / "box"
    common = ["--data-dir", str(data_dir), "--repo-url", served.url, "--root", str(served.root)]
    run = _edge("ota", "update", "letters", "1.0.0", *common)
    assert run.returncode == 2, run.stderr
    line = _one_error_line(run)
    assert "letters@1.0.0" in line and "digits@1.0.0" in line and "--replace" in line, line
    assert not (data_dir / "ota" / "state.json").exists()  # refused before anything started
    # With --replace the name check is passed; this repository has no such model, so the update is refused by it.
    run = _edge("ota", "update", "letters", "1.0.0", *common, "--replace", "--json")
    assert run.returncode == 1, run.stderr
    assert "--replace" not in run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["reason"] == "not_found"


def test_status_without_a_configuration_says_so(tmp_path: Path) -> None:
    env_default = Path("/etc/edge/edge.toml")
    if env_default.exists():
        pytest.skip(f"{env_default} exists on this machine")
    run = subprocess.run(
        [sys.executable, "-m", "edge", "ota", "status"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2, run.stderr
    line = _one_error_line(run)
    assert str(env_default) in line and "--config" in line, line
    assert run.stdout == ""  # no description of a (healthy, factory) box

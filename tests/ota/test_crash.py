"""Crash safety: ``python -m edge ota update`` is killed with SIGKILL at every fault point of the installer, then
the box restarts. At every point the active model must be valid (loads; its bytes are what its manifest or the
factory says; never a partial file), and the restarted updater must end committed or rolled back.

One repository and one loopback server serve the whole module; each case has its own box data directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from box_helpers import FACTORY, assert_valid_active, make_updater, utc_now
from repo_helpers import DIGITS_FP32, PUBLISHER, digits_release_files, make_golden, ready_repository
from static_server import StaticServer

from edge.fleet.models.repository import FleetRepository
from edge.ota._faults import FAULT_POINTS, HALT_ENV
from edge.ota.state import StateFile

ROOT = Path(__file__).resolve().parents[2]
# Points only a failing update reaches: those cases install 3.0.0, which needs onnxruntime 999 (rolled back).
FAILING = {"state.rolled_back.written", "state.rolled_back.renamed", "rollback.slot_cleared"}


@dataclass
class Served:
    repo: FleetRepository
    server: StaticServer
    root_file: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    d = tmp_path_factory.mktemp("fleet")
    now = utc_now()  # the subprocess boxes check expiry against the wall clock
    repo, key = ready_repository(d, now=now, versions=("1.0.0", "2.0.0"))
    v3 = digits_release_files(d / "work", "3.0.0")
    repo.publish(
        v3,
        name="digits",
        version="3.0.0",
        publisher=PUBLISHER,
        publisher_key=key,
        now=now,
        golden=make_golden(v3, d / "work" / "golden-3.npz"),
        requires={"onnxruntime": "999"},
    )
    # 5.0.0 is the float model (192 kB: three of the server's 64 kB chunks, so a throttled download can be cut).
    v5 = digits_release_files(d / "work", "5.0.0", source=DIGITS_FP32)
    repo.publish(
        v5,
        name="digits",
        version="5.0.0",
        publisher=PUBLISHER,
        publisher_key=key,
        now=now,
        golden=make_golden(v5, d / "work" / "golden-5.npz"),
    )
    root_file = d / "root.json"
    root_file.write_bytes(repo.root_bytes())
    with StaticServer(repo.repository_dir) as server:
        yield Served(repo, server, root_file)


def _start_update(served: Served, data_dir: Path, version: str, halt_at: str | None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != HALT_ENV}
    if halt_at is not None:
        env[HALT_ENV] = halt_at
    args = ["ota", "update", "digits", version, "--data-dir", str(data_dir), "--repo-url", served.server.url]
    args += ["--root", str(served.root_file), "--factory", str(FACTORY), "--json"]
    return subprocess.Popen(
        [sys.executable, "-m", "edge", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_halt(proc: subprocess.Popen[str], point: str, timeout: float = 60.0) -> None:
    """Read stderr until the process announces it halted at ``point`` (it then sleeps until killed)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line == "" and proc.poll() is not None:
            break
        seen.append(line)
        if line.strip() == f"HALT {point}":
            return
    proc.kill()
    pytest.fail(f"the update never reached {point}; exit {proc.poll()}; stderr:\n{''.join(seen)[-3000:]}")


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # a power cut: no finally blocks, no flushes
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if proc.stderr is not None:
        proc.stderr.close()


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_kill_at_fault_point_then_restart(point: str, tmp_path: Path, served: Served) -> None:
    failing = point in FAILING
    data_dir = tmp_path / "box"
    proc = _start_update(served, data_dir, "3.0.0" if failing else "2.0.0", point)
    _wait_for_halt(proc, point)
    _kill(proc)

    # After the crash, before any recovery: the box runs a valid model, old or new.
    before = assert_valid_active(data_dir)
    assert before.slot == "factory" or before.manifest.model_id == "digits@2.0.0"  # type: ignore[union-attr]

    # The restart: the service's updater recovers (what `edge ota check` runs first), then a check.
    up, _ = make_updater(data_dir, served.server.url, served.root_file.read_bytes())
    up.check()

    st = StateFile(data_dir / "ota" / "state.json").load()
    active = assert_valid_active(data_dir)
    assert st.state in ("idle", "committed", "rolled_back")
    if failing:
        assert (st.state, st.reason, active.slot) == ("rolled_back", "incompatible", "factory")
        assert "digits@3.0.0" in st.failed
        assert list((data_dir / "models" / "a").iterdir()) == []
    elif st.model_id is None:
        # Killed before the first transition reached the disk: the box never started the update.
        assert active.slot == "factory"
    else:
        assert (st.state, st.reason) == ("idle", None)
        assert (active.slot, active.manifest.model_id) == ("a", "digits@2.0.0")  # type: ignore[union-attr]
    assert not list((data_dir / "ota").glob(".*.tmp"))


def test_cli_check_recovers_an_interrupted_trial(tmp_path: Path, served: Served) -> None:
    data_dir = tmp_path / "box"
    proc = _start_update(served, data_dir, "2.0.0", "trial.passed")
    _wait_for_halt(proc, "trial.passed")
    _kill(proc)
    common = ["--data-dir", str(data_dir), "--repo-url", served.server.url, "--root", str(served.root_file)]
    common += ["--factory", str(FACTORY), "--json"]
    run = subprocess.run(
        [sys.executable, "-m", "edge", "ota", "check", *common],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert '"state": "committed"' in run.stdout and '"model": "digits@2.0.0"' in run.stdout
    status = subprocess.run(
        [sys.executable, "-m", "edge", "ota", "status", *common],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert '"slot": "a"' in status.stdout and '"state": "idle"' in status.stdout


def test_power_cut_mid_download_resumes_remainder(tmp_path: Path, served: Served) -> None:
    data_dir = tmp_path / "box"
    manifest = next(m for m in served.repo.releases("digits") if m.version == "5.0.0")
    target = f"{manifest.sha256}.model.onnx"
    before = served.server.bytes_sent(target)
    # The server paces between its 64 kB chunks: the first arrives at once, the second 0.4 s later.
    served.server.throttle(150_000)
    try:
        proc = _start_update(served, data_dir, "5.0.0", None)
        partial = data_dir / "ota" / "downloads" / "partial"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = list(partial.glob("*.part")) if partial.is_dir() else []
            if parts and parts[0].stat().st_size >= manifest.length // 3:
                break
            assert proc.poll() is None, "the update ended before the cut"
            time.sleep(0.01)  # polling a file that another process grows; no event to wait on
        else:
            pytest.fail("the download never reached a third of the model")
        _kill(proc)
    finally:
        served.server.clear()
    kept = next(partial.glob("*.part")).stat().st_size
    assert 0 < kept < manifest.length
    assert assert_valid_active(data_dir).slot == "factory"

    up, _ = make_updater(data_dir, served.server.url, served.root_file.read_bytes())
    out = up.check()

    assert out is not None and out.state == "committed"
    assert up.trust.stats.resumes == 1  # type: ignore[attr-defined]
    sent = served.server.bytes_sent(target) - before
    assert sent <= manifest.length * 1.2, f"{sent} bytes sent for a {manifest.length}-byte model"
    assert assert_valid_active(data_dir).manifest.model_id == "digits@5.0.0"  # type: ignore[union-attr]


def test_second_interrupted_trial_rolls_back(tmp_path: Path, served: Served) -> None:
    """A candidate that kills the process during its trial is tried once more, then rolled back for good."""
    data_dir = tmp_path / "box"
    first = _start_update(served, data_dir, "2.0.0", "trial.passed")
    _wait_for_halt(first, "trial.passed")
    _kill(first)
    assert StateFile(data_dir / "ota" / "state.json").load().attempts == 1
    common = ["--data-dir", str(data_dir), "--repo-url", served.server.url, "--root", str(served.root_file)]
    env = {**os.environ, HALT_ENV: "trial.passed"}
    second = subprocess.Popen(
        [sys.executable, "-m", "edge", "ota", "check", *common, "--factory", str(FACTORY)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_halt(second, "trial.passed")
    _kill(second)
    assert StateFile(data_dir / "ota" / "state.json").load().attempts == 2

    up, rec = make_updater(data_dir, served.server.url, served.root_file.read_bytes())
    out = up.recover()

    assert out is not None and (out.state, out.reason) == ("rolled_back", "trial_interrupted")
    assert rec.kinds == ["ota.rolled_back"]
    st = StateFile(data_dir / "ota" / "state.json").load()
    assert "digits@2.0.0" in st.failed
    assert assert_valid_active(data_dir).slot == "factory"


def test_cli_refusal_revert_and_status_exit_codes(tmp_path: Path, served: Served) -> None:
    data_dir = tmp_path / "box"
    common = ["--data-dir", str(data_dir), "--repo-url", served.server.url, "--root", str(served.root_file)]
    common += ["--factory", str(FACTORY)]

    def edge(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge", "ota", *args, *common],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    refused = edge("update", "digits", "1.0.0")
    assert refused.returncode == 1 and refused.stdout.strip() == "refused: digits@1.0.0 (not_newer)"
    nothing = edge("revert")
    assert nothing.returncode == 0 and "unchanged" in nothing.stdout and "nothing_to_revert" in nothing.stdout
    assert edge("update", "digits", "2.0.0", "--rollout", "r7").returncode == 0
    reverted = edge("revert", "--reason", "rollout_aborted")
    assert reverted.returncode == 0 and reverted.stdout.startswith("rolled_back: digits@2.0.0 (rollout_aborted)")
    status = edge("status")
    assert status.returncode == 0
    assert "state:   rolled_back (rollout_aborted)" in status.stdout
    assert "active:  digits@1.0.0 (slot factory" in status.stdout
    assert "failed:  digits@2.0.0" in status.stdout
    bad = edge("update", "Digits!", "2")
    assert bad.returncode == 2 and "edge: error:" in bad.stderr

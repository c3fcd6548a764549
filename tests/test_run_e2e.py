"""`edge run` end to end: the real command line in a subprocess, as systemd or an operator starts it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tty
from pathlib import Path

import numpy as np

from edge.sensing.frames import PixelFormat
from edge.sensing.synthetic import render_test_frames

ROOT = Path(__file__).resolve().parent.parent


def log_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_run_n_frames_writes_records_and_logs_backend_and_model(edge_cli, write_config, tmp_path) -> None:
    out = tmp_path / "records.jsonl"
    cfg = write_config(f'[source]\nkind = "synthetic"\npixel_format = "YUYV"\n[sink]\npath = "{out}"\n')
    proc = edge_cli("run", "--config", str(cfg), "--frames", "25")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 25
    assert [r["seq"] for r in records] == list(range(25))
    assert all(r["type"] == "inference" and r["model"] == "digits@1.0.0" for r in records)
    logs = log_lines(proc.stderr)
    start = next(entry for entry in logs if entry["msg"] == "service starting")
    assert start["backend"].startswith("native-"), start  # CI builds the extension; a fallback must not pass
    assert start["model"] == "digits@1.0.0" and len(start["model_sha256"]) == 64
    stop = next(entry for entry in logs if entry["msg"] == "service stopped")
    assert stop["inferences"] == 25 and stop["rejected"] == 0


def test_sigterm_shuts_down_cleanly(write_config, tmp_path) -> None:
    out = tmp_path / "records.jsonl"
    cfg = write_config(f'[source]\nkind = "synthetic"\nfps = 100\n[sink]\npath = "{out}"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--config", str(cfg)], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 20
    while (not out.exists() or out.stat().st_size == 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.exists() and out.stat().st_size > 0, "no record within 20 s"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    logs = log_lines(stderr)
    assert any(e["msg"] == "shutdown requested" and e["signal"] == "SIGTERM" for e in logs)
    stop = next(e for e in logs if e["msg"] == "service stopped")
    lines = out.read_text().splitlines()
    assert stop["inferences"] == len(lines) > 0  # every inference made it out before exit
    assert all(json.loads(line)["type"] == "inference" for line in lines)


def test_malformed_files_in_a_directory_are_rejected_and_counted(edge_cli, write_config, tmp_path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    good = [f for f, _ in render_test_frames(PixelFormat.NV12, count=3)]
    np.save(frames / "00.npy", good[0])
    np.save(frames / "01.npy", np.zeros((7, 9), np.uint8))  # NV12 needs even sizes and 3/2 rows
    (frames / "02.npy").write_bytes(b"not an array")
    np.save(frames / "03.npy", good[1])
    np.save(frames / "04.npy", np.zeros((180, 160), np.float64))  # wrong dtype
    np.save(frames / "05.npy", good[2])
    out = tmp_path / "records.jsonl"
    cfg = write_config(
        f'[source]\nkind = "directory"\npath = "{frames}"\npixel_format = "NV12"\n[sink]\npath = "{out}"\n'
    )
    proc = edge_cli("run", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == [0, 2, 4]
    logs = log_lines(proc.stderr)
    assert sum(e["msg"] == "frame rejected" for e in logs) == 2
    stop = next(e for e in logs if e["msg"] == "service stopped")
    assert stop["inferences"] == 3 and stop["rejected"] == 2


def test_npz_source_with_labels(edge_cli, write_config, tmp_path) -> None:
    pairs = list(render_test_frames(PixelFormat.RGB888, count=12))
    npz = tmp_path / "frames.npz"
    np.savez(npz, frames=np.stack([f for f, _ in pairs]), labels=np.array([label for _, label in pairs]))
    out = tmp_path / "records.jsonl"
    cfg = write_config(f'[source]\nkind = "npz"\npath = "{npz}"\npixel_format = "RGB888"\n[sink]\npath = "{out}"\n')
    proc = edge_cli("run", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in records] == [label for _, label in pairs]
    stop = next(e for e in log_lines(proc.stderr) if e["msg"] == "service stopped")
    assert stop["accuracy"] >= 0.75


def test_invalid_config_exits_2_naming_the_key(edge_cli, write_config) -> None:
    cfg = write_config("[model]\nthreads = -1\n")
    proc = edge_cli("run", "--config", str(cfg))
    assert proc.returncode == 2
    assert "model.threads" in proc.stderr and "-1" in proc.stderr and "integer >= 1" in proc.stderr


def test_missing_model_exits_1_with_the_path(edge_cli, write_config, tmp_path) -> None:
    cfg = write_config(f'[model]\npath = "{tmp_path / "absent.onnx"}"\n')
    proc = edge_cli("run", "--config", str(cfg), "--frames", "1")
    assert proc.returncode == 1  # a missing input file, not a configuration error (docs/cli.md)
    assert "absent.onnx" in proc.stderr


def test_forced_numpy_backend_says_so_in_the_log(edge_cli, write_config, tmp_path) -> None:
    out = tmp_path / "records.jsonl"
    cfg = write_config(f'[sink]\npath = "{out}"\n')
    env = {"EDGE_PREPROCESS": "numpy", "EDGE_REQUIRE_NATIVE": ""}
    proc = edge_cli("run", "--config", str(cfg), "--frames", "3", env=env)
    assert proc.returncode == 0, proc.stderr
    start = next(e for e in log_lines(proc.stderr) if e["msg"] == "service starting")
    assert start["backend"] == "numpy"
    assert all(json.loads(line)["backend"] == "numpy" for line in out.read_text().splitlines())


def test_serial_sensor_board_over_a_pty(write_config, tmp_path) -> None:
    # The board emulator writes to the master side of a real pseudo-terminal; edge run opens the slave's path as it
    # would /dev/ttyUSB0, decodes frames and readings, and infers on every frame, in order, bytes intact.
    pairs = list(render_test_frames(PixelFormat.YUYV, count=8))
    npz = tmp_path / "board.npz"
    frames = np.stack([f for f, _ in pairs])
    np.savez(npz, frames=frames)
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    out = tmp_path / "records.jsonl"
    cfg = write_config(
        f'[source]\nkind = "serial"\nport = "{os.ttyname(slave)}"\npixel_format = "YUYV"\n[sink]\npath = "{out}"\n'
    )
    service = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--config", str(cfg), "--frames", "8"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Opening a serial port flushes what was buffered before: start the board once the service has its port.
        assert service.stderr is not None
        for line in service.stderr:
            if "service starting" in line:
                break
        sim = [sys.executable, str(ROOT / "tools/sim/serial_sensor.py"), "--fd", str(master), "--from-npz", str(npz)]
        board = subprocess.run(
            [*sim, "--format", "YUYV", "--readings", "1", "--fps", "50"],
            pass_fds=(master,),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert board.returncode == 0, board.stderr
        _, stderr = service.communicate(timeout=60)
    finally:
        if service.poll() is None:
            service.kill()
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)
    assert service.returncode == 0, stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    inferences = [r for r in records if r["type"] == "inference"]
    assert [r["input_sha256"] for r in inferences] == [hashlib.sha256(f.tobytes()).hexdigest() for f in frames]
    assert any(r["type"] == "reading" for r in records)

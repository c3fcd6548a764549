"""systemd integration: the unit file, sd_notify over a real socket, and a watchdog that stops on a stall."""

from __future__ import annotations

import configparser
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import numpy as np

from edge.sensing.frames import PixelFormat
from edge.sensing.synthetic import render_test_frames
from edge.systemd import Notifier, WatchdogPolicy

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "edge" / "data" / "edge.service"


def unit_sections() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(UNIT)
    return parser


def test_unit_file_passes_systemd_analyze_verify(tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: make test installs systemd"
    # verify insists that ExecStart exists; the installed /usr/bin/edge is this interpreter's `-m edge` here.
    unit = tmp_path / "edge.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/edge run", f"{sys.executable} -m edge run"))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no warnings either


def test_first_boot_enroll_unit_passes_verify_and_runs_once_as_the_service_user(tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: make test installs systemd"
    source = ROOT / "edge" / "data" / "edge-enroll.service"
    unit = tmp_path / "edge-enroll.service"
    unit.write_text(source.read_text().replace("/usr/bin/edge enroll", f"{sys.executable} -m edge enroll"))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(source.read_text())
    unit_s, svc = parser["Unit"], parser["Service"]
    # Never again once enrolled; the service's user writes the key, so the service can read it.
    assert "ConditionPathExists=!/data/edge/keys/device.pem" in source.read_text().splitlines()
    assert svc["User"] == "edge" and svc["ReadWritePaths"] == "/data/edge" and svc["Type"] == "oneshot"
    assert "Before" in unit_s and "edge.service" in unit_s["Before"]


def test_unit_declares_notify_watchdog_restart_limits_and_hardening() -> None:
    u = unit_sections()
    unit, svc = u["Unit"], u["Service"]
    assert unit["RequiresMountsFor"] == "/data"
    assert "StartLimitIntervalSec" in unit and "StartLimitBurst" in unit  # they belong in [Unit]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0 and svc["Restart"] == "on-failure"
    assert svc["User"] == "edge" and {"dialout", "video"} <= set(svc["SupplementaryGroups"].split())
    assert svc["ProtectSystem"] == "strict" and svc["ReadWritePaths"] == "/data/edge"
    for flag in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables", "RestrictSUIDSGID", "LockPersonality"):
        assert svc[flag] == "yes", flag
    assert svc["CapabilityBoundingSet"] == ""


def test_watchdog_policy_pings_only_after_progress_and_not_too_often() -> None:
    p = WatchdogPolicy(interval=1.0, last_ping=100.0)
    assert not p.due(100.5, last_progress=100.4)  # too soon
    assert p.due(101.0, last_progress=100.9)  # due and progress since the last ping
    assert not p.due(102.5, last_progress=100.9)  # due, but nothing new: a stall stops the pings
    assert p.due(103.0, last_progress=102.9)  # progress again, pings resume


def test_notifier_is_silent_outside_systemd_and_reads_the_watchdog_period() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    n.send(READY=1)  # a no-op, no error
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 1.5
    n.send(READY=1)  # the socket is missing: ignored, the service must not die of it
    n.close()
    assert Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval is None  # not our pid


def test_notifier_speaks_to_an_abstract_socket() -> None:
    name = f"edge-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.send(READY=1, STATUS="running")
        assert server.recv(4096) == b"READY=1\nSTATUS=running"
        n.close()


class NotifySocket:
    """The systemd side: a datagram socket collecting (time, message) pairs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                data = self.sock.recv(4096)
                for line in data.decode().splitlines():
                    self.messages.append((time.monotonic(), line))

    def times(self, line: str) -> list[float]:
        return [t for t, m in self.messages if m == line]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_service_notifies_ready_pings_while_frames_flow_and_stops_pinging_on_a_stall(write_config, tmp_path) -> None:
    # A serial sensor board sends 12 frames over a pty, then goes quiet with the line still open: a stuck source.
    frames = np.stack([f for f, _ in render_test_frames(PixelFormat.YUYV, count=12)])
    npz = tmp_path / "board.npz"
    np.savez(npz, frames=frames)
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    cfg = write_config(
        f'[source]\nkind = "serial"\nport = "{os.ttyname(slave)}"\npixel_format = "YUYV"\n'
        f'[sink]\npath = "{tmp_path / "records.jsonl"}"\n'
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "600000"}  # pings every 0.3 s
    service = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not notify.times("READY=1") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert notify.times("READY=1"), "no READY=1"
        sim = [sys.executable, str(ROOT / "tools/sim/serial_sensor.py"), "--fd", str(master), "--from-npz", str(npz)]
        board = subprocess.run(
            [*sim, "--format", "YUYV", "--fps", "8"], pass_fds=(master,), capture_output=True, timeout=60, check=False
        )
        quiet_from = time.monotonic()
        assert board.returncode == 0, board.stderr
        time.sleep(2.5)
        assert service.poll() is None, "the service died instead of stalling"
        service.send_signal(signal.SIGTERM)
        _, stderr = service.communicate(timeout=30)
    finally:
        if service.poll() is None:
            service.kill()
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        notify.close()
    assert service.returncode == 0, stderr
    ready = notify.times("READY=1")[0]
    pings = notify.times("WATCHDOG=1")
    flowing = [t for t in pings if ready < t <= quiet_from]
    assert len(flowing) >= 3, (len(flowing), pings)  # 12 frames over 1.5 s at one ping per 0.3 s with progress
    # After the last record at most one more ping can be due; from 0.8 s into the stall there must be none.
    assert [t for t in pings if quiet_from + 0.8 <= t <= quiet_from + 2.5] == []
    assert notify.times("STOPPING=1"), "no STOPPING=1 on shutdown"
    assert any(m.startswith("STATUS=running") for _, m in notify.messages)

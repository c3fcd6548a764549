"""The box as a system: the arm64 image booted under qemu-system-aarch64, one boot per scenario (docs/system.md).

Every assertion is on what the host observes through the guest's channels: the test agent's answers on virtio-serial
(systemctl, the journal followed as events) and the box's own records in the journal. Figures (boot-to-READY,
restart times, the security exposure) are collected in the ``figures`` fixture and printed at the end.
"""

from __future__ import annotations

import configparser
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
UNIT = "edge.service"
# systemd's catalog id of "Started <unit>": for Type=notify it is logged when READY=1 arrives.
MSG_UNIT_STARTED = "MESSAGE_ID=39f53479d3a045ac8e11786248231fbf"
RECORD = '"type":"inference"'
# The box's per-box drop-in on /data: its serial sensor board, named by the image's udev rule.
SERIAL_DROPIN = '[source]\nkind = "serial"\nport = "/dev/ttySENSOR"\n'
# What a product that knows its sensor port and its fleet's address can add in its own drop-in: a private /dev with
# only that port in it, and IP traffic to the fleet alone (here the forwarded fleet address of run.py).
PRODUCT_HARDENING = (
    "[Service]\nPrivateDevices=yes\nBindPaths=/dev/ttySENSOR\n"
    "IPAddressDeny=any\nIPAddressAllow=localhost\nIPAddressAllow=10.0.2.100/32\n"
)
# The exposure `systemd-analyze security` gives edge.service as shipped (edge/data/edge.service): the goal
# is 1.0 or lower; a serial sensor and a fleet at any address keep a generic unit from PrivateDevices= and
# IPAddressDeny=, which a product's drop-in can add (PRODUCT_HARDENING).
EXPOSURE_AS_SHIPPED = 1.3
HARDENING_DROPIN = f"/run/systemd/system/{UNIT}.d/90-hardening.conf"


def unit_limits() -> dict[str, int]:
    """The restart limits of edge/data/edge.service, as the unit states them (plain seconds and counts)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "edge" / "data" / "edge.service")
    keys = {"Unit": ("StartLimitIntervalSec", "StartLimitBurst"), "Service": ("WatchdogSec", "RestartSec")}
    limits = {key: int(parser[section][key]) for section, names in keys.items() for key in names}
    limits["TimeoutStartSec"] = int(parser["Service"]["TimeoutStartSec"])
    return limits


def exposure(box: Any) -> tuple[float, str]:
    """``systemd-analyze security`` of the unit: the overall exposure and the report's text."""
    out = box.run(["systemd-analyze", "security", "--no-pager", UNIT], timeout=120, check=False)
    text = out["stdout"] + out["stderr"]
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", text)
    assert found, text
    return float(found.group(1)), text


def wait_running(box: Any) -> str:
    state = box.run(["systemctl", "is-system-running", "--wait"], timeout=300, check=False)["stdout"].strip()
    failed = box.run(["systemctl", "--failed", "--plain", "--no-legend", "--no-pager"])["stdout"]
    assert state == "running", f"system {state}; failed units:\n{failed}"
    return state


def main_pid(box: Any) -> int:
    return int(box.show(UNIT, "MainPID")["MainPID"])


def next_record(box: Any, pid: int, timeout: float = 120.0) -> dict[str, Any]:
    """The next inference record the service's process ``pid`` writes to the journal."""
    entry = box.wait_journal(f"_SYSTEMD_UNIT={UNIT}", f"_PID={pid}", contains=RECORD, timeout=timeout)
    record: dict[str, Any] = json.loads(entry["MESSAGE"])
    return record


def mono_s(entry: dict[str, Any]) -> float:
    return int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6


def test_boot_watchdog_and_restarts(system: ModuleType, image: Any, figures: dict[str, Any], tmp_path) -> None:
    """Scenarios 1 and 2 in one boot: READY under systemd, the box as the layer installs it, the exposure; then kill -9
    and a stalled serial sensor, each ending in a restart within the unit's limits."""
    limits = unit_limits()
    # The longest a restart may take within the unit's own limits: RestartSec, then a start within TimeoutStartSec.
    restart_budget = limits["RestartSec"] + limits["TimeoutStartSec"]
    box_cm = system.Box(image, tmp_path / "box", data_files={"edge/edge.toml": SERIAL_DROPIN}, deadline_s=1200)
    with box_cm as box, system.Sensor(box) as sensor:
        sensor.start(frames=5000, fps=2.0)
        wait_running(box)
        host_running_s = time.monotonic() - box.started_at
        props = box.show(
            UNIT,
            "Type",
            "ActiveState",
            "SubState",
            "NRestarts",
            "MainPID",
            "ExecMainStartTimestampMonotonic",
            "ActiveEnterTimestampMonotonic",
        )
        assert (props["Type"], props["ActiveState"], props["SubState"]) == ("notify", "active", "running"), props
        assert props["NRestarts"] == "0", props
        pid0 = int(props["MainPID"])
        record = next_record(box, pid0)
        assert record["backend"] == "native-neon", record
        figures["boot: QEMU start to agent hello (s)"] = round(box.hello_after_s, 1)
        figures["boot: QEMU start to system running, host-observed (s)"] = round(host_running_s, 1)
        figures["boot: kernel start to edge READY, guest monotonic (s)"] = round(
            int(props["ActiveEnterTimestampMonotonic"]) / 1e6, 1
        )
        figures["boot: edge exec to READY (s)"] = round(
            (int(props["ActiveEnterTimestampMonotonic"]) - int(props["ExecMainStartTimestampMonotonic"])) / 1e6, 1
        )

        # The box as the Yocto layer installs it: read-only root, /data its own ext4, the state directory from
        # tmpfiles.d, the factory model from /usr/share, and no fleet code.
        root_opts = box.run(["findmnt", "-n", "-o", "OPTIONS", "/"])["stdout"]
        assert root_opts.split(",")[0] == "ro", root_opts
        data = box.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "/data"])["stdout"].split()
        assert data[0] == "/dev/vdb" and data[1] == "ext4" and data[2].startswith("rw"), data
        assert box.run(["stat", "-c", "%U %G %a", "/data/edge"])["stdout"].split() == ["edge", "edge", "700"]
        started = box.wait_journal(f"_SYSTEMD_UNIT={UNIT}", contains="service starting", from_boot=True, timeout=30)
        assert "/usr/share/edge/models/digits-int8.onnx" in started["MESSAGE"], started
        help_text = box.run(["edge", "--help"], timeout=120)["stdout"]
        verbs = re.findall(r"^ {4}(\w+)", help_text, flags=re.MULTILINE)
        assert "run" in verbs and not {"fleet", "gateway"} & set(verbs), help_text

        # The unit's hardening as shipped, with the serial sensor read through it (DevicePolicy=closed keeps the
        # serial classes; PrivateUsers keeps group dialout's access). Nothing the service logs is a warning.
        score, report = exposure(box)
        print(report)
        figures["security: exposure as shipped"] = score
        assert score <= EXPOSURE_AS_SHIPPED, report
        warnings = box.run(["journalctl", "--no-pager", "-b", "-p", "warning", f"_SYSTEMD_UNIT={UNIT}"])["stdout"]
        assert "-- No entries --" in warnings or not warnings.strip(), warnings
        # onnxruntime reads /proc/cpuinfo for the CPU's features and says so on stderr when it cannot.
        output = box.run(["journalctl", "--no-pager", "-b", f"_SYSTEMD_UNIT={UNIT}"])["stdout"]
        assert "cpuinfo" not in output, output

        # kill -9 of the service's main process: systemd restarts it (Restart=on-failure).
        cursor = box.cursor()
        box.kill(pid0)  # kill -9
        killed = box.wait_journal(f"UNIT={UNIT}", contains="status=9/KILL", after_cursor=cursor, timeout=60)
        ready = box.wait_journal(f"UNIT={UNIT}", MSG_UNIT_STARTED, after_cursor=cursor, timeout=restart_budget + 30)
        kill_to_ready = mono_s(ready) - mono_s(killed)
        assert kill_to_ready <= restart_budget, kill_to_ready
        pid1 = main_pid(box)
        assert pid1 != pid0
        next_record(box, pid1)
        figures["kill -9: to READY again (s)"] = round(kill_to_ready, 1)

        # The sensor stops sending, the line stays open: no more records, no more watchdog pings, and systemd
        # kills and restarts the service after WatchdogSec.
        cursor = box.cursor()
        sensor.stop()
        stopped_at = time.monotonic()
        timeout_entry = box.wait_journal(
            f"UNIT={UNIT}", contains="Watchdog timeout", after_cursor=cursor, timeout=3 * limits["WatchdogSec"] + 60
        )
        host_stall_s = time.monotonic() - stopped_at
        sensor.start(frames=5000, fps=2.0, seed=1)  # the board is back: the restarted service must read it again
        box.wait_journal(f"UNIT={UNIT}", contains="'watchdog'", after_cursor=cursor, timeout=60)
        ready = box.wait_journal(f"UNIT={UNIT}", MSG_UNIT_STARTED, after_cursor=cursor, timeout=restart_budget + 30)
        lines = box.run(["journalctl", "--no-pager", "-o", "json", f"_SYSTEMD_UNIT={UNIT}", f"_PID={pid1}"])["stdout"]
        entries = [json.loads(line) for line in lines.splitlines() if line.strip()]
        records = [e for e in entries if RECORD in str(e.get("MESSAGE", ""))]
        stall_to_timeout = mono_s(timeout_entry) - mono_s(records[-1])
        # The last ping comes at most half a period after the last record, the timeout a full period after it.
        assert stall_to_timeout <= 1.5 * limits["WatchdogSec"] + 5, stall_to_timeout
        pid2 = main_pid(box)
        assert pid2 not in (pid0, pid1)
        next_record(box, pid2)
        props = box.show(UNIT, "ActiveState", "SubState", "NRestarts")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        # Within the start limit: two restarts, far from StartLimitBurst in StartLimitIntervalSec.
        assert int(props["NRestarts"]) == 2 < limits["StartLimitBurst"], props
        figures["watchdog: last record to watchdog timeout, guest (s)"] = round(stall_to_timeout, 1)
        figures["watchdog: sensor stopped to timeout seen, host (s)"] = round(host_stall_s, 1)
        figures["watchdog: timeout to READY again (s)"] = round(mono_s(ready) - mono_s(timeout_entry), 1)

        # A product's own additions on top: only its sensor port in a private /dev, IP to the fleet alone.
        box.write_file(HARDENING_DROPIN, PRODUCT_HARDENING)
        box.run(["systemctl", "daemon-reload"], timeout=120)
        box.run(["systemctl", "restart", UNIT], timeout=180)  # Type=notify: returns at READY
        next_record(box, main_pid(box))
        figures["security: + a product's drop-in (PrivateDevices, IPAddressDeny), serial sensor"] = exposure(box)[0]
        figures["boot: clean power-off (s)"] = round(box.poweroff(), 1)


# ---------------------------------------------------------------- the box in a fleet, power cuts, OTA

DEVICE_ID = "box-sys"
# The box's own tuning on /data, beside what enrollment writes there: more frames and smaller envelopes than the
# factory configuration, so a power cut at a random moment falls while the box seals and publishes.
FLEET_DROPIN = "[source]\nfps = 5.0\n[telemetry]\nbatch_age_s = 0.25\nreceipt_timeout_s = 5.0\n"
ENROLL_UNIT = "edge-enroll.service"


def fsck_clean(disk: Path, scratch: Path) -> None:
    """The data disk after a power cut, as the next boot's fsck finds it: the journal replayed, then a full check
    that changes nothing (on a copy: the next boot gets the disk exactly as the cut left it)."""
    copy = scratch / "fsck.ext4"
    subprocess.run(["cp", "--sparse=always", str(disk), str(copy)], check=True)
    try:
        replay = subprocess.run(
            ["e2fsck", "-y", "-E", "journal_only", str(copy)], capture_output=True, text=True, check=False
        )
        assert replay.returncode in (0, 1), replay.stdout + replay.stderr
        check = subprocess.run(["e2fsck", "-f", "-n", str(copy)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, f"e2fsck -f -n after the power cut:\n{check.stdout}{check.stderr}"
    finally:
        copy.unlink(missing_ok=True)


def data_fsck_result(box: Any) -> str:
    """The result of this boot's fsck of /data (systemd-fsck@ for the disk fstab names by label)."""
    unit = box.run(["systemd-escape", "--path", "--suffix=device", "/dev/disk/by-label/data"])["stdout"].strip()
    return box.show(f"systemd-fsck@{unit.removesuffix('.device')}.service", "Result")["Result"]


def wait_stored(fleet: Any, above: int, timeout: float = 180.0) -> list[Any]:
    """The device's stored envelopes once the gateway holds a counter above ``above``."""
    deadline = time.monotonic() + timeout
    while True:
        stored = fleet.stored(DEVICE_ID)
        if stored and stored[-1].counter > above:
            return stored
        if time.monotonic() > deadline:
            last = stored[-1].counter if stored else None
            raise AssertionError(f"the gateway stored nothing above counter {above} in {timeout:.0f} s (last {last})")
        time.sleep(0.5)


def service_model(box: Any) -> str:
    """The model the running service loaded, from its "service starting" entry of this boot."""
    entry = box.wait_journal(f"_SYSTEMD_UNIT={UNIT}", contains="service starting", from_boot=True, timeout=120)
    model: str = json.loads(entry["MESSAGE"])["model"]
    return model


def drain_and_count(box: Any) -> dict[str, Any]:
    """Stop the service cleanly (it drains its outbox until receipted) and read what its outbox says."""
    box.run(["systemctl", "stop", UNIT], timeout=120)
    out = box.run(
        ["runuser", "-u", "edge", "--", "edge", "telemetry", "status", "--config", "/etc/edge/edge.toml", "--json"],
        timeout=120,
    )["stdout"]
    status: dict[str, Any] = json.loads(out)
    return status


def test_enroll_publish_power_cuts_and_ota(system: ModuleType, image: Any, figures: dict[str, Any], tmp_path) -> None:
    """Scenarios 3, 4 and 5 on one box and one /data disk, boot after boot, against a fleet on the host.

    Boot 1 enrolls with the claim code on the boot partition and publishes; every boot up to ``cuts`` loses its power
    at a random moment while the box seals and publishes, the last of them in the middle of a model update; then a
    boot that must come back on a working model and deliver everything, and a clean reboot that keeps it.
    """
    from host_fleet import HostFleet, chain_breaks  # noqa: PLC0415

    cuts = int(os.environ.get("EDGE_SYSTEM_POWER_CUTS", "3"))
    assert cuts >= 2, "EDGE_SYSTEM_POWER_CUTS: at least 2 (the last one falls during an update)"
    seed = int(os.environ.get("EDGE_SYSTEM_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    print(f"power cuts: {cuts}, seed {seed} (EDGE_SYSTEM_SEED={seed} repeats the same moments)")
    workdir = tmp_path / "box"
    with HostFleet(tmp_path / "fleet") as fleet:
        try:
            _fleet_scenarios(system, image, figures, fleet, workdir, cuts, rng, chain_breaks)
        except BaseException:
            print(f"===== fleet logs ({fleet.dir}):\n{fleet.logs_tail()}", file=sys.stderr)
            raise


def _fleet_scenarios(
    system: ModuleType, image: Any, figures: dict[str, Any], fleet: Any, workdir: Path, cuts: int, rng: Any,
    chain_breaks: Any,
) -> None:  # fmt: skip
    fleet.publish_releases(("2.0.0", "2.1.0"))
    code = fleet.claim(DEVICE_ID)
    boots = 0

    def boot(**kwargs: Any) -> Any:
        nonlocal boots
        boots += 1
        return system.Box(
            image, workdir, keep_data=boots > 1, data_files={"edge/edge.toml": FLEET_DROPIN},
            boot_files={"edge-claim.txt": code + "\n"}, forwards=fleet.forwards, name=f"boot-{boots}",
            deadline_s=900, **kwargs,
        )  # fmt: skip

    def cut(box: Any, what: str) -> None:
        at = box.power_cut()
        fsck_clean(box.data_disk, workdir)
        assert fleet.rejects() == {}, fleet.rejects()
        figures[f"power cut {boots}: {what}, at (s after QEMU start)"] = round(at, 1)

    # Scenario 3: the claim file on the boot partition, edge-enroll.service before edge.service, then telemetry.
    with boot() as box:
        wait_running(box)
        assert box.show(ENROLL_UNIT, "Result")["Result"] == "success"
        box.wait_journal(f"_SYSTEMD_UNIT={ENROLL_UNIT}", contains=f"enrolled as {DEVICE_ID} ", from_boot=True)
        receipted = box.wait_journal(
            f"_SYSTEMD_UNIT={ENROLL_UNIT}", contains="first envelope verified and stored", from_boot=True
        )
        figures["enroll: `edge enroll` start to its first envelope verified and stored (s)"] = float(
            re.search(r"stored by the fleet ([0-9.]+) s", receipted["MESSAGE"]).group(1)  # type: ignore[union-attr]
        )
        t0 = time.monotonic()
        stored = wait_stored(fleet, above=1)  # counter 1 is `edge enroll`'s first envelope, receipted before READY
        figures["enroll: QEMU start to the service's first stored envelope (s)"] = round(
            time.monotonic() - box.started_at, 1
        )
        assert chain_breaks(stored) == [], chain_breaks(stored)
        assert fleet.rejects() == {}
        # Scenario 4, first cut: at a random moment while the service seals and publishes.
        time.sleep(rng.uniform(0.0, 6.0))
        del t0
        cut(box, "while publishing")
    last = stored[-1].counter

    # Scenario 4, more cuts: each boot must recover /data, open the outbox, and continue the counters.
    for _ in range(cuts - 2):
        with boot() as box:
            wait_running(box)
            assert data_fsck_result(box) == "success"
            stored = wait_stored(fleet, above=last)
            last = stored[-1].counter
            time.sleep(rng.uniform(0.0, 6.0))
            cut(box, "while publishing")

    # Scenario 5: a rollout commits 2.0.0; the next update (2.1.0) loses its power mid-way (the last cut).
    with boot() as box:
        wait_running(box)
        assert data_fsck_result(box) == "success"
        last = wait_stored(fleet, above=last)[-1].counter
        cursor = box.cursor()
        t0 = time.monotonic()
        fleet.rollout("2.0.0")
        box.wait_journal(f"_SYSTEMD_UNIT={UNIT}", contains='"ota.committed"', after_cursor=cursor, timeout=300)
        figures["ota: rollout start to 2.0.0 committed on the box (s)"] = round(time.monotonic() - t0, 1)
        cursor = box.cursor()
        fleet.rollout("2.1.0")
        state = rng.choice(["ota.downloading", "ota.staged", "ota.trial"])
        box.wait_journal(f"_SYSTEMD_UNIT={UNIT}", contains=f'"{state}"', after_cursor=cursor, timeout=300)
        cut(box, f"during the update to 2.1.0, at {state}")

    # After the cut: a working model, committed (2.1.0, the update resumed) or rolled back (2.0.0), and every
    # sealed envelope at the gateway.
    with boot() as box:
        wait_running(box)
        assert data_fsck_result(box) == "success"
        model = service_model(box)
        assert model in ("digits@2.0.0", "digits@2.1.0"), model
        last = wait_stored(fleet, above=last)[-1].counter
        # The interrupted update settles: resumed and committed, or rolled back; either way the box runs a model
        # that passed its trial.
        deadline = time.monotonic() + 300
        while (outcome := _device_outcome(fleet)) in ("commanded", "running", None):
            assert time.monotonic() < deadline, fleet.rollout_status()
            time.sleep(1.0)
        figures["ota: after the cut mid-update, the rollout's outcome for the box"] = outcome
        status = drain_and_count(box)
        _assert_everything_stored(fleet, status, chain_breaks)
        box.run(["systemctl", "start", UNIT], timeout=180)
        running = service_model(box)
        figures["ota: model after the cut mid-update"] = running
        box.poweroff()
    fsck_clean(workdir / "data.ext4", workdir)

    # A clean reboot keeps the committed model.
    with boot() as box:
        wait_running(box)
        assert service_model(box) == running
        status = drain_and_count(box)
        stored = _assert_everything_stored(fleet, status, chain_breaks)
        figures["power cuts: envelopes sealed and stored, 0 lost"] = len(stored)
        box.poweroff()
    fsck_clean(workdir / "data.ext4", workdir)
    assert fleet.rejects() == {}


def _device_outcome(fleet: Any) -> str | None:
    devices = [d for d in fleet.rollout_status()["devices"] if d["device_id"] == DEVICE_ID]
    return str(devices[0]["outcome"]) if devices else None


def _assert_everything_stored(fleet: Any, status: dict[str, Any], chain_breaks: Any) -> list[Any]:
    """Every envelope the box sealed is receipted and stored, in one unbroken hash chain from counter 1."""
    sealed = int(status["sealed"])
    assert int(status["waiting"]) == 0, status
    stored = fleet.stored(DEVICE_ID)
    assert [e.counter for e in stored] == list(range(1, sealed + 1)), (sealed, [e.counter for e in stored][-5:])
    assert chain_breaks(stored) == []
    assert fleet.rejects() == {}
    return stored


# ---------------------------------------------------------------- the camera: vivid, the kernel's virtual V4L2 device

CAMERA_DROPIN = (
    '[source]\nkind = "v4l2"\ndevice = "/dev/video0"\nreconnect_max_s = 5\n[pipeline]\non_full = "drop_oldest"\n'
)
# VIDIOC_S_CTRL (_IOWR('V', 28, struct v4l2_control)) of vivid's "Disconnect" control (VIVID_CID_VIVID_BASE + 65):
# the driver acts as an unplugged USB camera (ENODEV on every call) until the last open handle closes, then comes
# back: an unplug and a replug.
VIVID_DISCONNECT = (
    "import fcntl, os, struct\n"
    "fd = os.open('/dev/video0', os.O_RDWR)\n"
    "fcntl.ioctl(fd, 0xC008561C, struct.pack('Ii', 0x00F0F000 + 65, 1))\n"
    "os.close(fd)\n"
)


def restart_budget(limits: dict[str, int]) -> int:
    """The longest a restart may take within the unit's limits, with a margin for the emulated box."""
    return limits["RestartSec"] + limits["TimeoutStartSec"] + 30


def test_camera_vivid(system: ModuleType, image: Any, figures: dict[str, Any], tmp_path) -> None:
    """Scenario 6: the V4L2 source against a real V4L2 driver, vivid, in the booted box.

    The service starts before the camera exists and waits for it past the watchdog period without a restart; then
    vivid is loaded. Its driver (videodev) was not loaded when the service started, so systemd's device policy did
    not allow the video4linux class: the open is refused (EPERM), the service says why and exits, and systemd's
    restart allows it (one restart). The format is negotiated from what vivid enumerates, frames go from its mmap
    buffers into the model; then the camera is unplugged and comes back (vivid's Disconnect control), and the same
    process reopens it, without a restart.
    """
    limits = unit_limits()
    with system.Box(image, tmp_path / "box", data_files={"edge/edge.toml": CAMERA_DROPIN}, deadline_s=900) as box:
        wait_running(box)
        box.wait_journal(f"_SYSTEMD_UNIT={UNIT}", contains="camera not present", from_boot=True, timeout=60)
        # No camera for longer than the watchdog period: the source reopens with backoff, the service stays up.
        time.sleep(limits["WatchdogSec"] + 5)
        assert box.show(UNIT, "NRestarts", "SubState") == {"NRestarts": "0", "SubState": "running"}

        cursor = box.cursor()
        t0 = time.monotonic()
        box.run(["modprobe", "vivid", "n_devs=1", "node_types=0x1"], timeout=120)
        refused = box.wait_journal(
            f"_SYSTEMD_UNIT={UNIT}", contains="DeviceAllow=char-video4linux", after_cursor=cursor
        )
        assert "Operation not permitted" in refused["MESSAGE"], refused
        streaming = box.wait_journal(
            f"_SYSTEMD_UNIT={UNIT}", contains="camera streaming", after_cursor=cursor, timeout=restart_budget(limits)
        )
        assert box.show(UNIT, "NRestarts")["NRestarts"] == "1"
        pid = main_pid(box)
        first = json.loads(streaming["MESSAGE"])
        assert first["driver"] == "vivid" and first["format"] in ("NV12", "YUYV", "RGB3", "BGR3", "GREY"), first
        record = next_record(box, pid)
        figures["camera: modprobe to the first record (s)"] = round(time.monotonic() - t0, 1)
        figures["camera: negotiated"] = f"{first['format']} {first['width']}x{first['height']} @ {first['fps']}"
        assert record["backend"] == "native-neon", record

        # Unplug and replug: the same process reopens the camera and goes on.
        cursor = box.cursor()
        box.run(["python3", "-c", VIVID_DISCONNECT])
        lost = box.wait_journal(f"_SYSTEMD_UNIT={UNIT}", contains="camera lost", after_cursor=cursor, timeout=60)
        again = box.wait_journal(f"_SYSTEMD_UNIT={UNIT}", contains="camera streaming", after_cursor=cursor, timeout=120)
        figures["camera: unplugged to streaming again (s)"] = round(mono_s(again) - mono_s(lost), 1)
        next_record(box, pid)
        assert main_pid(box) == pid
        assert box.show(UNIT, "NRestarts")["NRestarts"] == "1"
        box.poweroff()

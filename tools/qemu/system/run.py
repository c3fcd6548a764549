#!/usr/bin/env python3
"""Boot the system image under qemu-system-aarch64 and talk to it (docs/system.md).

``Box`` boots one guest: the image's kernel, initramfs and read-only root disk, a /data disk (made for the boot and
optionally seeded with files, e.g. the box's drop-in ``edge/edge.toml``, or the disk a previous boot left: a box
that lost its power keeps its data), a boot partition (``/boot/firmware``, where an owner puts ``edge-claim.txt``),
and three channels to the host, all of them connections the host listens for before QEMU starts (so nothing waits
for a file to appear):

- the console (ttyAMA0) into ``console.log``; journald copies every entry there, so it holds the journal's tail even
  when the guest hangs;
- the virtio-serial port ``edge.agent`` to the test agent (``guest/agent.py``): requests and answers as JSON lines;
- a 16550 UART on PCI (``/dev/ttySENSOR`` in the guest) whose other end is ``Box.sensor``, a socket the host writes a
  serial sensor board's bytes into (``Sensor`` runs ``tools/sim/serial_sensor.py`` on it).

The guest's network is QEMU user networking with ``restrict=on`` and one ``guestfwd`` per forward (``FLEET_ADDR``:guest
port in the guest to 127.0.0.1:host port on the host): its only way out. Each guest connection runs its own
``socat`` to the host port, so a box that reconnects gets a new connection, as over a real network.

``power_cut`` kills QEMU with SIGKILL: whatever the guest had not written to its disks is gone, as in a power cut
(the data disk is ``cache=writeback``: QEMU passes each write the guest makes to the host at once).

Invariants: every wait has a deadline; the whole boot has a hard one, at which QEMU is killed and every pending call
fails with ``GuestHungError``. Any failure inside ``with Box(...)`` prints the console's tail and the journal's tail
(from the agent while it answers) before the exception propagates. QEMU never outlives the ``with`` block.

Usage: ``run.py [--image DIR] [-- COMMAND...]`` boots the image (building it if no directory is given), waits for
the boot to finish, runs the command in the guest (default: ``systemctl status edge.service``) and powers off.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
SENSOR_SIM = ROOT / "tools" / "sim" / "serial_sensor.py"
HOST_PY = Path(os.environ.get("HOST_PY", ROOT / ".venv" / "bin" / "python"))
QEMU = "qemu-system-aarch64"
# The machine the numbers in docs/system.md were measured on: a Raspberry Pi 4's core, 2 of them, 2 GiB.
MACHINE = ("-M", "virt", "-cpu", "cortex-a72", "-smp", "2", "-m", "2048")
DATA_DISK_MB = 256
BOOT_DISK_MB = 8
# Where the forwarded fleet ports appear in the guest (QEMU user networking's guestfwd): the fleet's address as its
# certificates and the claim codes name it.
FLEET_ADDR = "10.0.2.100"


class GuestError(Exception):
    """The guest did not do what the host asked within its deadline, or QEMU ended."""


class GuestHungError(GuestError):
    """The guest was killed at the boot's hard deadline."""


@dataclass(frozen=True)
class Image:
    """A built image directory (tools/qemu/system/build.py): vmlinuz, initrd.img, rootfs.ext4, manifest.json."""

    path: Path
    manifest: Mapping[str, Any]

    @classmethod
    def load(cls, path: Path) -> Image:
        return cls(path, json.loads((path / "manifest.json").read_text()))


def build_image() -> Image:
    """Build the image (or find it in the cache) with build.py, in this process."""
    spec = importlib.util.spec_from_file_location("edge_system_build", Path(__file__).with_name("build.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return Image.load(module.build())


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


@dataclass
class Box:
    """One boot of the image; use as a context manager.

    Args:
        image: the image to boot.
        workdir: where the disks and each boot's ``<name>.console.log`` and ``<name>.qemu.log`` go (kept for
            inspection).
        data_files: files to put on a new /data before boot, by path relative to /data; those under ``edge/``
            belong to the edge user, as the box's own state would.
        keep_data: boot with the data disk a previous boot in ``workdir`` left (``data_files`` then unused).
        boot_files: files on the boot partition (``/boot/firmware``), by name.
        deadline_s: the hard deadline of the whole boot, after which QEMU is killed.
        boot_timeout_s: how long the agent may take to say hello.
        forwards: guest port -> host port: ``FLEET_ADDR``:guest port in the guest reaches 127.0.0.1:host port
            (with none, the guest's NIC reaches nothing).
        name: this boot's name in the log files.
    """

    image: Image
    workdir: Path
    data_files: Mapping[str, str | bytes] = field(default_factory=dict)
    keep_data: bool = False
    boot_files: Mapping[str, str] = field(default_factory=dict)
    deadline_s: float = 900.0
    boot_timeout_s: float = 300.0
    forwards: Mapping[int, int] = field(default_factory=dict)
    name: str = "boot"

    hello: dict[str, Any] = field(init=False, default_factory=dict)
    started_at: float = field(init=False, default=0.0)
    hello_after_s: float = field(init=False, default=0.0)
    hung: bool = field(init=False, default=False)
    cut: bool = field(init=False, default=False)
    sensor: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._agent: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0
        self._timer: threading.Timer | None = None
        self._sockdir = Path(tempfile.mkdtemp(prefix="edge-sys-"))  # unix socket paths must stay short

    # ------------------------------------------------------------ lifecycle

    @property
    def console_log(self) -> Path:
        return self.workdir / f"{self.name}.console.log"

    @property
    def data_disk(self) -> Path:
        return self.workdir / "data.ext4"

    def _make_boot_disk(self) -> Path:
        seed = self.workdir / "boot-seed"
        shutil.rmtree(seed, ignore_errors=True)
        seed.mkdir(parents=True)
        for name, text in self.boot_files.items():
            (seed / name).write_text(text)
        disk = self.workdir / "boot.ext4"
        disk.unlink(missing_ok=True)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "bootfs", "-d", str(seed), str(disk), f"{BOOT_DISK_MB}M"],
            check=True,
            capture_output=True,
        )
        return disk

    def _make_data_disk(self) -> Path:
        if self.keep_data:
            if not self.data_disk.is_file():
                raise GuestError(f"keep_data: no data disk {self.data_disk} from an earlier boot")
            return self.data_disk
        seed = self.workdir / "data-seed"
        shutil.rmtree(seed, ignore_errors=True)
        seed.mkdir(parents=True)
        uid, gid = int(self.image.manifest["edge_uid"]), int(self.image.manifest["edge_gid"])
        for rel, content in self.data_files.items():
            target = seed / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        for path in sorted(seed.rglob("*")):
            if path.relative_to(seed).parts[0] == "edge":
                os.chown(path, uid, gid)
                path.chmod(0o700 if path.is_dir() else 0o600)
        disk = self.data_disk
        disk.unlink(missing_ok=True)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "data", "-d", str(seed), str(disk), f"{DATA_DISK_MB}M"],
            check=True,
            capture_output=True,
        )
        return disk

    def qemu_argv(self, data_disk: Path, boot_disk: Path) -> list[str]:
        img = self.image.path
        argv = [QEMU, *MACHINE, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
        argv += ["-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img")]
        argv += ["-append", str(self.image.manifest["cmdline"])]
        argv += ["-chardev", f"file,id=console,path={self.console_log}", "-serial", "chardev:console"]
        # vda: the root, read-only for QEMU as for the guest; vdb: /data. cache=writeback: a QEMU kill is a power
        # cut for the guest's page cache, while writes QEMU already passed on survive.
        argv += ["-drive", f"if=none,id=root,file={img / 'rootfs.ext4'},format=raw,readonly=on"]
        argv += ["-device", "virtio-blk-pci,drive=root"]
        argv += ["-drive", f"if=none,id=data,file={data_disk},format=raw,cache=writeback"]
        argv += ["-device", "virtio-blk-pci,drive=data"]
        argv += ["-drive", f"if=none,id=boot,file={boot_disk},format=raw,cache=writeback"]
        argv += ["-device", "virtio-blk-pci,drive=boot"]
        argv += ["-device", "virtio-rng-pci"]
        argv += ["-device", "virtio-serial-pci,id=vser"]
        argv += ["-chardev", f"socket,id=agent,path={self._sockdir / 'agent.sock'}"]
        argv += ["-device", "virtserialport,bus=vser.0,chardev=agent,name=edge.agent"]
        argv += ["-chardev", f"socket,id=sensor,path={self._sockdir / 'sensor.sock'}"]
        argv += ["-device", "pci-serial,chardev=sensor"]
        # The NIC is always there (the image configures it by DHCP); without forwards it reaches nothing.
        log = self.workdir / "socat.log"
        # libslirp splits the command like a shell (no shell runs it): socat logs to a file, since its stderr
        # would go into the guest's connection. A comma in -netdev's value is written twice.
        fwds = [
            f"guestfwd=tcp:{FLEET_ADDR}:{guest}-cmd:socat -lf {log} - TCP:127.0.0.1:{host}".replace(",", ",,")
            for guest, host in sorted(self.forwards.items())
        ]
        argv += ["-netdev", ",".join(["user", "id=net", "restrict=on", *fwds])]
        argv += ["-device", "virtio-net-pci,netdev=net,romfile="]  # no ipxe ROMs without recommends
        return argv

    def __enter__(self) -> Box:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self._report(sys.exc_info()[1])
            self._stop()
            raise
        return self

    def _start(self) -> None:
        data_disk = self._make_data_disk()
        boot_disk = self._make_boot_disk()
        listeners = {name: _listen(self._sockdir / f"{name}.sock") for name in ("agent", "sensor")}
        self.started_at = time.monotonic()
        with (self.workdir / f"{self.name}.qemu.log").open("wb") as log:
            self._proc = subprocess.Popen(
                self.qemu_argv(data_disk, boot_disk),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._timer = threading.Timer(self.deadline_s, self._kill_at_deadline)
        self._timer.daemon = True
        self._timer.start()
        # QEMU connects to both sockets while it starts, before the guest runs (or exits on a bad command line).
        conns = {}
        for name, listener in listeners.items():
            deadline = time.monotonic() + 60
            listener.settimeout(1)
            while name not in conns:
                with contextlib.suppress(TimeoutError):
                    conns[name], _ = listener.accept()
                if name not in conns and (self._proc.poll() is not None or time.monotonic() > deadline):
                    listener.close()
                    raise GuestError(f"QEMU did not connect its {name} channel: {self._qemu_status()}")
            listener.close()
        self._agent, self.sensor = conns["agent"], conns["sensor"]
        line = self._read_line(self.boot_timeout_s, "the agent's hello")
        self.hello = json.loads(line)["hello"]
        self.hello_after_s = time.monotonic() - self.started_at

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self._report(exc)
        self._stop()

    def _kill_at_deadline(self) -> None:
        self.hung = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()
        for sock in (self._agent, getattr(self, "sensor", None)):
            if sock is not None:
                sock.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def power_cut(self) -> float:
        """Kill QEMU with SIGKILL (the guest's power is cut); returns the guest's uptime then, as the host saw it."""
        assert self._proc is not None
        self.cut = True
        self._proc.kill()
        self._proc.wait()
        return time.monotonic() - self.started_at

    def _qemu_status(self) -> str:
        if self.cut:
            return "the power was cut (QEMU killed by the test)"
        if self.hung:
            return f"the guest was killed at the boot's deadline of {self.deadline_s:.0f} s"
        code = None if self._proc is None else self._proc.poll()
        return "QEMU is running" if code is None else f"QEMU exited with status {code}"

    # ------------------------------------------------------------ the agent channel

    def _read_line(self, timeout: float, what: str) -> bytes:
        assert self._agent is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"no answer ({what}) within {timeout:.0f} s; {self._qemu_status()}")
            self._agent.settimeout(left)
            try:
                chunk = self._agent.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                # QEMU closes its end as it exits: let it finish, so the report says how it ended.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    assert self._proc is not None
                    self._proc.wait(timeout=5)
                cls = GuestHungError if self.hung else GuestError
                raise cls(f"the agent channel closed while waiting for {what}; {self._qemu_status()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def call(self, op: str, *, timeout: float = 60.0, **args: Any) -> Any:
        """Run one agent operation (guest/agent.py) and return its result.

        Raises:
            GuestError: the agent reported an error, or did not answer within ``timeout`` (which the agent enforces
                on the operation) plus a margin.
            GuestHungError: the boot's deadline passed and QEMU was killed.
        """
        assert self._agent is not None
        self._next_id += 1
        rid = self._next_id
        request = {"id": rid, "op": op, "timeout": timeout, **args}
        self._agent.sendall(json.dumps(request).encode() + b"\n")
        answer = json.loads(self._read_line(timeout + 30.0, f"{op} {args}"))
        if answer.get("id") != rid:
            raise GuestError(f"answer out of order: sent {rid}, got {answer!r}")
        if not answer["ok"]:
            raise GuestError(f"{op} {args} failed in the guest: {answer['error']}")
        return answer["result"]

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True) -> dict[str, Any]:
        """Run a command in the guest as root; returns ``{"rc", "stdout", "stderr"}``."""
        result: dict[str, Any] = self.call("run", argv=list(argv), timeout=timeout)
        if check and result["rc"] != 0:
            raise GuestError(f"{' '.join(argv)} exited with {result['rc']}: {result['stdout']}{result['stderr']}")
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit."""
        out = self.run(["systemctl", "show", unit, "--property=" + ",".join(props)])["stdout"]
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cursor(self) -> str | None:
        """The journal's current position, for ``wait_journal(after_cursor=...)``."""
        result: str | None = self.call("cursor")
        return result

    def wait_journal(
        self,
        *matches: str,
        contains: str | None = None,
        after_cursor: str | None = None,
        from_boot: bool = False,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """The first journal entry matching every ``FIELD=value`` (and ``contains``, a substring of the message).

        Entries are searched after ``after_cursor``, or from the start of the boot with ``from_boot``, or else from
        now on; the agent follows the journal, so this returns as soon as the entry is written.
        """
        entry: dict[str, Any] = self.call(
            "wait_journal",
            matches=list(matches),
            contains=contains,
            after_cursor=after_cursor,
            from_boot=from_boot,
            timeout=timeout,
        )
        return entry

    def write_file(self, path: str, text: str) -> None:
        self.call("write_file", path=path, text=text)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Send a signal to a guest process (``kill -9`` by default)."""
        self.call("kill", pid=pid, signal=int(sig))

    def poweroff(self, timeout: float = 180.0) -> float:
        """Power the guest off cleanly and wait for QEMU to exit; returns the seconds it took."""
        assert self._proc is not None
        t0 = time.monotonic()
        self.call("poweroff")
        try:
            code = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise GuestError(f"the guest did not power off within {timeout:.0f} s") from e
        if code != 0:
            raise GuestError(f"QEMU exited with status {code} at power-off")
        return time.monotonic() - t0

    # ------------------------------------------------------------ diagnostics

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console output)"
        return "\n".join(text.splitlines()[-lines:])

    def journal_tail(self, lines: int = 80) -> str:
        """The journal's tail from the agent, if the guest still answers."""
        if self._proc is None or self._proc.poll() is not None or self._agent is None:
            return f"(the agent cannot answer: {self._qemu_status()}; the console tail above holds the journal's)"
        try:
            out = self.run(["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines)], timeout=30)
        except (GuestError, OSError) as e:
            return f"(no journal: {e})"
        return str(out["stdout"])

    def _report(self, exc: BaseException | None) -> None:
        print(
            f"\n===== system test failed: {exc!r}\n===== {self._qemu_status()}; workdir {self.workdir}\n"
            f"===== console tail ({self.console_log}):\n{self.console_tail()}\n"
            f"===== journal tail:\n{self.journal_tail()}\n=====",
            file=sys.stderr,
            flush=True,
        )


class Sensor:
    """A serial sensor board on the box's UART: tools/sim/serial_sensor.py writing into ``Box.sensor``.

    ``start`` sends ``frames`` frames at ``fps``; ``stop`` ends it at once. The line stays open in between, as a
    board that stops sending does: the box sees silence, not a hang-up.
    """

    def __init__(self, box: Box) -> None:
        self._sock = box.sensor
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, *, frames: int, fps: float, width: int = 32, height: int = 24, seed: int = 0) -> None:
        self.stop()
        fd = self._sock.fileno()
        argv = [str(HOST_PY), str(SENSOR_SIM), "--fd", str(fd), "--frames", str(frames), "--fps", str(fps)]
        argv += ["--width", str(width), "--height", str(height), "--format", "YUYV", "--seed", str(seed)]
        self._proc = subprocess.Popen(argv, pass_fds=[fd], stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> Sensor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, help="an image directory (default: build it)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "system" / "run")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds before the guest is killed")
    parser.add_argument("command", nargs="*", default=["systemctl", "status", "--no-pager", "edge.service"])
    args = parser.parse_args(argv)
    image = Image.load(args.image) if args.image else build_image()
    try:
        with Box(image, args.workdir, deadline_s=args.deadline) as box:
            print(f"run: agent up {box.hello_after_s:.1f} s after QEMU started", file=sys.stderr)
            state = box.run(["systemctl", "is-system-running", "--wait"], timeout=300, check=False)
            print(f"run: system {state['stdout'].strip()} after {time.monotonic() - box.started_at:.1f} s")
            out = box.run(args.command, timeout=120, check=False)
            print(out["stdout"] + out["stderr"], end="")
            box.poweroff()
    except GuestError as e:
        print(f"run: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

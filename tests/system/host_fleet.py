"""The fleet on the host, for the emulated box to enroll with, publish to and update from (docs/system.md).

Everything an operator runs, as docs/onboarding.md and docs/ota.md tell them, with the real command lines: the fleet
CA and certificates (the broker's for the address the guest reaches it by), mosquitto with the fleet's fragment
(mutual TLS, per-device ACL), ``edge gateway run``, ``edge fleet serve`` (enrollment), the TUF model repository on a
static HTTP server, claim codes, releases and rollouts. Every port is a free one on 127.0.0.1; the box reaches them
as ``FLEET_ADDR``:``GUEST_PORTS`` through run.py's forwards (``HostFleet.forwards``).

The store is read with the fleet's own API (``edge.fleet.store``): what the gateway verified and stored, never what
the box says about itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The addresses in the guest: what the broker's certificate, the claim codes and the box's drop-in name.
FLEET_ADDR = "10.0.2.100"
GUEST_PORTS = {"broker": 8883, "enroll": 8443, "repository": 8080}
EDGE = [sys.executable, "-m", "edge"]


class FleetError(AssertionError):
    """A fleet command or process failed; the message holds its output."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FleetError(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise FleetError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


class HostFleet:
    """A whole fleet in ``workdir``; use as a context manager (every process is stopped on exit)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.fleet = workdir / "fleet"
        self.ports = {name: free_port() for name in GUEST_PORTS}
        self.metrics_port = free_port()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def forwards(self) -> dict[int, int]:
        """run.py's ``Box(forwards=...)``: each guest port to its host port."""
        return {GUEST_PORTS[name]: port for name, port in self.ports.items()}

    def edge(self, *args: str, timeout: float = 120.0) -> str:
        """Run an ``edge`` command line; its stdout, or FleetError with its output."""
        proc = subprocess.run([*EDGE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise FleetError(f"`edge {' '.join(args)}` exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def fleet_cmd(self, *args: str, timeout: float = 120.0) -> str:
        return self.edge("fleet", "--dir", str(self.fleet), *args, timeout=timeout)

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> HostFleet:
        try:
            self._provision()
            self._start_all()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def _provision(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fleet_cmd("ca", "init")
        # The broker's certificate names the address the box dials (the forward), and loopback for the gateway.
        self.fleet_cmd("ca", "issue-server", "--host", FLEET_ADDR, "--host", "127.0.0.1")
        self.fleet_cmd("ca", "issue-client", "gateway-1")
        self.fleet_cmd("broker-config", "--port", str(self.ports["broker"]), "--bind", "127.0.0.1")
        self.fleet_cmd("models", "init")  # before enrollment: boxes receive the repository's root with their keys
        broker = self.dir / "mosquitto"
        broker.mkdir()
        run_as = "user root\n" if os.geteuid() == 0 else ""  # as root mosquitto would switch to a user that cannot read
        (broker / "mosquitto.conf").write_text(
            f"{run_as}per_listener_settings false\npersistence true\npersistence_location {broker}/\n"
            f"log_dest file {broker}/mosquitto.log\ninclude_dir {self.fleet / 'broker'}\n"
        )
        (self.dir / "gateway.toml").write_text(
            f'[gateway]\nid = "gateway-1"\nfleet_dir = "{self.fleet}"\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {self.ports["broker"]}\n'
            'cert = "gateway/gateway-1.pem"\nkey = "gateway/gateway-1.key"\n'
            f"[metrics]\nport = {self.metrics_port}\n"
        )

    def _start(self, name: str, argv: list[str], port: int) -> None:
        log = self.dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[name] = proc
        wait_port(port, proc, log)

    def _start_all(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        broker_conf = self.dir / "mosquitto" / "mosquitto.conf"
        self._start("mosquitto", [mosquitto, "-c", str(broker_conf)], self.ports["broker"])
        self._start("gateway", [*EDGE, "gateway", "run", "--config", str(self.dir / "gateway.toml")], self.metrics_port)
        repository = [sys.executable, "-m", "http.server", str(self.ports["repository"]), "--bind", "127.0.0.1"]
        repository += ["--directory", str(self.fleet / "repository")]
        self._start("repository", repository, self.ports["repository"])
        serve = [*EDGE, "fleet", "--dir", str(self.fleet), "serve", "--listen", f"127.0.0.1:{self.ports['enroll']}"]
        serve += ["--public-host", FLEET_ADDR, "--broker", f"{FLEET_ADDR}:{GUEST_PORTS['broker']}"]
        serve += ["--ota-repository", f"http://{FLEET_ADDR}:{GUEST_PORTS['repository']}/"]
        self._start("enroll", serve, self.ports["enroll"])

    def stop_all(self) -> None:
        for name, proc in reversed(list(self._procs.items())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            del self._procs[name]

    def logs_tail(self, lines: int = 30) -> str:
        """The tail of every fleet process's log, for a failure report."""
        out = []
        for log in sorted(self.dir.glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # ------------------------------------------------------------ what an operator does

    def claim(self, device_id: str) -> str:
        """A one-time claim code for ``device_id``, naming the endpoint as the box reaches it."""
        out = self.fleet_cmd(
            "claims", "create", "--device-id", device_id, "--server", f"{FLEET_ADDR}:{GUEST_PORTS['enroll']}", "--json"
        )
        code: str = json.loads(out)[0]["code"]
        return code

    def publish_releases(self, versions: tuple[str, ...]) -> None:
        """Publish digits releases, each the good v2 model of tools/models/ota_models.py, signed by a publisher.

        The latency budget is for an emulated Cortex-A72 (TCG runs the model tens of times slower than a board),
        and the releases require the onnxruntime the box's image ships (its pin in tools/qemu/requirements.txt),
        which may be older than the host's: the publisher's own would make the box refuse them as incompatible.
        """
        pins = (ROOT / "tools" / "qemu" / "requirements.txt").read_text().splitlines()
        ort = next(line.split("==", 1)[1] for line in pins if line.startswith("onnxruntime=="))
        ort_minor = ".".join(ort.split(".")[:2])
        publisher = self.dir / "acme"
        self.edge("fleet", "publishers", "keygen", "acme", "--out", str(publisher))
        self.fleet_cmd("publishers", "add", "acme", str(publisher / "acme.pub"), "--models", "digits")
        releases = self.dir / "releases"
        subprocess.run(
            [sys.executable, str(ROOT / "tools/models/ota_models.py"), str(releases)], check=True, capture_output=True
        )
        d = releases / "digits" / "2.0.0"
        sys.path.insert(0, str(ROOT / "tools" / "models"))
        from ota_models import with_version  # noqa: PLC0415

        for version in versions:
            model = with_version(d / "model.onnx", self.dir / f"digits-{version}.onnx", version)
            self.fleet_cmd(
                "models", "publish", str(model), "--name", "digits", "--version", version,
                "--publisher", "acme", "--key", str(publisher / "acme.pem"), "--golden", str(d / "golden.npz"),
                "--tolerance", "1.6", "--latency-budget-ms", "5000", "--requires", f"onnxruntime={ort_minor}",
            )  # fmt: skip

    def rollout(self, version: str) -> None:
        """Start a one-stage rollout of digits ``version`` to the boxes running digits."""
        self.fleet_cmd("rollout", "start", "digits", version, "--stages", "100%", "--abort-on", "100%")

    def rollout_status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.fleet_cmd("rollout", "status", "--json"))
        return status

    # ------------------------------------------------------------ what the gateway stored

    def _store(self) -> Any:
        sys.path.insert(0, str(ROOT))
        from edge.fleet.store import open_store  # noqa: PLC0415

        return open_store(f"sqlite:///{self.fleet / 'fleet.db'}")

    def stored(self, device_id: str) -> list[Any]:
        """The device's stored envelopes (``StoredEnvelope``), in counter order."""
        store = self._store()
        try:
            return list(store.envelopes(device_id))
        finally:
            store.close()

    def rejects(self) -> dict[str, int]:
        """What the gateway rejected, by kind (forgeries, forks, replays...): empty for an honest box."""
        store = self._store()
        try:
            counts: dict[str, int] = store.quarantine_counts()
            return counts
        finally:
            store.close()

    def events(self, device_id: str, kind_prefix: str) -> list[Any]:
        store = self._store()
        try:
            return list(store.events(kind_prefix=kind_prefix, device_id=device_id))
        finally:
            store.close()


def chain_breaks(envelopes: list[Any]) -> list[str]:
    """Where the stored envelopes are not one hash chain from counter 1: gaps and forks (empty if none)."""
    breaks = []
    prev = None
    for expected, env in enumerate(envelopes, start=1):
        if env.counter != expected:
            breaks.append(f"counter {env.counter} where {expected} was due")
            break
        if prev is not None and env.prev != prev.hash:
            breaks.append(f"counter {env.counter} does not chain to counter {prev.counter}")
        prev = env
    return breaks

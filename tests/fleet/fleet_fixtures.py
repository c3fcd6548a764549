"""A fleet for tests: a real CA and registry in a fleet directory, and a real mosquitto configured only by the
fragment the registry generates (the operator's mosquitto.conf is the two lines the docs name, plus test logging).

The broker's access rules come from the dynamic-security plugin, which reads ``broker/dynsec.json`` only when it
starts: a test that changes the registry after ``FleetBroker.start`` either restarts the broker or runs a gateway
(``edge.fleet.broker_sync``) that applies the change live."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from gateway_helpers import gateway_toml
from mqtt_broker import free_port
from paho.mqtt.reasoncodes import ReasonCode

from edge._fs import atomic_write
from edge.fleet.config import BrokerConfig, GatewayConfig, IngestConfig, MetricsConfig, RolloutConfig
from edge.fleet.pki.ca import FleetCA
from edge.fleet.pki.registry import BrokerListener, Registry
from edge.fleet.store import DeviceRecord, open_store
from edge.identity.keys import generate_device_identity


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Creds:
    """What a client needs for mutual TLS with the fleet broker."""

    name: str
    ca: Path
    cert: Path
    key: Path


class Fleet:
    """A fleet directory with its CA and a registry over a real store (SQLite in the directory unless ``store_url``)."""

    def __init__(self, directory: Path, store_url: str | None = None) -> None:
        self.dir = directory
        self.ca = FleetCA.init(directory, now=utcnow())
        self.store_url = store_url or f"sqlite:///{directory / 'fleet.db'}"
        self.store = open_store(self.store_url)
        self.registry = Registry(self.store, directory)
        self.port = free_port()
        self.registry.set_listener(BrokerListener(port=self.port, bind="127.0.0.1"))
        cert, key = self.ca.issue_server(["127.0.0.1", "localhost"], now=utcnow(), days=2)
        atomic_write(directory / "broker" / "server.pem", cert)
        atomic_write(directory / "broker" / "server.key", key, mode=0o600)
        self.registry.write_broker_fragment(self.ca, now=utcnow())

    def enroll(self, device_id: str) -> tuple[DeviceRecord, Creds]:
        """Make a box identity (as `edge keys generate` does) and enroll its CSR; install the bundle beside it."""
        keys = self.dir.parent / "boxes" / device_id
        ident = generate_device_identity(keys, device_id)
        record = self.registry.enroll(ident.csr.read_bytes(), ca=self.ca, now=utcnow())
        bundle = self.registry.bundle_dir(device_id)
        for f in bundle.iterdir():
            shutil.copy(f, keys / f.name)
        return record, Creds(device_id, keys / "fleet-ca.pem", keys / "device.pem", keys / "device.key")

    def identity(self, name: str, *, operator: bool = False) -> Creds:
        """A gateway (or operator) identity as `edge fleet ca issue-client NAME [--operator]` makes it: recorded in
        the registry, the broker files rewritten, and its certificate issued."""
        (self.registry.add_operator if operator else self.registry.add_gateway)(name)
        self.registry.write_broker_fragment(self.ca, now=utcnow())
        return self.client_creds(name)

    def client_creds(self, name: str) -> Creds:
        """A client certificate from the fleet CA (a gateway identity if registered as one)."""
        out = self.dir.parent / "clients"
        out.mkdir(exist_ok=True)
        cert, key = self.ca.issue_client(name, now=utcnow(), days=2)
        atomic_write(out / f"{name}.pem", cert)
        atomic_write(out / f"{name}.key", key, mode=0o600)
        return Creds(name, self.ca.cert_path, out / f"{name}.pem", out / f"{name}.key")

    def gateway_config(self, creds: Creds, **ingest: Any) -> GatewayConfig:
        """A configuration for `Gateway` / `edge gateway run` on this fleet as ``creds`` (id = its CN), metrics and
        rollouts off."""
        return GatewayConfig(
            gateway=IngestConfig(id=creds.name, fleet_dir=self.dir, store=self.store_url, **ingest),
            broker=BrokerConfig(host="127.0.0.1", port=self.port, ca=creds.ca, cert=creds.cert, key=creds.key),
            metrics=MetricsConfig(enabled=False),
            rollout=RolloutConfig(enabled=False),
        )

    def close(self) -> None:
        self.store.close()


class FleetBroker:
    """mosquitto whose whole fleet configuration is `include_dir <fleet>/broker`."""

    def __init__(self, fleet: Fleet, directory: Path) -> None:
        self.fleet = fleet
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "mosquitto.log"
        self.conf = self.dir / "mosquitto.conf"
        run_as = "user root\n" if os.geteuid() == 0 else ""  # as root it would switch to a user that cannot read tmp
        self.conf.write_text(
            # The fragment turns persistence on and leaves its directory to mosquitto.conf, as Debian's sets it.
            f"{run_as}per_listener_settings false\npersistence_location {self.dir}/\nlog_dest file {self.log}\n"
            f"log_type error\nlog_type warning\nlog_type notice\ninclude_dir {fleet.registry.broker_dir}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.host, self.port = "127.0.0.1", fleet.port

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text(errors='replace')}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen")

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again: the plugin loads broker/dynsec.json (what it does without a running gateway)."""
        self.stop()
        self.start(timeout)

    def reload(self) -> None:
        """What `systemctl reload mosquitto` does: SIGHUP (re-reads the ACL and the CRL)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # the reload happens in the broker's main loop; there is no acknowledgement to wait for

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client:
    """A paho MQTT 5 client over mutual TLS that records what it receives."""

    def __init__(self, broker: FleetBroker, creds: Creds, client_id: str | None = None, *, timeout: float = 5) -> None:
        self.creds = creds
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or creds.name, protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key))
        self.client = c
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self._connack = threading.Event()
        self.connect_result: str | None = None
        self.disconnected = threading.Event()
        self.disconnect_reason: str | None = None
        # PUBACKs by message id: a QoS 0 publish also reports "published" (when paho writes it), and matching by id
        # keeps that, or a late acknowledgement, from answering for the next QoS 1 publish.
        self._acks: dict[int, str] = {}
        self._acked = threading.Condition(self._lock)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        try:
            c.connect(broker.host, broker.port)
        except OSError as e:
            self.connect_result = f"refused: {e}"
            return
        c.loop_start()
        if not self._connack.wait(timeout):
            self.connect_result = self.connect_result or "no CONNACK"

    @property
    def connected(self) -> bool:
        return self.connect_result == "Success"

    def _on_connect(self, _c, _u, _f, rc: ReasonCode, _p) -> None:
        self.connect_result = rc.getName()
        self._connack.set()

    def _on_disconnect(self, _c, _u, _f, rc: ReasonCode, _p) -> None:
        self.disconnect_reason = rc.getName()
        self.disconnected.set()

    def _on_message(self, _c, _u, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def received(self, topic_prefix: str = "") -> list[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic.startswith(topic_prefix)]

    def subscribe(self, topic: str) -> str:
        """Subscribe at QoS 1; returns the SUBACK's reason ("Granted QoS 1", "Not authorized", ...) or "no SUBACK"."""
        done = threading.Event()
        codes: list[str] = []

        def on_subscribe(_c, _u, _mid, rcs: list[ReasonCode], _p) -> None:
            codes.extend(rc.getName() for rc in rcs)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos=1)
        return codes[0] if done.wait(5) else "no SUBACK"

    def _on_publish(self, _c, _u, mid: int, rc: ReasonCode, _p) -> None:
        with self._acked:
            self._acks[mid] = "Success" if not rc.is_failure else rc.getName()
            self._acked.notify_all()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> str:
        """Publish at QoS 1; returns "Success" (any success code, incl. "No matching subscribers"), the failure's
        reason ("Not authorized"), or "no PUBACK"."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            if not self._acked.wait_for(lambda: info.mid in self._acks, timeout=5):
                return "no PUBACK"
            return self._acks.pop(info.mid)

    def close(self) -> None:
        self.client.disconnect()  # first: paho's network thread then ends at once instead of on its select timeout
        self.client.loop_stop()


class GatewayProcess:
    """`edge gateway run` as a process of its own, configured by a TOML file, its log (JSON lines) in a file."""

    ROOT = Path(__file__).resolve().parents[2]

    def __init__(self, config: GatewayConfig, directory: Path, name: str = "gateway") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.toml = directory / f"{name}.toml"
        self.toml.write_text(gateway_toml(config))
        self.log = directory / f"{name}.log"
        self.metrics_port = config.metrics.port if config.metrics.enabled else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until it is connected to the broker (its "connected" event)."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "gateway", "run", "--config", str(self.toml)],
                cwd=self.ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        proc = self.proc
        if not wait_until(lambda: proc.poll() is not None or '"connected"' in self.log_text(offset), timeout):
            raise RuntimeError(f"gateway did not connect: {self.log_text(offset)[-3000:]}")
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}: {self.log_text(offset)[-3000:]}")

    def log_text(self, offset: int = 0) -> str:
        """Its log from byte ``offset`` on."""
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    @property
    def alive(self) -> bool:
        """Running (started and not exited)."""
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Its exit code once it exits within ``timeout`` seconds, else None (still running)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (what systemd sends), then SIGKILL after ``timeout``; its exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def metric(self, name: str) -> float:
        """One sample of its Prometheus endpoint (0 when absent); needs metrics enabled."""
        assert self.metrics_port is not None, "metrics are off in this configuration"
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())

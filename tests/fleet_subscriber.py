"""A verifying subscriber for tests: the gateway's view of what devices published, checked with ChainVerifier.

It holds a persistent MQTT 5 session (clean_start false, session expiry) as identity "gateway", so what devices
publish while it reconnects after a broker restart is queued for it, and verifies every envelope it receives.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from mqtt_broker import GATEWAY_ID, Broker, TestPKI
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.wire.chain import ChainVerifier, MemoryChainState
from edge.wire.schema import LossNotice


@dataclass
class Tally:
    """What the subscriber saw, per verdict kind, and the counters it accepted per device."""

    kinds: Counter[str] = field(default_factory=Counter)
    accepted: dict[str, set[int]] = field(default_factory=dict)
    announced_lost: dict[str, set[int]] = field(default_factory=dict)
    records: int = 0


class VerifyingSubscriber:
    """Subscribes to ``devices/+/telemetry`` and classifies every envelope as it arrives."""

    def __init__(self, broker: Broker, pki: TestPKI, keys: dict[str, Ed25519PublicKey]) -> None:
        self.keys = keys
        self.verifier = ChainVerifier(_Keys(keys), MemoryChainState())
        self.tally = Tally()
        self.messages = 0
        self._lock = threading.Lock()
        creds = pki.client(GATEWAY_ID)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-gateway", protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key))
        c.reconnect_delay_set(0.1, 1.0)
        c.on_message = self._on_message
        c.on_connect = self._on_connect
        self.client = c
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self._connected = threading.Event()
        c.connect(broker.host, broker.port, clean_start=False, properties=props)
        c.loop_start()
        assert self._connected.wait(10), "gateway subscriber could not connect"

    def _on_connect(self, client, _u, _flags, rc, _props) -> None:
        if not rc.is_failure:
            client.subscribe("devices/+/telemetry", qos=1)
            self._connected.set()

    def _on_message(self, _c, _u, msg: mqtt.MQTTMessage) -> None:
        topic_device = msg.topic.split("/")[1]
        with self._lock:
            self.messages += 1
            v = self.verifier.verify(msg.payload, topic_device=topic_device)
            t = self.tally
            t.kinds[v.kind] += 1
            if v.kind in ("next", "first", "gap", "late"):
                t.accepted.setdefault(v.device_id or "", set()).add(v.counter or 0)
                for r in v.records or ():
                    t.records += 1
                    if isinstance(r, LossNotice):
                        lost = t.announced_lost.setdefault(v.device_id or "", set())
                        lost.update(range(r.first_counter, r.last_counter + 1))

    def wait_for(self, device: str, counters: set[int], timeout: float) -> bool:
        """Wait until every counter in ``counters`` was accepted (or announced lost) for ``device``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                have = self.tally.accepted.get(device, set()) | self.tally.announced_lost.get(device, set())
            if counters <= have:
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


class _Keys:
    def __init__(self, keys: dict[str, Ed25519PublicKey]) -> None:
        self.keys = keys

    def lookup(self, device_id: str) -> Ed25519PublicKey | None:
        return self.keys.get(device_id)

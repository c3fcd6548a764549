"""Helpers for gateway tests: simulated devices that seal real envelopes and publish them as themselves."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from mqtt_broker import GATEWAY_ID, Broker, TestPKI

from edge.fleet.config import BrokerConfig, GatewayConfig, IngestConfig, MetricsConfig
from edge.fleet.store import DeviceRecord
from edge.identity.did import did_key_from_public
from edge.wire.envelope import GENESIS_PREV, envelope_hash, seal_envelope
from edge.wire.records import InferenceRecord


def inference_records(
    device_id: str, counter: int, n: int, *, model: str = "digits@1.0.0", salt: str = ""
) -> list[InferenceRecord]:
    """``n`` inference records of envelope ``counter``, stamped now, each of its own input (as a camera's frames
    are: the ledger credits an input once); ``salt`` makes the inputs of another call differ."""
    now = time.time()
    return [
        InferenceRecord(
            seq=counter * 1000 + i,
            timestamp=now,
            model_id=model,
            model_sha256="ab" * 32,
            input_sha256=hashlib.sha256(f"{device_id}/{counter}/{i}{salt}".encode()).hexdigest(),
            pixel_format="YUYV",
            top_k=((i % 10, 0.9),),
            score=None,
            label=i % 10,
            preprocess_us=10,
            inference_us=90,
            latency_us=200,
            backend="native-avx2",
        )
        for i in range(n)
    ]


class SimDevice:
    """A device key, its chain, and envelopes of inference records."""

    def __init__(self, device_id: str, *, model: str = "digits@1.0.0") -> None:
        self.id = device_id
        self.key = Ed25519PrivateKey.generate()
        self.model = model
        self.counter = 0
        self.prev = GENESIS_PREV

    def record(self, enrolled_at: float | None = None) -> DeviceRecord:
        """Its registry record, enrolled now or at ``enrolled_at`` (the ledger credits no work from before)."""
        pub = self.key.public_key()
        raw = pub.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return DeviceRecord(
            self.id, did_key_from_public(pub), raw, "", time.time() if enrolled_at is None else enrolled_at
        )

    def seal(self, n_records: int = 10) -> bytes:
        self.counter += 1
        recs = inference_records(self.id, self.counter, n_records, model=self.model)
        data = seal_envelope(self.id, self.counter, self.prev, recs, time.time(), self.key)
        self.prev = envelope_hash(data)
        return data


class Publisher:
    """A plain paho client with a certificate of its own, publishing QoS 1 and waiting for PUBACKs."""

    def __init__(self, broker: Broker, pki: TestPKI, identity: str, key: Ed25519PrivateKey | None = None) -> None:
        creds = pki.client(identity, key=key)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{identity}", protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key))
        c.max_inflight_messages_set(0)
        ready = threading.Event()
        c.on_connect = lambda *_a: ready.set()
        c.connect(broker.host, broker.port)
        c.loop_start()
        assert ready.wait(10), f"{identity} could not connect"
        self.client = c

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def gateway_config(
    broker: Broker,
    pki: TestPKI,
    fleet_dir: Path,
    store_url: str,
    *,
    gateway_id: str = GATEWAY_ID,  # `edge gateway run` requires the id to be the certificate's CN
    metrics_port: int = 0,
    batch_max: int = 200,
) -> GatewayConfig:
    """A gateway configuration for the test broker (an ACL file, no dynamic-security plugin to keep in step)."""
    creds = pki.client(gateway_id)  # the CN is the client id: one certificate per gateway process
    return GatewayConfig(
        gateway=IngestConfig(id=gateway_id, fleet_dir=fleet_dir, store=store_url, batch_max=batch_max),
        broker=BrokerConfig(
            host=broker.host, port=broker.port, ca=creds.ca, cert=creds.cert, key=creds.key, dynamic_security=False
        ),
        metrics=MetricsConfig(enabled=metrics_port > 0, port=metrics_port or 9108),
    )


def gateway_toml(cfg: GatewayConfig) -> str:
    """The same configuration as a TOML file for ``edge gateway run``."""
    g, b, m = cfg.gateway, cfg.broker, cfg.metrics
    return f"""
[gateway]
id = "{g.id}"
share_group = "{g.share_group}"
fleet_dir = "{g.fleet_dir}"
store = "{g.store}"
batch_max = {g.batch_max}
store_timeout_s = {g.store_timeout_s}
reject_burst = {g.reject_burst}
reject_per_s = {g.reject_per_s}
suspend_s = {g.suspend_s}
[broker]
dynamic_security = {"true" if b.dynamic_security else "false"}
session_expiry_s = {b.session_expiry_s}
host = "{b.host}"
port = {b.port}
ca = "{b.ca}"
cert = "{b.cert}"
key = "{b.key}"
[metrics]
enabled = {"true" if m.enabled else "false"}
port = {m.port}
[log]
level = "info"
"""

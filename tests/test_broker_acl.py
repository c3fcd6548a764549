"""The broker the tests (and the fleet) rely on: mutual TLS and per-device topic confinement, proven with paho."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode


def connect(broker, creds, client_id: str | None = None) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or creds.device_id, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key))
    connected = threading.Event()
    c.on_connect = lambda *_a: connected.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    assert connected.wait(5), "no CONNACK"
    return c


def publish_reason(client: mqtt.Client, topic: str) -> ReasonCode:
    done = threading.Event()
    result: list[ReasonCode] = []

    def on_publish(_c, _u, _mid, rc, _p) -> None:
        result.append(rc)
        done.set()

    client.on_publish = on_publish
    client.publish(topic, b"payload", qos=1)
    assert done.wait(5), "no PUBACK"
    return result[0]


def test_device_may_publish_only_under_its_own_namespace(broker, pki) -> None:
    a = connect(broker, pki.client("dev-a"))
    try:
        assert not publish_reason(a, "devices/dev-a/telemetry").is_failure
        assert publish_reason(a, "devices/dev-b/telemetry").getName() == "Not authorized"
        assert publish_reason(a, "other/topic").getName() == "Not authorized"
    finally:
        a.loop_stop()
        a.disconnect()


def test_device_cannot_read_another_devices_topics(broker, pki) -> None:
    a = connect(broker, pki.client("dev-a"))
    b = connect(broker, pki.client("dev-b"))
    got: list[str] = []
    subscribed = threading.Event()
    granted: list[ReasonCode] = []

    def on_subscribe(_c, _u, _mid, codes, _p) -> None:
        granted.extend(codes)
        subscribed.set()

    a.on_subscribe = on_subscribe
    a.on_message = lambda _c, _u, msg: got.append(msg.topic)
    try:
        a.subscribe("devices/dev-b/#", qos=1)
        assert subscribed.wait(5)
        assert publish_reason(b, "devices/dev-b/telemetry").getName() == "Success"
        # mosquitto grants the subscription but never delivers what the ACL forbids: nothing may arrive.
        threading.Event().wait(0.5)
        assert got == []
    finally:
        for c in (a, b):
            c.loop_stop()
            c.disconnect()


def test_client_without_certificate_is_refused(broker, pki) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="anon", protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(pki.ca))
    connected = threading.Event()
    c.on_connect = lambda _c, _u, _f, rc, _p: connected.set() if not rc.is_failure else None
    try:
        c.connect(broker.host, broker.port)
    except OSError:
        return  # refused during the handshake: what we want
    c.loop_start()
    try:
        # TLS 1.3 reports a missing client certificate after the handshake: the broker must drop us, never CONNACK.
        assert not connected.wait(1.5)
    finally:
        c.loop_stop()

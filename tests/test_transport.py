"""MqttTransport against a real mosquitto: mTLS, PUBACK outcomes, birth and will, reconnects, failed deliveries."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edge.errors import ConfigError, TransportError
from edge.mqtt import Backoff, Delivery, MqttSettings, MqttTransport

ROOT = Path(__file__).resolve().parent.parent


def settings_for(broker, creds, **kw) -> MqttSettings:
    base = {
        "host": broker.host,
        "port": broker.port,
        "ca": creds.ca,
        "cert": creds.cert,
        "key": creds.key,
        "client_id": creds.device_id,
        "backoff_min": 0.1,
        "backoff_max": 0.5,
        "connect_timeout": 5.0,
    }
    return MqttSettings(**{**base, **kw})


class Inbox:
    """What a subscriber received, with a way to wait for a condition."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.messages.append((topic, payload))
            self._cond.notify_all()

    def wait_for(self, pred, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self.messages), timeout)


def started(transport: MqttTransport, timeout: float = 5.0) -> MqttTransport:
    transport.start()
    assert transport.wait_connected(timeout), "no session within the timeout"
    return transport


@pytest.fixture
def gateway(broker, pki):
    """A gateway subscriber on everything under devices/."""
    inbox = Inbox()
    t = started(
        MqttTransport(settings_for(broker, pki.client("gateway")), on_message=inbox, subscriptions=["devices/#"])
    )
    time.sleep(0.2)  # let the SUBACK arrive before the test publishes
    yield inbox
    t.stop()


# -- sans-IO pieces ---------------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_within_a_doubling_capped_ceiling() -> None:
    b = Backoff(0.5, 30.0, random.Random(7))
    assert [b.ceiling(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert b.ceiling(10_000) == 30.0
    for n in range(12):
        delays = [b.delay(n) for _ in range(200)]
        assert all(0.0 <= d <= b.ceiling(n) for d in delays)
        # full jitter: the whole interval is used, not just its top
        assert min(delays) < 0.2 * b.ceiling(n) and max(delays) > 0.8 * b.ceiling(n)


def test_backoff_is_deterministic_with_a_seeded_rng() -> None:
    a, b = Backoff(0.5, 30.0, random.Random(1)), Backoff(0.5, 30.0, random.Random(1))
    assert [a.delay(n) for n in range(6)] == [b.delay(n) for n in range(6)]


@pytest.mark.parametrize(
    ("field", "value"),
    [("port", 0), ("keepalive", 0), ("inflight", -1), ("backoff_min", 0.0), ("backoff_min", 60.0), ("client_id", "")],
)
def test_settings_reject_out_of_range_values(tmp_path: Path, field: str, value: object) -> None:
    kw: dict[str, object] = {"host": "h", "port": 8883, "ca": tmp_path, "cert": tmp_path, "key": tmp_path}
    kw["client_id"] = "dev-a"
    kw[field] = value
    with pytest.raises(ConfigError, match=field):
        MqttSettings(**kw)  # type: ignore[arg-type]


def test_delivery_resolves_once_and_runs_late_callbacks_at_once() -> None:
    d = Delivery("t")
    seen: list[str | None] = []
    d.add_done_callback(lambda x: seen.append(x.reason))
    assert not d.done() and not d.wait(0.01)
    assert d.resolve(ok=True, reason="Success", reason_code=0)
    assert not d.fail(TransportError("late"))  # the first resolution wins
    d.add_done_callback(lambda x: seen.append(x.reason))
    assert d.wait(0) and d.ok and d.error is None and seen == ["Success", "Success"]


def test_missing_certificate_is_a_config_error(broker, pki, tmp_path: Path) -> None:
    """The error names the one file that is missing, by its real key, not the TLS context as a whole."""
    creds = pki.client("dev-a")
    s = settings_for(broker, creds, key=tmp_path / "missing.key")
    with pytest.raises(ConfigError, match=r"'telemetry\.key'.*missing\.key") as err:
        MqttTransport(s).start()
    assert err.value.key == "telemetry.key"


# -- against the broker -----------------------------------------------------------------------------------------


def test_mtls_connect_and_publish_is_acknowledged(broker, pki) -> None:
    t = started(MqttTransport(settings_for(broker, pki.client("dev-a"))))
    try:
        d = t.publish("devices/dev-a/telemetry", b"hello")
        assert d.wait(5)
        # 0x10 "No matching subscribers" is a success code too (nobody subscribes in this test)
        assert d.ok and d.reason_code in (0x00, 0x10) and d.error is None
        assert t.receive_maximum >= 1
    finally:
        t.stop()
    assert not t.connected


def test_publish_to_another_devices_topic_fails_not_authorized_without_hanging(broker, pki) -> None:
    t = started(MqttTransport(settings_for(broker, pki.client("dev-a"))))
    try:
        d = t.publish("devices/dev-b/telemetry", b"spoof")
        assert d.wait(5), "a refused publish must resolve, not hang"
        assert not d.ok and d.reason == "Not authorized" and d.error is None
        # mosquitto 2.0.11 closes the connection right after such a refusal ("Bad socket read/write"; raw paho sees
        # the same): the transport reconnects by itself and the device's own topic works again.
        deadline = time.monotonic() + 5
        ok = None
        while ok is None and time.monotonic() < deadline:
            if t.wait_connected(1):
                try:
                    own = t.publish("devices/dev-a/telemetry", b"x")
                except TransportError:
                    continue
                if own.wait(5) and own.error is None:
                    ok = own.ok
        assert ok
    finally:
        t.stop()


def test_publish_while_disconnected_raises_transport_error(broker, pki) -> None:
    broker.stop()
    t = MqttTransport(settings_for(broker, pki.client("dev-a")))
    t.start()
    try:
        assert not t.wait_connected(0.3)
        with pytest.raises(TransportError, match="not connected"):
            t.publish("devices/dev-a/telemetry", b"x")
    finally:
        t.stop()


def test_birth_is_retained_and_seen_by_the_gateway(broker, pki, gateway) -> None:
    status = "devices/dev-a/status"
    t = started(MqttTransport(settings_for(broker, pki.client("dev-a")), birth=(status, b"online")))
    try:
        assert gateway.wait_for(lambda m: (status, b"online") in m)
    finally:
        t.stop()
    # retained: a subscriber arriving later gets it too
    late = Inbox()
    # another client id: two sessions with one id take each other over
    g2 = started(
        MqttTransport(
            settings_for(broker, pki.client("gateway"), client_id="gateway-late"),
            on_message=late,
            subscriptions=[status],
        )
    )
    try:
        assert late.wait_for(lambda m: (status, b"online") in m)
    finally:
        g2.stop()


DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edge.mqtt import MqttSettings, MqttTransport
    host, port, ca, cert, key, dev = sys.argv[1:7]
    s = MqttSettings(host=host, port=int(port), ca=Path(ca), cert=Path(cert), key=Path(key), client_id=dev)
    status = f"devices/{dev}/status"
    t = MqttTransport(s, will=(status, b"offline", True), birth=(status, b"online"))
    t.start()
    assert t.wait_connected(10)
    print("up", flush=True)
    time.sleep(60)
    """
)


def test_will_fires_when_the_device_process_is_killed(broker, pki, gateway) -> None:
    creds = pki.client("dev-w")
    status = "devices/dev-w/status"
    args = [str(x) for x in (broker.host, broker.port, creds.ca, creds.cert, creds.key, creds.device_id)]
    proc = subprocess.Popen(
        [sys.executable, "-c", DEVICE_SCRIPT, *args],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert gateway.wait_for(lambda m: (status, b"online") in m)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        assert gateway.wait_for(lambda m: (status, b"offline") in m), "the will did not fire"
    finally:
        proc.kill()
        proc.wait()


def test_clean_stop_does_not_fire_the_will(broker, pki, gateway) -> None:
    status = "devices/dev-a/status"
    t = started(
        MqttTransport(settings_for(broker, pki.client("dev-a")), will=(status, b"offline", True), birth=(status, b"on"))
    )
    assert gateway.wait_for(lambda m: (status, b"on") in m)
    t.stop()
    time.sleep(0.5)
    assert (status, b"offline") not in gateway.messages


@pytest.mark.parametrize("kill", [False, True])
def test_reconnects_after_broker_restart_and_republishes_birth(broker, pki, kill: bool) -> None:
    status = "devices/dev-a/status"
    births = 0

    def birth() -> tuple[str, bytes]:
        nonlocal births
        births += 1
        return status, f"online {births}".encode()

    t = started(MqttTransport(settings_for(broker, pki.client("dev-a"), keepalive=5), birth=birth))
    try:
        broker.stop(kill=kill)
        deadline = time.monotonic() + 5
        while t.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not t.connected
        time.sleep(1.0)
        broker.start()
        t0 = time.monotonic()
        assert t.wait_connected(5), "not reconnected within 5 s of the broker's return"
        print(f"reconnected {time.monotonic() - t0:.2f} s after the broker returned; attempts {t.attempts}")
        assert t.connects == 2 and births == 2
        assert t.publish("devices/dev-a/telemetry", b"after").wait(5)
    finally:
        t.stop()
    inbox = Inbox()
    g = started(MqttTransport(settings_for(broker, pki.client("gateway")), on_message=inbox, subscriptions=[status]))
    try:
        assert inbox.wait_for(lambda m: (status, b"online 2") in m), "the birth was not re-published on reconnect"
    finally:
        g.stop()


def test_deliveries_in_flight_fail_with_transport_error_when_the_broker_dies(broker, pki) -> None:
    t = started(MqttTransport(settings_for(broker, pki.client("dev-a"))))
    try:
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)  # frozen: nothing will be acknowledged
        deliveries = [t.publish("devices/dev-a/telemetry", b"x" * 100) for _ in range(50)]
        time.sleep(0.2)
        assert not any(d.done() for d in deliveries)
        broker.stop(kill=True)
        assert all(d.wait(5) for d in deliveries), "every delivery resolves when its connection ends"
        assert all(not d.ok and isinstance(d.error, TransportError) for d in deliveries)
    finally:
        t.stop()

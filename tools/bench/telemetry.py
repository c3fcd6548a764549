"""Benchmark of telemetry publishing: the Publisher draining the outbox against raw paho from memory, side by side.

Starts its own mosquitto on loopback with TLS and client certificates (tests/mqtt_broker.py), seals envelopes of
``--records`` records into an outbox beforehand, then measures, in envelopes/s and records/s:
(a) raw paho-mqtt QoS 1: the same envelope bytes published from memory, paho's in-flight window 20, 100, unlimited;
(b) ``Publisher`` + ``MqttTransport`` draining a copy of the pre-filled outbox (PUBACKs collected, acknowledgements
    committed to the outbox), for several windows, with the outbox's row verification on (the default) and off,
    and draining an in-memory outbox (the same bytes) to isolate Publisher + MqttTransport from SQLite;
and the ratio (b)/(a) against the best (a) (target >= 0.8x). Each figure is the best of ``--repeats`` runs.

Usage: python tools/bench/telemetry.py [--envelopes N] [--records R] [--repeats K] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test broker (PKI, config, process) is reused, not copied

import paho.mqtt.client as mqtt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from mqtt_broker import Broker, TestPKI  # noqa: E402

from edge.records import ReadingRecord  # noqa: E402
from edge.telemetry.outbox import Outbox  # noqa: E402
from edge.telemetry.publisher import Publisher  # noqa: E402
from edge.telemetry.schema import TelemetryLimits  # noqa: E402
from edge.telemetry.transport import MqttSettings, MqttTransport  # noqa: E402

DEVICE = "dev-bench"
PAYLOADS: list[bytes] = []
TOPIC = f"devices/{DEVICE}/telemetry"


def raw_paho(broker: Broker, creds, payloads: list[bytes], inflight: int) -> float:
    """Seconds to publish all payloads at QoS 1 with paho and receive every PUBACK."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{DEVICE}-raw", protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key))
    c.max_inflight_messages_set(inflight)
    connected, done = threading.Event(), threading.Event()
    acked = 0

    def on_publish(*_a: object) -> None:
        nonlocal acked
        acked += 1
        if acked == len(payloads):
            done.set()

    c.on_connect = lambda *_a: connected.set()
    c.on_publish = on_publish
    c.connect(broker.host, broker.port)
    c.loop_start()
    assert connected.wait(5)
    t0 = time.perf_counter()
    for p in payloads:
        c.publish(TOPIC, p, qos=1)
    assert done.wait(120), f"only {acked} PUBACKs"
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return dt


class MemoryOutbox:
    """The outbox interface over a dict: isolates Publisher + MqttTransport from SQLite and row verification."""

    def __init__(self, rows: list[tuple[int, bytes]]) -> None:
        self.rows = dict(rows)

    def pending(self, after: int = 0, limit: int = 1000) -> list[tuple[int, bytes]]:
        return [(c, d) for c, d in self.rows.items() if c > after][:limit]

    def ack(self, counters) -> int:
        return sum(self.rows.pop(c, None) is not None for c in counters)

    def stats(self):
        return type("S", (), {"backlog_envelopes": len(self.rows)})()

    def close(self) -> None:
        pass


def publisher_drain(broker: Broker, creds, key, db: Path | None, n: int, window: int, verify_rows: bool) -> float:
    """Seconds for the Publisher to drain a copy of the pre-filled outbox (every envelope acknowledged)."""
    if db is None:
        outbox = MemoryOutbox(list(enumerate(PAYLOADS, 1)))
    else:
        outbox = Outbox(db, device_id=DEVICE, key=key, limits=TelemetryLimits(), verify_rows=verify_rows)
    s = MqttSettings(broker.host, broker.port, creds.ca, creds.cert, creds.key, client_id=DEVICE)
    transport = MqttTransport(s)
    transport.start()
    assert transport.wait_connected(5)
    publisher = Publisher(outbox, transport, TOPIC, window=window)
    t0 = time.perf_counter()
    publisher.start()
    while publisher.stats().acked < n:
        time.sleep(0.001)
    dt = time.perf_counter() - t0
    publisher.stop(0)
    transport.stop()
    assert outbox.stats().backlog_envelopes == 0
    outbox.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envelopes", type=int, default=3000)
    ap.add_argument("--records", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", default="20,100,500,1000")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n, r = args.envelopes, args.records
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pki = TestPKI(d / "pki")
        key = Ed25519PrivateKey.generate()
        creds = pki.client(DEVICE, key)
        broker = Broker(d / "broker", pki)
        broker.start()
        try:
            master = d / "master.db"
            ob = Outbox(master, device_id=DEVICE, key=key, limits=TelemetryLimits(), max_envelopes=10 * n)
            now = time.time()
            batch = [ReadingRecord(channel=i % 8, value=float(i), timestamp=now + i) for i in range(r)]
            for start in range(0, n, 500):
                ob.seal_many([batch] * min(500, n - start))
            payloads = [data for _, data in ob.pending(after=0, limit=n)]
            PAYLOADS[:] = payloads
            ob.close()
            size = sum(map(len, payloads)) / len(payloads)

            results: dict[str, float] = {}
            for w in (20, 100, 0):
                best = min(raw_paho(broker, creds, payloads, w) for _ in range(args.repeats))
                results[f"raw_paho_inflight_{w or 'unlimited'}"] = n / best
            raw_best = max(results.values())
            for outbox_kind in ("sqlite_verify_on", "sqlite_verify_off", "memory"):
                for w in (int(x) for x in args.windows.split(",")):
                    times = []
                    for i in range(args.repeats):
                        db = None
                        if outbox_kind != "memory":
                            db = d / f"run-{w}-{outbox_kind}-{i}.db"
                            shutil.copy(master, db)
                        times.append(publisher_drain(broker, creds, key, db, n, w, outbox_kind.endswith("on")))
                    results[f"publisher_w{w}_{outbox_kind}"] = n / min(times)
        finally:
            broker.stop()
    if args.json:
        print(json.dumps({"envelope_bytes": size, "records": r, "envelopes_per_s": results}, indent=2))
        return
    print(f"{n} envelopes of {r} records ({size:.0f} bytes each), best of {args.repeats}; raw best {raw_best:.0f}/s")
    print(f"{'run':42} {'envelopes/s':>12} {'records/s':>12} {'vs raw':>7}")
    for name, eps in results.items():
        print(f"{name:42} {eps:12.0f} {eps * r:12.0f} {eps / raw_best:7.2f}")


if __name__ == "__main__":
    main()

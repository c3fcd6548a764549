"""Benchmark of telemetry: the whole chain sustained, and the publish path against raw paho, side by side.

Starts its own mosquitto on loopback with TLS and client certificates (tests/mqtt_broker.py) and measures:
(e) end to end, sustained, into a real fleet: a fleet directory, mosquitto configured by its generated fragment and
    one `edge gateway run` process storing into SQLite and signing receipts (receipt_interval_s 0.1). Inference
    records are written to the TelemetrySink as the pipeline does (default batching: 100 records per envelope) ->
    envelope (CBOR, COSE_Sign1) -> outbox (durable commit) -> publish QoS 1 -> gateway verifies and stores ->
    deletion, until the outbox is empty, twice: deleting on the fleet's signed receipt (the box's default) and on
    the broker's PUBACK (the old behaviour), alternating runs; records/s (target >= 20,000 with receipts) and the
    ratio receipts / PUBACK (target >= 0.9x). Each run is a new device (a new chain). The gateway shares the two
    cores with the box and the broker, so these figures are lower than the publish path's alone;
(c) per-envelope costs: sign (seal_envelope), verify (open_envelope), envelope bytes per record, outbox commit
    (seal_many in groups of 1 and 8);
and, with envelopes of ``--records`` inference records sealed into an outbox beforehand, in envelopes/s:
(a) raw paho-mqtt QoS 1: the same envelope bytes published from memory, paho's in-flight window 20, 100, unlimited;
(b) ``Publisher`` + ``MqttTransport`` draining a copy of the pre-filled outbox (PUBACKs collected, acknowledgements
    committed to the outbox), for several windows, with the outbox's row verification on (the default) and off,
    and draining an in-memory outbox (the same bytes) to isolate Publisher + MqttTransport from SQLite;
and the ratio (b)/(a) against the best (a) (target >= 0.8x). Each figure is the best of ``--repeats`` runs.

For (a)-(c) a subscriber in a process of its own stands in for the gateway (QoS 0, payloads dropped): the publisher
keeps an envelope the broker acknowledges with "no matching subscribers", so without one nothing would drain. Raw paho
and the publisher pay its cost at the broker alike. A run that does not drain within two minutes is an error.

Usage: python tools/bench/telemetry.py [--envelopes N] [--records R] [--repeats K] [--json]
       python tools/bench/telemetry.py --quick   # a few seconds, no figures worth quoting: make test runs it
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test broker (PKI, config, process) is reused, not copied
sys.path.insert(0, str(ROOT / "tests" / "fleet"))  # and the test fleet (CA, registry, broker, gateway process)

import paho.mqtt.client as mqtt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from fleet_fixtures import Fleet, FleetBroker, GatewayProcess  # noqa: E402
from mqtt_broker import GATEWAY_ID, Broker, TestPKI  # noqa: E402

from edge.identity.keys import load_private_key, load_public_key  # noqa: E402
from edge.mqtt import MqttSettings, MqttTransport  # noqa: E402
from edge.telemetry.outbox import Outbox  # noqa: E402
from edge.telemetry.publisher import Publisher, ReceiptPolicy  # noqa: E402
from edge.telemetry.sink import TelemetrySink  # noqa: E402
from edge.wire.envelope import envelope_hash, open_envelope, seal_envelope  # noqa: E402
from edge.wire.receipts import verify_receipt  # noqa: E402
from edge.wire.records import InferenceRecord  # noqa: E402
from edge.wire.schema import TelemetryLimits  # noqa: E402
from edge.wire.topics import device_topics  # noqa: E402

DEVICE = "dev-bench"
PAYLOADS: list[bytes] = []
TOPIC = f"devices/{DEVICE}/telemetry"
DRAIN_TIMEOUT_S = 120.0


def gateway_stand_in(host: str, port: int, ca: str, cert: str, key: str, ready: Any) -> None:
    """Run in a process of its own: subscribe to every device's telemetry at QoS 0 and drop what arrives."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-gateway", protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
    c.on_connect = lambda client, *_a: client.subscribe("devices/+/telemetry", qos=0)
    c.on_subscribe = lambda *_a: ready.set()
    c.connect(host, port)
    c.loop_forever()


def start_gateway_stand_in(broker: Broker, pki: TestPKI) -> multiprocessing.process.BaseProcess:
    """Start ``gateway_stand_in`` (off this process's GIL) and wait for its subscription."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    creds = pki.client(GATEWAY_ID)
    args = (broker.host, broker.port, str(creds.ca), str(creds.cert), str(creds.key), ready)
    proc = ctx.Process(target=gateway_stand_in, args=args, daemon=True)
    proc.start()
    if not ready.wait(30):
        proc.terminate()
        raise RuntimeError("the gateway stand-in did not subscribe within 30 s")
    return proc


def wait_acked(publisher: Publisher, n: int) -> None:
    """Wait until the publisher has ``n`` acknowledgements; an error after ``DRAIN_TIMEOUT_S``, not a hang."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while publisher.stats().acked < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{publisher.stats().acked} of {n} envelopes acknowledged in {DRAIN_TIMEOUT_S:.0f} s")
        time.sleep(0.001)


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
        # The publisher reads on its thread while its acker deletes on another, as with the real outbox's lock.
        self.lock = threading.Lock()

    def pending(self, after: int = 0, limit: int = 1000) -> list[tuple[int, bytes]]:
        with self.lock:
            return [(c, d) for c, d in self.rows.items() if c > after][:limit]

    def ack(self, counters) -> int:
        with self.lock:
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
    wait_acked(publisher, n)
    dt = time.perf_counter() - t0
    publisher.stop(0)
    transport.stop()
    assert outbox.stats().backlog_envelopes == 0
    outbox.close()
    return dt


def inference_records(n: int) -> list[InferenceRecord]:
    """Records shaped like the digits pipeline's (top-3, timings, hashes)."""
    now = time.time()
    return [
        InferenceRecord(
            seq=i,
            timestamp=now + i * 0.001,
            model_id="digits@1.0.0",
            model_sha256="c0d2286f1924fb42f02e7b4625c5e9418cdc7f26bc20914da2f718a47267e281",
            input_sha256=f"{i * 2654435761 % 2**256:064x}",
            pixel_format="YUYV",
            top_k=((i % 10, 0.93), ((i + 3) % 10, 0.04), ((i + 7) % 10, 0.01)),
            score=None,
            label=i % 10,
            preprocess_us=11,
            inference_us=88,
            latency_us=140 + i % 50,
            backend="native-avx2",
        )
        for i in range(n)
    ]


class FleetRig:
    """A real fleet for the end-to-end runs: CA and registry, mosquitto from its fragment, one gateway process."""

    def __init__(self, d: Path, devices: list[str]) -> None:
        self.fleet = Fleet(d / "fleet")
        self.creds = {dev: self.fleet.enroll(dev)[1] for dev in devices}
        gw = self.fleet.identity("gateway")
        self.broker = FleetBroker(self.fleet, d / "fleet-broker")
        self.broker.start()
        self.gateway = GatewayProcess(self.fleet.gateway_config(gw, receipt_interval_s=0.1), d / "gw")
        self.gateway.start()

    def close(self) -> None:
        self.gateway.stop()
        self.broker.stop()
        self.fleet.close()


def end_to_end(
    rig: FleetRig, device: str, db: Path, records: list[InferenceRecord], *, receipts: bool
) -> tuple[float, int]:
    """Seconds to take every record through sink -> outbox -> publisher -> gateway -> deletion; envelopes sealed.

    ``receipts``: delete when the gateway's signed receipt covers an envelope; else on the broker's PUBACK.
    """
    creds = rig.creds[device]
    key = load_private_key(creds.key)
    outbox = Outbox(db, device_id=device, key=key, limits=TelemetryLimits())
    topics = device_topics(device)
    receipt_key = load_public_key(creds.cert.parent / "fleet-receipts.pub")
    publisher: Publisher | None = None

    def on_message(topic: str, payload: bytes) -> None:
        if publisher is not None and topic == topics["receipts"]:
            publisher.on_receipt(verify_receipt(payload, receipt_key, device), payload)

    s = MqttSettings("127.0.0.1", rig.fleet.port, creds.ca, creds.cert, creds.key, client_id=device)
    # The birth status asks the gateway for a receipt, as the box's does: the session is synced before the clock.
    birth = (topics["status"], json.dumps({"state": "online", "device": device}).encode())
    transport = MqttTransport(s, birth=birth, on_message=on_message, subscriptions=[topics["receipts"]])
    publisher = Publisher(outbox, transport, topics["telemetry"], receipts=ReceiptPolicy() if receipts else None)
    transport.start()
    assert transport.wait_connected(10)
    publisher.start()
    if receipts:
        deadline = time.monotonic() + 30
        while publisher.stats().receipts == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("no receipt for the birth within 30 s")
            time.sleep(0.01)
    sink = TelemetrySink(outbox, wake=publisher.wake)  # the service's defaults: 100 records or 1 s
    t0 = time.perf_counter()
    for i in range(0, len(records), 64):  # the pipeline's emit stage hands over up to 64 records at a time
        sink.write(records[i : i + 64])
    sink.flush()
    sealed = sink.stats.envelopes
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while outbox.stats().backlog_envelopes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{outbox.stats().backlog_envelopes} envelopes left after {DRAIN_TIMEOUT_S:.0f} s")
        time.sleep(0.002)
    dt = time.perf_counter() - t0
    delivery = outbox.delivery()
    # The run proves what it measured: every envelope left by the chosen path and no other.
    assert (delivery.receipted_envelopes if receipts else delivery.acked_envelopes) == sealed, delivery
    sink.close()
    publisher.stop(0)
    transport.stop()
    outbox.close()
    return dt, sealed


def micro_costs(
    key: Ed25519PrivateKey, d: Path, records: list[InferenceRecord], envelopes: int = 100, commits: int = 96
) -> dict[str, float]:
    """Median per-envelope costs of signing and verifying ``envelopes``, committing ``commits``, of 100 records."""
    batch = records[:100]
    limits = TelemetryLimits()
    sign, verify = [], []
    data = b""
    for i in range(1, envelopes + 1):
        prev = bytes(32) if i == 1 else envelope_hash(data)
        t = time.perf_counter()
        data = seal_envelope(DEVICE, i, prev, batch, time.time(), key, limits=limits)
        sign.append(time.perf_counter() - t)
        t = time.perf_counter()
        open_envelope(data, key.public_key(), limits)
        verify.append(time.perf_counter() - t)
    out = {
        "sign_ms": statistics.median(sign) * 1e3,
        "verify_ms": statistics.median(verify) * 1e3,
        "bytes_per_record": len(data) / len(batch),
    }
    for group in (1, 8):
        ob = Outbox(d / f"costs-{group}.db", device_id=DEVICE, key=key, limits=limits, max_envelopes=10**6)
        times = []
        for _ in range(max(1, commits // group)):
            t = time.perf_counter()
            ob.seal_many([batch] * group)
            times.append((time.perf_counter() - t) / group)
        ob.close()
        out[f"outbox_commit_group{group}_ms"] = statistics.median(times) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envelopes", type=int, default=3000)
    ap.add_argument("--records", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", default="20,100,500,1000")
    ap.add_argument("--e2e-records", type=int, default=200_000, help="records through the whole chain")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="a small workload that only proves the benchmark runs (make test)"
    )
    args = ap.parse_args()
    # Quick: every measurement and every window, on a few envelopes, once each; no verdict.
    if args.quick:
        args.envelopes, args.repeats, args.e2e_records = 200, 1, 2000
    cost_envelopes, cost_commits = (20, 16) if args.quick else (100, 96)
    n, r = args.envelopes, args.records
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pki = TestPKI(d / "pki")
        key = Ed25519PrivateKey.generate()
        creds = pki.client(DEVICE, key)
        broker = Broker(d / "broker", pki)
        broker.start()
        gateway = None
        try:
            gateway = start_gateway_stand_in(broker, pki)
            master = d / "master.db"
            ob = Outbox(master, device_id=DEVICE, key=key, limits=TelemetryLimits(), max_envelopes=10 * n)
            batch = inference_records(r)
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
            records = inference_records(args.e2e_records)
            modes = ("receipts", "puback")
            rig = FleetRig(d / "e2e", [f"box-{m}-{i}" for i in range(args.repeats) for m in modes])
            e2e: dict[str, list[tuple[float, int]]] = {m: [] for m in modes}
            try:
                for i in range(args.repeats):  # alternating, so drift on this shared machine hits both alike
                    for m in modes:
                        db = d / f"e2e-{m}-{i}.db"
                        e2e[m].append(end_to_end(rig, f"box-{m}-{i}", db, records, receipts=m == "receipts"))
            finally:
                rig.close()
            e2e_rps = {m: len(records) / min(e2e[m])[0] for m in modes}
            e2e_eps = {m: min(e2e[m])[1] / min(e2e[m])[0] for m in modes}
            costs = micro_costs(key, d, records, cost_envelopes, cost_commits)
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
            if gateway is not None:
                gateway.terminate()
                gateway.join(10)
            broker.stop()
    if args.json:
        out = {"envelope_bytes": size, "records": r, "envelopes_per_s": results, "costs": costs, "quick": args.quick}
        out["end_to_end"] = {"records_per_s": e2e_rps, "envelopes_per_s": e2e_eps}
        out["end_to_end"]["receipts_vs_puback"] = e2e_rps["receipts"] / e2e_rps["puback"]
        print(json.dumps(out, indent=2))
        return
    if args.quick:
        print(
            f"quick: {n} envelopes, {len(records)} records end to end, {cost_envelopes} envelopes signed, "
            f"{args.repeats} run each; a check that it runs, the figures are not worth quoting"
        )
    ratio = e2e_rps["receipts"] / e2e_rps["puback"]
    if args.quick:
        verdict = ratio_verdict = "quick: no verdict"
    else:
        verdict = f"target >= 20,000: {'PASS' if e2e_rps['receipts'] >= 20_000 else 'MISS'}"
        ratio_verdict = f"target >= 0.9x: {'PASS' if ratio >= 0.9 else 'MISS'}"
    print(
        f"end to end into a real gateway (sink -> sign -> outbox -> QoS 1 -> gateway stores -> delete, "
        f"{len(records)} records, batches of 100, best of {args.repeats}):"
    )
    print(
        f"  deleted on the fleet's receipt: {e2e_rps['receipts']:,.0f} records/s ({verdict}), "
        f"{e2e_eps['receipts']:,.0f} envelopes/s"
    )
    print(f"  deleted on the broker's PUBACK: {e2e_rps['puback']:,.0f} records/s, {e2e_eps['puback']:,.0f} envelopes/s")
    print(f"  receipts / PUBACK: {ratio:.2f}x ({ratio_verdict})")
    print(
        f"per envelope of 100 records: sign {costs['sign_ms']:.2f} ms, verify {costs['verify_ms']:.2f} ms, "
        f"{costs['bytes_per_record']:.0f} bytes/record; outbox commit {costs['outbox_commit_group1_ms']:.2f} ms "
        f"(group of 1), {costs['outbox_commit_group8_ms']:.2f} ms (group of 8)"
    )
    print(f"publish path: {n} envelopes of {r} records ({size:.0f} bytes each), best of {args.repeats}")
    print(f"raw paho best {raw_best:.0f}/s; publisher target >= 0.8x")
    print(f"{'run':42} {'envelopes/s':>12} {'records/s':>12} {'vs raw':>7}")
    for name, eps in results.items():
        print(f"{name:42} {eps:12.0f} {eps * r:12.0f} {eps / raw_best:7.2f}")


if __name__ == "__main__":
    main()

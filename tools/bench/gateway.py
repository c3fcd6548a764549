"""Gateway throughput: verified and stored records per second for `edge gateway run`, fed through mosquitto.

A load generator publishes pre-signed envelopes (100 inference records each, the device default) from many simulated
devices (1,000 by default, each with its own Ed25519 key and chain) through a real mosquitto on loopback with TLS
and client certificates; one gateway process (then two on the same shared subscription) verifies, stores and
acknowledges them. The rate is counted from the first publish to the moment the gateway's own metrics say the last
record was stored, so broker and publisher costs on this 2-core machine are inside the figure, not excluded.

    python tools/bench/gateway.py                  # SQLite and PostgreSQL (if a server answers), 1 and 2 gateways
    python tools/bench/gateway.py --devices 1000 --envelopes 5 --pg-url postgresql://postgres@127.0.0.1/postgres
    python tools/bench/gateway.py --quick          # a few seconds, no figures worth quoting: make test runs it

Target (issue 4): >= 50,000 records/s into SQLite for one gateway process.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test broker (PKI, config, process) is reused, not copied
sys.path.insert(0, str(ROOT / "tests" / "fleet"))

import paho.mqtt.client as mqtt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat  # noqa: E402
from gateway_helpers import SimDevice, gateway_config, gateway_toml  # noqa: E402
from mqtt_broker import GATEWAY_ID, Broker, TestPKI, free_port  # noqa: E402

from edge.fleet.store import open_store  # noqa: E402

CACHE = ROOT / ".cache" / "bench-gateway"
GATEWAYS = ("bench-1", "bench-2")  # one certificate (and client id) per gateway process
TARGET_SQLITE = 50_000


def workload(devices: int, envelopes: int, records: int) -> tuple[list[SimDevice], list[tuple[str, bytes]]]:
    """Devices and their envelopes interleaved round-robin (each device's counters in order); cached on disk."""
    CACHE.mkdir(parents=True, exist_ok=True)
    # Dated: the ledger credits records received within 30 days of their timestamps, so a workload is re-signed
    # daily (a few seconds) and every record of the run is credited, as a box's fresh work would be.
    path = CACHE / f"w-{devices}-{envelopes}-{records}-{time.strftime('%Y%m%d', time.gmtime())}.pickle"
    for old in CACHE.glob(f"w-{devices}-{envelopes}-{records}-*.pickle"):
        if old != path:
            old.unlink()
    if path.exists():
        raw_keys, messages = pickle.loads(path.read_bytes())  # our own cache file, written below
        sims = []
        for i, raw in enumerate(raw_keys):
            d = SimDevice(f"sim-{i:05d}")
            d.key = Ed25519PrivateKey.from_private_bytes(raw)
            sims.append(d)
        return sims, messages
    print(f"signing {devices * envelopes} envelopes of {records} records (cached in {CACHE}) ...", flush=True)
    sims = [SimDevice(f"sim-{i:05d}") for i in range(devices)]
    messages = [(f"devices/{d.id}/telemetry", d.seal(records)) for _ in range(envelopes) for d in sims]
    raw_keys = [d.key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()) for d in sims]
    path.write_bytes(pickle.dumps((raw_keys, messages)))
    return sims, messages


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def start_gateway(cfg_path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "gateway", "run", "--config", str(cfg_path)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"connected"' in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
            return proc
    raise RuntimeError(f"gateway exited with {proc.wait()}")


def publish_all(broker: Broker, pki: TestPKI, messages: list[tuple[str, bytes]]) -> float:
    """Publish every message at QoS 1 as fast as the broker acknowledges; returns the time publishing began."""
    creds = pki.client(GATEWAY_ID)  # the load generator speaks for every device: it needs devices/# rights
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"loadgen-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key))
    c.max_inflight_messages_set(0)
    c.max_queued_messages_set(0)
    up = threading.Event()
    c.on_connect = lambda *_a: up.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    assert up.wait(10)
    t0 = time.perf_counter()
    infos = [c.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()
    return t0


def run_once(
    broker: Broker,
    pki: TestPKI,
    work: Path,
    url: str,
    sims: list[SimDevice],
    messages: list[tuple[str, bytes]],
    records: int,
    gateways: int,
) -> float:
    """Records/s of ``gateways`` processes storing every message into ``url`` (a fresh store)."""
    store = open_store(url)
    for d in sims:
        store.add_device(d.record(enrolled_at=0.0))  # enrolled before the (cached) workload was signed
    store.close()
    procs, ports = [], []
    tag = uuid.uuid4().hex[:6]
    for i in range(gateways):
        port = free_port()
        cfg = gateway_config(broker, pki, work, url, gateway_id=GATEWAYS[i], metrics_port=port)
        # A group and sessions of this run's own: a stopped gateway's persistent session stays in its share group
        # and keeps receiving (queued) its share, which would starve the next run.
        cfg = replace(
            cfg,
            gateway=replace(cfg.gateway, share_group=f"bench{tag}"),
            broker=replace(cfg.broker, session_expiry_s=0),
        )
        path = work / f"gateway-{tag}-{i}.toml"
        path.write_text(gateway_toml(cfg))
        procs.append(start_gateway(path))
        ports.append(port)
    try:
        time.sleep(0.5)  # subscriptions registered
        total = len(messages) * records
        t0 = publish_all(broker, pki, messages)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = sum(metric(p, "edge_gateway_records_total") for p in ports)
            if done >= total:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        rejects = sum(metric(p, 'edge_gateway_envelopes_total{verdict="bad_signature"}') for p in ports)
        if done < total or rejects:
            raise RuntimeError(f"stored {done:.0f} of {total} records, {rejects:.0f} bad signatures")
        shares = [metric(p, "edge_gateway_records_total") / total for p in ports]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    store = open_store(url)
    try:
        credited = sum(r.credited for r in store.ledger())
    finally:
        store.close()
    if credited != total:  # every input is distinct and fresh: all of it is new work, so all of it is credited
        raise RuntimeError(f"credited {credited} of {total} inferences")
    print(
        f"    {gateways} gateway(s): {total} records in {elapsed:.2f} s, shares {[f'{s:.0%}' for s in shares]}, "
        f"{credited} credited"
    )
    return total / elapsed


def pg_database(base_url: str) -> tuple[str, str] | None:
    """A fresh database on the server at ``base_url``: (its URL, its name), or None if no server answers."""
    try:
        import psycopg  # noqa: PLC0415

        name = f"edge_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(base_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return re.sub(r"/[^/]*$", f"/{name}", base_url), name
    except Exception as e:  # any failure means no PostgreSQL figure; say why
        print(f"PostgreSQL: no server at {base_url} ({e}); skipping its figure")
        return None


def drop_pg(base_url: str, name: str) -> None:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--envelopes", type=int, default=5, help="envelopes per device")
    ap.add_argument("--records", type=int, default=100, help="records per envelope")
    ap.add_argument(
        "--pg-url", default=os.environ.get("EDGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="a small workload that only proves the benchmark runs (make test)"
    )
    args = ap.parse_args()
    if args.quick:
        args.devices, args.envelopes, args.records = 20, 3, 10
    sims, messages = workload(args.devices, args.envelopes, args.records)
    digest = hashlib.sha256(b"".join(m[1][:64] for m in messages[:10])).hexdigest()[:12]
    print(
        f"workload: {args.devices} devices x {args.envelopes} envelopes x {args.records} records "
        f"({len(messages)} envelopes, {sum(len(m[1]) for m in messages) / 2**20:.1f} MiB, id {digest})"
    )
    results: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="edge-bench-gw-") as tmp:
        work = Path(tmp)
        pki = TestPKI(work / "pki")
        broker = Broker(work / "broker", pki, gateways=(GATEWAY_ID, *GATEWAYS))
        broker.start()
        try:
            print("SQLite (WAL):")
            results["sqlite"] = {
                n: run_once(broker, pki, work, f"sqlite:///{work / f'fleet-{n}.db'}", sims, messages, args.records, n)
                for n in (1, 2)
            }
            for n in (1, 2):
                pg = None if args.no_pg else pg_database(args.pg_url)
                if pg is None:
                    break
                if n == 1:
                    print("PostgreSQL:")
                try:
                    url = pg[0]
                    results.setdefault("postgresql", {})[n] = run_once(
                        broker, pki, work, url, sims, messages, args.records, n
                    )
                finally:
                    drop_pg(args.pg_url, pg[1])
        finally:
            broker.stop()
    print(
        "\n=== gateway: verified and stored records/s"
        + (" (quick: a check that it runs, not a figure)" if args.quick else "")
        + " ==="
    )
    for backend, r in results.items():
        one, two = r.get(1, 0.0), r.get(2, 0.0)
        line = f"{backend:<11} 1 gateway {one:>9,.0f}/s   2 gateways {two:>9,.0f}/s   scaling {two / one:.2f}x"
        if backend == "sqlite" and not args.quick:
            line += f"   target >= {TARGET_SQLITE:,}: {'PASS' if one >= TARGET_SQLITE else 'MISS'}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

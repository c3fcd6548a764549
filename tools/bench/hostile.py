"""Hostile stress: honest boxes' ingest throughput with and without one hostile box attacking, in one sitting.

Each run builds a fleet of its own (CA, registry, store), starts mosquitto from nothing but the configuration `edge
fleet` generates (dynamic security, per-box rights) and one `edge gateway run`, enrolls ``--boxes`` honest boxes and
one hostile box ("mallory"), and has every honest box publish ``--envelopes`` pre-signed envelopes of ``--records``
inference records over its own mutual-TLS connection, as fast as the broker takes them. In the attacked runs mallory
publishes, on every topic it may write (and some it may not), from the first honest publish until the last honest
envelope is stored: rounds of ``tests/fleet/hostile_box.py`` (forgeries, lies about identity, absurd numbers,
decoder bombs, poison and retained status, valid but worthless work; signed before the clock starts, as a box would
have them ready), random bytes at QoS 1 and QoS 0, and a packet over the broker's limit now and then (it is
disconnected and connects again). Its QoS 1 messages are pipelined (up to ``--attack-inflight`` unacknowledged).

The figure is the honest boxes' records per second, from their first publish to the moment the store holds their
last envelope. A run fails (exit 1) if any honest envelope is lost, stored out of order, not fully credited, or if
anything mallory sent is counted against an honest box. Runs alternate without and with the attacker, ``--repeats``
times each; the medians are compared.

    python tools/bench/hostile.py                 # SQLite, then PostgreSQL if a server answers
    python tools/bench/hostile.py --boxes 20 --envelopes 200 --records 100 --repeats 3 --no-pg
    python tools/bench/hostile.py --quick         # a few seconds, no figures worth quoting: make test runs it

Target (issue 11): honest throughput under attack >= 0.9x of the same run without the attacker.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fleet, broker and hostile box of the tests are reused, not copied
sys.path.insert(0, str(ROOT / "tests" / "fleet"))
sys.path.insert(0, str(ROOT / "tools" / "bench"))  # the gateway benchmark's PostgreSQL helpers

import paho.mqtt.client as mqtt  # noqa: E402
from fleet_fixtures import Creds, Fleet, FleetBroker, GatewayProcess, wait_until  # noqa: E402
from gateway import drop_pg, pg_database  # noqa: E402 -- tools/bench/gateway.py
from gateway_helpers import SimDevice  # noqa: E402
from hostile_box import Attack, HostileBox, sim_device  # noqa: E402
from mqtt_broker import free_port  # noqa: E402

from edge.fleet.config import MetricsConfig  # noqa: E402
from edge.fleet.store import open_store  # noqa: E402
from edge.identity.keys import load_private_key  # noqa: E402

TARGET = 0.9
MALLORY = "mallory"


@dataclass
class RunResult:
    """One run: the honest figure and what mallory did."""

    rate: float
    seconds: float
    sent: Counter[str] = field(default_factory=Counter)  # mallory's messages by kind, and its connections
    answers: Counter[str] = field(default_factory=Counter)  # the broker's PUBACKs to mallory, by reason
    quarantined: int = 0
    shed: int = 0
    suspensions: int = 0


def connect(
    fleet_broker: FleetBroker, creds: Creds, *, inflight: int = 0, answers: Counter[str] | None = None
) -> mqtt.Client | None:
    """A paho client of one box, as itself, its network loop running; None if the broker refused it. ``answers``
    counts the broker's PUBACKs by reason ("Success", "Not authorized", ...)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=creds.name, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key))
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)
    up = threading.Event()
    result: list[bool] = []

    def on_connect(_c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        result.append(not getattr(rc, "is_failure", False))
        up.set()

    c.on_connect = on_connect
    if answers is not None:

        def on_publish(_c: object, _u: object, _mid: int, rc: object, _p: object) -> None:
            answers[str(getattr(rc, "getName", lambda: rc)())] += 1

        c.on_publish = on_publish
    c.connect(fleet_broker.host, fleet_broker.port)
    c.loop_start()
    if not up.wait(10) or not result[0]:
        c.disconnect()
        c.loop_stop()
        return None
    return c


def honest_client(fleet_broker: FleetBroker, creds: Creds) -> mqtt.Client:
    c = connect(fleet_broker, creds)
    if c is None:
        raise RuntimeError(f"{creds.name} could not connect")
    return c


class Attacker(threading.Thread):
    """mallory: prepared rounds of attacks, random bytes, QoS 0 floods and oversized packets, until stopped. When
    the broker refuses or drops it, it connects again after ``RETRY_S`` (paho's own minimum is 1 s)."""

    RETRY_S = 0.2

    def __init__(self, broker: FleetBroker, creds: Creds, rounds: list[list[Attack]], inflight: int) -> None:
        super().__init__(daemon=True)
        self.broker, self.creds, self.rounds, self.inflight = broker, creds, rounds, inflight
        self.stop = threading.Event()
        self.sent: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._attack()
        except BaseException as e:  # reported by the run, which then fails
            self.error = e

    def _attack(self) -> None:
        rng = random.Random(3)
        c: mqtt.Client | None = None
        pending: list[mqtt.MQTTMessageInfo] = []
        i = 0
        while not self.stop.is_set():
            if c is None or not c.is_connected():
                if c is not None:
                    c.disconnect()  # ends paho's reconnect wait at once, so loop_stop does not block
                    c.loop_stop()
                c, pending = connect(self.broker, self.creds, inflight=self.inflight, answers=self.answers), []
                self.sent["connections"] += 1
                if c is None:
                    self.sent["refused"] += 1
                    self.stop.wait(self.RETRY_S)
                    continue
            batch = list(self.rounds[i % len(self.rounds)])
            batch += [Attack("random", batch[0].topic, rng.randbytes(rng.randrange(1, 2048))) for _ in range(50)]
            batch += [Attack("random_qos0", batch[0].topic, rng.randbytes(100), qos=0) for _ in range(200)]
            for a in batch:
                if self.stop.is_set() or not c.is_connected():
                    break
                pending.append(c.publish(a.topic, a.payload, qos=a.qos, retain=a.retain))
                self.sent["qos0" if a.qos == 0 else "qos1"] += 1
                if len(pending) >= self.inflight:  # pipelined: wait (at most 1 s) for half of them to be answered
                    deadline = time.monotonic() + 1.0
                    while c.is_connected() and time.monotonic() < deadline:
                        pending = [p for p in pending if p.rc == mqtt.MQTT_ERR_SUCCESS and not p.is_published()]
                        if len(pending) < self.inflight // 2:
                            break
                        time.sleep(0.001)
                    pending = pending[-(self.inflight // 2) :]  # the unanswered rest is given up on
            i += 1
            if i % 10 == 0 and c.is_connected():  # over the packet limit: mosquitto drops the connection
                c.publish(batch[0].topic, b"\0" * (600 * 1024), qos=1)
                self.sent["oversized"] += 1
                time.sleep(0.05)
                c.disconnect()
        if c is not None:
            c.disconnect()
            c.loop_stop()


def honest_count(url: str) -> int:
    """Envelopes of the honest boxes in the store."""
    if url.startswith("sqlite"):
        import sqlite3  # noqa: PLC0415

        with sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True, timeout=30) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM envelopes WHERE device_id <> ?", (MALLORY,)).fetchone()[0])
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT COUNT(*) FROM envelopes WHERE device_id <> %s", (MALLORY,)).fetchone()
        return int(row[0]) if row else 0


def run_once(work: Path, url: str, args: argparse.Namespace, *, attack: bool) -> RunResult:
    """One fresh fleet, broker and gateway; the honest workload with or without mallory."""
    fleet = Fleet(work / "fleet", url)
    broker = FleetBroker(fleet, work / "mosquitto")
    names = [f"box-{i:03d}" for i in range(args.boxes)]
    creds = {n: fleet.enroll(n)[1] for n in (*names, MALLORY)}
    gw_creds = fleet.identity("gateway-1")
    fleet.store.close()
    broker.start()
    gw = None
    clients: list[mqtt.Client] = []
    attacker = None
    try:
        cfg = replace(fleet.gateway_config(gw_creds), metrics=MetricsConfig(enabled=True, port=free_port()))
        gw = GatewayProcess(cfg, work)
        gw.start()
        # Signed before the clock starts: the boxes' envelopes, and mallory's rounds.
        boxes: list[SimDevice] = [sim_device(n, load_private_key(creds[n].key)) for n in names]
        work_items = [(f"devices/{d.id}/telemetry", d.seal(args.records)) for _ in range(args.envelopes) for d in boxes]
        clients = [honest_client(broker, creds[n]) for n in names]
        by_topic = {f"devices/{n}/telemetry": c for n, c in zip(names, clients, strict=True)}
        if attack:
            m = HostileBox(MALLORY, load_private_key(creds[MALLORY].key), victim=names[0], seed=1)
            rounds = [list(m.round()) for _ in range(args.attack_rounds)]
            attacker = Attacker(broker, creds[MALLORY], rounds, args.attack_inflight)
        time.sleep(0.3)
        total = len(work_items)
        t0 = time.perf_counter()
        if attacker is not None:
            attacker.start()
        infos = [by_topic[topic].publish(topic, payload, qos=1) for topic, payload in work_items]
        for info in infos:
            info.wait_for_publish(300)
        ok = wait_until(lambda: honest_count(url) >= total, args.max_seconds, 0.05)
        elapsed = time.perf_counter() - t0
        if attacker is not None:
            attacker.stop.set()
            attacker.join(60)
            if attacker.error is not None:
                raise RuntimeError(f"the attacker failed: {attacker.error!r}")
        if not ok:
            dropped = [ln for ln in broker.log.read_text(errors="replace").splitlines() if "dropped" in ln]
            raise RuntimeError(
                f"stored {honest_count(url)} of {total} honest envelopes in {args.max_seconds} s; "
                f"mosquitto: {dropped[-3:] or 'no drops logged'}"
            )
        if not gw.alive:
            raise RuntimeError(f"the gateway exited: {gw.log_text()[-2000:]}")
        result = RunResult(args.envelopes * args.boxes * args.records / elapsed, elapsed)
        if attacker is not None:
            result.sent = attacker.sent
            result.answers = attacker.answers
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
        if gw is not None:
            gw.stop()
        broker.stop()
    check(url, names, args, result)
    return result


def check(url: str, names: list[str], args: argparse.Namespace, result: RunResult) -> None:
    """Nothing honest lost, reordered or uncredited; nothing of mallory's on an honest box. Raises otherwise."""
    store = open_store(url)
    try:
        for n in names:
            counters = [e.counter for e in store.envelopes(n)]
            if counters != list(range(1, args.envelopes + 1)):
                raise RuntimeError(f"{n}: stored counters {counters[:5]}... ({len(counters)} of {args.envelopes})")
            rows = store.ledger(device_id=n)
            bad = sum(r.missing + r.rejects + r.duplicates for r in rows)
            credited, claimed = sum(r.credited for r in rows), sum(r.claimed for r in rows)
            if bad or credited != claimed or claimed != args.envelopes * args.records:
                raise RuntimeError(f"{n}: missing/rejects/duplicates {bad}, credited {credited} of {claimed}")
        rows = store.quarantined(limit=10_000_000)
        result.suspensions = sum(x.strikes for x in store.suspensions())
    finally:
        store.close()
    strays = {q["device"] for q in rows} - {MALLORY}
    if strays:
        raise RuntimeError(f"quarantine rows attributed to {sorted(strays)}: only mallory attacked")
    result.quarantined = sum(q["kind"] != "shed" for q in rows)
    result.shed = sum(
        int(n) for q in rows if q["kind"] == "shed" for n in re.findall(rf"{MALLORY}: (\d+)", q["reason"])
    )


def backend_runs(backend: str, args: argparse.Namespace) -> dict[bool, list[RunResult]] | None:
    results: dict[bool, list[RunResult]] = {False: [], True: []}
    for rep in range(args.repeats):
        for attack in (False, True):
            with tempfile.TemporaryDirectory(prefix="edge-bench-hostile-") as tmp:
                if backend == "sqlite":
                    r = run_once(Path(tmp), f"sqlite:///{Path(tmp) / 'fleet.db'}", args, attack=attack)
                else:
                    pg = pg_database(args.pg_url)
                    if pg is None:
                        return None
                    try:
                        r = run_once(Path(tmp), pg[0], args, attack=attack)
                    finally:
                        drop_pg(args.pg_url, pg[1])
            results[attack].append(r)
            what = "with mallory   " if attack else "without mallory"
            extra = ""
            if attack:
                extra = (
                    f"; mallory sent {r.sent['qos1']:,} QoS 1 ({r.answers['Not authorized']:,} refused by the broker), "
                    f"{r.sent['qos0']:,} QoS 0, {r.sent['oversized']} oversized over {r.sent['connections']} "
                    f"connections -> {r.quarantined:,} quarantined, {r.shed:,} shed, {r.suspensions} suspension(s)"
                )
            print(f"  {backend:<10} run {rep + 1} {what}: {r.rate:>9,.0f} records/s ({r.seconds:.2f} s){extra}")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, default=20, help="honest boxes")
    ap.add_argument("--envelopes", type=int, default=200, help="envelopes per honest box")
    ap.add_argument("--records", type=int, default=100, help="records per envelope")
    ap.add_argument("--repeats", type=int, default=3, help="runs without and with the attacker, alternating")
    ap.add_argument("--attack-rounds", type=int, default=20, help="rounds of attacks signed beforehand, cycled")
    ap.add_argument("--attack-inflight", type=int, default=1000, help="mallory's unacknowledged QoS 1 messages")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="a run that takes longer fails")
    ap.add_argument(
        "--pg-url", default=os.environ.get("EDGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a small workload that only proves it runs (make test)")
    args = ap.parse_args()
    if args.quick:
        args.boxes, args.envelopes, args.records, args.repeats, args.attack_rounds = 3, 10, 20, 1, 2
    print(
        f"workload: {args.boxes} honest boxes x {args.envelopes} envelopes x {args.records} records "
        f"({args.boxes * args.envelopes * args.records:,} records); mallory: {args.attack_rounds} rounds cycled, "
        f"{args.attack_inflight} in flight"
    )
    summary: dict[str, tuple[float, float]] = {}
    for backend in ("sqlite", "postgresql"):
        if backend == "postgresql" and args.no_pg:
            break
        res = backend_runs(backend, args)
        if res is None:
            continue
        summary[backend] = (statistics.median(r.rate for r in res[False]), statistics.median(r.rate for r in res[True]))
    print(
        "\n=== hostile box: honest records/s, median of runs"
        + (" (quick: a check that it runs, not a figure)" if args.quick else "")
        + " ==="
    )
    for backend, (without, with_) in summary.items():
        line = (
            f"{backend:<11} without mallory {without:>9,.0f}/s   with mallory {with_:>9,.0f}/s   "
            f"ratio {with_ / without:.2f}x"
        )
        if not args.quick:
            line += f"   target >= {TARGET:.1f}x: {'PASS' if with_ / without >= TARGET else 'MISS'}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
